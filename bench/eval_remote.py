"""Issue 20's two measurements: DS-1000 programs in the sandbox against the same programs without one, and
evaluation through an endpoint against in-process generation.

ds1000    The fixture's reference solutions (tests/data/ds1000_fixture.jsonl, the libraries installed here) as
          their DS-1000 programs: ours (`evaluate --generations`, each program forked from a warm sandboxed
          interpreter that loaded the libraries once) against running each program in a fresh `python` process
          with no sandbox (as bigcode-evaluation-harness and DS-1000's own evaluator do), same workers, time per
          problem; alternating, best of --rounds.
endpoint  HumanEval's first --problems prompts, greedy, --tokens new tokens, embedded model: in-process
          generation (`evaluate --generation-only`) against the same through `starcoder serve` in another
          process (`--endpoint`, --concurrency requests in flight); samples per second, alternating, best of
          --rounds, and whether the completions are identical.

    python bench/eval_remote.py [--part ds1000|endpoint|all] [--rounds 2] [--problems 20] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import free_port, running, wait_until_healthy  # noqa: E402

FIXTURE = Path(__file__).parents[1] / "tests" / "data" / "ds1000_fixture.jsonl"


def ds1000(rounds: int, workers: int) -> None:
    from starcoder.eval.run import EvalConfig, evaluate
    from starcoder.eval.tasks import get_task

    problems = [p for p in get_task("ds1000").problems(FIXTURE) if p.group != "Tensorflow"]
    programs = [p.program(p.reference) for p in problems]
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps({"task_id": p.task_id, "completion": p.reference}) + "\n"
                                   for p in problems))

        def sandboxed() -> float:
            start = time.perf_counter()
            result = evaluate(EvalConfig(["ds1000"], Path(tmp) / "out", data={"ds1000": FIXTURE},
                                         generations=samples, workers=workers), progress=False)
            assert result["tasks"]["ds1000"]["pass@1"] == 1.0, result
            return time.perf_counter() - start

        def plain() -> float:
            def run(program: str) -> int:
                with tempfile.TemporaryDirectory() as work:
                    path = Path(work) / "program.py"
                    path.write_text(program)
                    return subprocess.run([sys.executable, str(path)], cwd=work, capture_output=True,
                                          env={**os.environ, "MPLBACKEND": "Agg"}).returncode

            start = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                assert not any(pool.map(run, programs))
            return time.perf_counter() - start

        best = {"sandboxed (ours)": float("inf"), "no sandbox (fresh python each)": float("inf")}
        for round_ in range(rounds):
            sides = list(best.items())
            for name, _ in (sides if round_ % 2 == 0 else sides[::-1]):
                seconds = sandboxed() if name.startswith("sandboxed") else plain()
                best[name] = min(best[name], seconds)
                print(f"round {round_ + 1} {name}: {seconds:.2f} s", flush=True)
    ours, theirs = best["sandboxed (ours)"], best["no sandbox (fresh python each)"]
    print(f"\nDS-1000 fixture: {len(programs)} reference programs, {workers} workers, best of {rounds}")
    print(f"sandboxed (ours): {ours / len(programs):.3f} s/problem; no sandbox, a fresh python per program: "
          f"{theirs / len(programs):.3f} s/problem; ours / no sandbox {ours / theirs:.2f}x")


def endpoint(rounds: int, problems: int, tokens: int, concurrency: int) -> None:
    from starcoder.eval.remote import Endpoint
    from starcoder.eval.run import EvalConfig, evaluate

    port = free_port()
    settings = dict(limit=problems, max_new_tokens=tokens, temperature=0.0, generation_only=True)
    server = subprocess.Popen([sys.executable, "-m", "starcoder", "serve", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with running(wait_until_healthy(server, port, "starcoder serve")), tempfile.TemporaryDirectory() as tmp:
        best = {"in-process": float("inf"), "endpoint": float("inf")}
        outputs = {}
        for round_ in range(rounds):
            for name in (("in-process", "endpoint") if round_ % 2 == 0 else ("endpoint", "in-process")):
                out = Path(tmp) / f"{name}-{round_}"
                remote = Endpoint(f"http://127.0.0.1:{port}", concurrency=concurrency) if name == "endpoint" else None
                start = time.perf_counter()
                evaluate(EvalConfig(["humaneval"], out, endpoint=remote, **settings), progress=False)
                seconds = time.perf_counter() - start
                best[name] = min(best[name], seconds)
                outputs.setdefault(name, []).append([json.loads(line)["completion"] for line in
                                                     (out / "humaneval" / "samples.jsonl").read_text().splitlines()])
                print(f"round {round_ + 1} {name}: {seconds:.2f} s ({problems / seconds:.2f} samples/s)", flush=True)
    local, remote_seconds = best["in-process"], best["endpoint"]
    reference = outputs["in-process"][0]
    same = [sum(a == b for a, b in zip(reference, run, strict=True)) for runs in outputs.values() for run in runs]
    print(f"\nHumanEval, {problems} problems, greedy, {tokens} new tokens, embedded model, best of {rounds}")
    print(f"in-process: {problems / local:.2f} samples/s; endpoint (starcoder serve, {concurrency} in flight): "
          f"{problems / remote_seconds:.2f} samples/s; endpoint / in-process {local / remote_seconds:.2f}x")
    print(f"completions equal to the first in-process run's, per run (in-process runs, then endpoint runs): {same} "
          f"of {problems}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["ds1000", "endpoint", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    if args.part in ("ds1000", "all"):
        ds1000(args.rounds, args.workers)
    if args.part in ("endpoint", "all"):
        endpoint(args.rounds, args.problems, args.tokens, args.concurrency)


if __name__ == "__main__":
    main()
