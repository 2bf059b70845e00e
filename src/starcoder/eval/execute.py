"""Running untrusted generated programs: each in its own sandboxed process, and nothing of it left afterwards.

Every program runs in a fresh temporary directory, as an unprivileged user (`nobody` when the harness is root),
under bubblewrap when it is installed (Debian's `bubblewrap`):
new network, PID, IPC and UTS namespaces (no network at all), the whole file system read-only except the
program's own directory and a private /tmp, and the sandbox dies with the harness. Inside, resource limits cap CPU
time, memory, file size and the number of processes; a wall-clock timeout kills the whole process group; output
is capped. Without bubblewrap the limits and the timeout still apply, but the program can see the network and
write where the harness can: a loud warning says so. Generated code never runs in the harness's own process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..errors import StarCoderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Language:
    """How to run one language: the source file's name, the commands (run in order, {file} substituted), and the
    Debian package that provides the toolchain."""

    name: str
    file: str
    commands: tuple[tuple[str, ...], ...]
    debian: str


# One table, not a module per language. Compiled languages build then run inside the same sandbox.
LANGUAGES = {lang.name: lang for lang in [
    Language("python", "program.py", (("python3", "{file}"),), "python3"),
    Language("javascript", "program.js", (("node", "{file}"),), "nodejs"),
    Language("typescript", "program.ts", (("tsc", "--target", "es2019", "--module", "commonjs", "{file}"),
                                          ("node", "program.js")), "node-typescript"),
    Language("cpp", "program.cpp", (("g++", "-std=c++17", "-O1", "-o", "program", "{file}"), ("./program",)), "g++"),
    Language("java", "Problem.java", (("javac", "{file}"), ("java", "-Xmx512m", "Problem")), "default-jdk"),
    Language("rust", "program.rs", (("rustc", "-O", "-o", "program", "{file}"), ("./program",)), "rustc"),
    Language("go", "program_test.go", (("go", "test", "{file}"),), "golang-go"),
    Language("lua", "program.lua", (("lua", "{file}"),), "lua5.4"),
    Language("php", "program.php", (("php", "{file}"),), "php-cli"),
    Language("perl", "program.pl", (("perl", "{file}"),), "perl"),
    Language("r", "program.r", (("Rscript", "{file}"),), "r-base-core"),
    Language("ruby", "program.rb", (("ruby", "{file}"),), "ruby"),
    Language("racket", "program.rkt", (("racket", "{file}"),), "racket"),
    Language("bash", "program.sh", (("bash", "{file}"),), "bash"),
    Language("scala", "program.scala", (("scala", "{file}"),), "scala"),
    Language("d", "program.d", (("ldc2", "-of=program", "{file}"), ("./program",)), "ldc"),
    Language("csharp", "program.cs", (("mcs", "-out:program.exe", "{file}"), ("mono", "program.exe")), "mono-mcs"),
]}


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds for all of a program's commands
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 1024**3
    file_bytes: int = 16 * 1024**2
    processes: int = 64
    output_bytes: int = 64 * 1024


@dataclass
class Outcome:
    passed: bool
    status: str  # "passed", "failed", "timeout", "error" (could not run)
    exit_code: int | None
    output: str  # stdout and stderr, capped
    seconds: float


def check_toolchain(language: str) -> Language:
    """The language's entry; a clear error naming the Debian package when its toolchain is missing."""
    if language not in LANGUAGES:
        raise StarCoderError(f"unknown language {language!r}; known: {', '.join(sorted(LANGUAGES))}")
    lang = LANGUAGES[language]
    for command in lang.commands:
        tool = command[0]
        if not tool.startswith("./") and shutil.which(tool) is None:
            raise StarCoderError(f"{lang.name} needs {tool!r}, which is not installed: apt-get install {lang.debian}")
    return lang


def sandbox_available() -> bool:
    return shutil.which("bwrap") is not None


_warned = False


def _sandbox_prefix(workdir: str) -> list[str]:
    global _warned
    if sandbox_available():
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                "--bind", workdir, workdir, "--chdir", workdir, "--unshare-all", "--die-with-parent",
                "--new-session", "--setenv", "HOME", workdir]
    if not _warned:
        log.warning("bubblewrap (bwrap) is not installed: generated code runs WITHOUT network and file-system "
                    "isolation, only with resource limits. Install it: apt-get install bubblewrap")
        _warned = True
    return []


def _unprivileged_ids() -> tuple[int, int] | None:
    """(uid, gid) to run programs as when the harness is root: root ignores the process limit (a fork bomb would
    run free) and every file permission. None when not root."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
        return nobody.pw_uid, nobody.pw_gid
    except KeyError:
        return 65534, 65534


def _limit(limits: Limits) -> Callable[[], None]:
    ids = _unprivileged_ids()

    def apply() -> None:  # runs in the child, before exec
        os.setsid()  # its own process group, so the timeout can kill everything it started
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if ids is not None:
            os.setgroups([])
            os.setgid(ids[1])
            os.setuid(ids[0])

    return apply


def run_program(source: str, language: str = "python", limits: Limits = Limits()) -> Outcome:
    """Run one program; it passes when every command exits 0 within the limits."""
    lang = check_toolchain(language)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="starcoder-exec-") as workdir:
        os.chmod(workdir, 0o777)  # the program may run as another (unprivileged) user
        path = os.path.join(workdir, lang.file)
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        output = b""
        for command in lang.commands:
            argv = _sandbox_prefix(workdir) + [part.replace("{file}", path) for part in command]
            remaining = limits.timeout - (time.monotonic() - start)
            code, out, timed_out = _run(argv, workdir, limits, max(remaining, 0.01))
            output += out
            if timed_out:
                return Outcome(False, "timeout", None, _text(output, limits), time.monotonic() - start)
            if code != 0:
                return Outcome(False, "failed", code, _text(output, limits), time.monotonic() - start)
    return Outcome(True, "passed", 0, _text(output, limits), time.monotonic() - start)


def _run(argv: list[str], workdir: str, limits: Limits, timeout: float) -> tuple[int | None, bytes, bool]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": workdir, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=_limit(limits), close_fds=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out[: limits.output_bytes], False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, _ = proc.communicate()
        return None, out[: limits.output_bytes], True
    finally:
        _kill_group(proc)  # whatever it left running in its group goes too


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)


def _text(output: bytes, limits: Limits) -> str:
    text = output[: limits.output_bytes].decode("utf-8", errors="replace")
    return text + ("\n[output truncated]" if len(output) >= limits.output_bytes else "")


def run_many(programs: Iterable[tuple[str, str]], limits: Limits = Limits(), workers: int | None = None,
             progress: Callable[[], None] | None = None) -> list[Outcome]:
    """Run (source, language) programs on parallel workers (threads waiting on sandboxed processes); results
    in input order."""
    programs = list(programs)
    for language in {lang for _, lang in programs}:
        check_toolchain(language)  # fail before any work starts

    def one(item: tuple[str, str]) -> Outcome:
        outcome = run_program(item[0], item[1], limits)
        if progress is not None:
            progress()
        return outcome

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
        return list(pool.map(one, programs))
