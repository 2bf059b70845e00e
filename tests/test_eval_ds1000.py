"""DS-1000 (tests/data/ds1000_fixture.jsonl: problems written here in DS-1000's published JSONL format, two per
library and one TensorFlow problem): reference solutions pass in the sandbox with the real libraries, wrong ones
fail, per-library results, a library that is not installed is reported as skipped, and the prompts are the
harness's (completion) or a FIM split (insertion)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from starcoder import StarCoderError
from starcoder.eval.execute import run_many
from starcoder.eval.run import EvalConfig, evaluate
from starcoder.eval.tasks import DS1000_STOP, get_task

for _module in ("numpy", "pandas", "scipy", "sklearn", "matplotlib"):
    pytest.importorskip(_module)

FIXTURE = Path(__file__).parent / "data" / "ds1000_fixture.jsonl"
ROWS = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
LIBRARIES = sorted({row["metadata"]["library"] for row in ROWS})
TENSORFLOW = importlib.util.find_spec("tensorflow") is not None


def samples(tmp_path, *completions) -> Path:
    """A samples file with one sample per completion function for every problem."""
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"task_id": f"ds1000/{row['metadata']['problem_id']}",
                                        "completion": completion(row)}) + "\n"
                            for row in ROWS for completion in completions))
    return path


def test_reference_solutions_pass_and_wrong_ones_fail_per_library(tmp_path):
    """Per problem: the reference, a wrong answer before the reference (the harness's post-processing cuts at the
    stop), and the reference indented, with the closing marks after it (post-processing strips it)."""
    kinds = (lambda row: row["reference_code"], lambda row: "result = 0\n</code>\n" + row["reference_code"],
             lambda row: "\n    " + row["reference_code"] + "\n</code>\nEND SOLUTION")
    summary = evaluate(EvalConfig(["ds1000"], tmp_path / "out", data={"ds1000": FIXTURE},
                                  generations=samples(tmp_path, *kinds)))["tasks"]["ds1000"]
    installed = [lib for lib in LIBRARIES if TENSORFLOW or lib != "Tensorflow"]
    results = [json.loads(line) for line in (tmp_path / "out" / "ds1000" / "results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results] == [True, False, True] * len(results[::3])
    assert summary["pass@1"] == pytest.approx(2 / 3) and sorted(summary["groups"]) == installed
    assert all(result["pass@1"] == pytest.approx(2 / 3) for result in summary["groups"].values())
    if not TENSORFLOW:  # reported, not dropped silently, and not counted as failures
        assert summary["skipped"] == {"Tensorflow": 1} and summary["problems"] == len(ROWS) - 1
        assert "skipped, library not installed: Tensorflow (1)" in (tmp_path / "out" / "summary.md").read_text()
    # the string test: a loop where the problem forbids one fails though the answer is right
    numpy = [p for p in get_task("ds1000").problems(FIXTURE) if p.task_id == "ds1000/1"][0]
    assert "test_string(code)" in numpy.program("result = a[::-1]")
    loop = numpy.program("result = np.array([r for r in a[::-1]])")
    straight = numpy.program(ROWS[1]["reference_code"])
    outcomes = run_many([(loop, numpy.language), (straight, numpy.language)], workers=1)
    assert [o.passed for o in outcomes] == [False, True] and "AssertionError" in outcomes[0].output


def test_prompts_and_stops_of_both_modes():
    completion = {p.task_id: p for p in get_task("ds1000").problems(FIXTURE)}
    insertion = {p.task_id: p for p in get_task("ds1000-insertion").problems(FIXTURE)}
    first = completion["ds1000/0"]
    assert first.prompt == ROWS[0]["prompt"] and first.prompt.endswith("BEGIN SOLUTION\n<code>\n")
    assert first.stop == DS1000_STOP == ("</code>", "# SOLUTION END") and first.suffix is None
    assert insertion["ds1000/0"].suffix == "\n</code>\n"
    assert insertion["ds1000/10"].suffix is None  # Matplotlib stays a completion, as in the harness
    old_format = dict(ROWS[0], prompt="x = 1\n[insert]\nprint(x)\n")
    assert get_task("ds1000-insertion").read is not None
    path = Path(FIXTURE.parent / "_ds1000_old_format.jsonl")
    try:
        path.write_text(json.dumps(old_format) + "\n")
        (old,) = get_task("ds1000-insertion").problems(path)
        assert (old.prompt, old.suffix) == ("x = 1\n", "\nprint(x)\n")
    finally:
        path.unlink()


def test_bad_ds1000_rows_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(dict(ROWS[1], metadata={"library": "Keras"})) + "\n")
    with pytest.raises(StarCoderError, match=r"bad.jsonl:2: metadata.library should be one of Numpy"):
        get_task("ds1000").problems(path)
    path.write_text(json.dumps(dict(ROWS[0], code_context="print(1)")) + "\n")
    with pytest.raises(StarCoderError, match=r"bad.jsonl:1: code_context has no test_execution"):
        get_task("ds1000").problems(path)
