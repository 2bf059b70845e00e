"""Serving benchmark: aggregate tokens/s and latency with 1, 4 and 16 concurrent clients.

    python bench/serving.py [--model embedded|1b] [--requests-per-client 2] [--max-tokens 64]

`starcoder serve` runs in its own process (max batch 16); each client sends its requests one after another
(OpenAI /v1/completions, greedy, exactly max_tokens new tokens each with the `ignore_eos` extension, a different
~100-token code prompt each), all clients at once. Reported per
level: aggregate completion tokens/s over the level's wall time, and p50 / p99 request latency. The baseline
is the same server with one client. Target (issue 5): 16 clients >= 6x the aggregate tokens/s of 1 client.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from common import RESULTS, make_checkpoint
from common import parser as common_parser

PROMPT = ('import json\nimport os\n\n\ndef load_config(path):\n    """Read the JSON settings file at path and return '
          'them merged over the defaults."""\n'
          '    defaults = {{"name": "example-{i}", "retries": {i}, "verbose": False}}\n')


def start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "starcoder", "serve", "--port", str(port), "--max-batch", "16", "--max-queue", "64"]
    if model != "embedded":
        cmd += ["--model", model]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
    raise RuntimeError("the server did not start within 300 s")


async def level(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    tokens = 0

    async def client(c: int, http) -> None:
        nonlocal tokens
        for r in range(per_client):
            start = time.perf_counter()
            response = await http.post("/v1/completions", json={"prompt": PROMPT.format(i=c * 100 + r),
                                                                 "max_tokens": max_tokens, "temperature": 0,
                                                                 "ignore_eos": True})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"clients": clients, "requests": len(latencies), "tokens": tokens, "seconds": wall,
            "tokens_per_second": tokens / wall, "p50_seconds": pick(0.5), "p99_seconds": pick(0.99)}


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, or 1b for a random StarCoderBase-1B shape")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model = "embedded" if args.model == "embedded" else str(make_checkpoint("starcoderbase-1b", "bfloat16"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(model, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(level(url, 1, 1, 8))  # warm-up
        results = [asyncio.run(level(url, n, args.requests_per_client, args.max_tokens)) for n in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    name = "embedded model" if args.model == "embedded" else "StarCoderBase-1B shape, random, bf16"
    print(f"{name}; {args.requests_per_client} requests per client, {args.max_tokens} new tokens each, greedy, "
          f"{os.cpu_count()} cores")
    print(f"{'clients':>8}{'requests':>10}{'tokens/s':>11}{'vs 1 client':>13}{'p50 (s)':>10}{'p99 (s)':>10}")
    for r in results:
        print(f"{r['clients']:8d}{r['requests']:10d}{r['tokens_per_second']:11.1f}"
              f"{r['tokens_per_second'] / results[0]['tokens_per_second']:12.2f}x{r['p50_seconds']:10.2f}"
              f"{r['p99_seconds']:10.2f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"serving-{args.model}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
