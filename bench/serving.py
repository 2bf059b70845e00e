"""Serving benchmark: aggregate tokens/s and latency with 1, 4 and 16 concurrent clients, and a run under faults.

    python bench/serving.py [--model embedded|1b] [--requests-per-client 2] [--max-tokens 64] [--run levels|faults]

`starcoder serve` runs in its own process (max batch 16); each client sends its requests one after another
(OpenAI /v1/completions, greedy, exactly max_tokens new tokens each with the `ignore_eos` extension, a different
~100-token code prompt each), all clients at once. Reported per
level: aggregate completion tokens/s over the level's wall time, and p50 / p99 request latency. The baseline
is the same server with one client. Target (issue 5): 16 clients >= 6x the aggregate tokens/s of 1 client.

The faults run (issue 14): 32 streaming clients at once, half of them hanging up after 3 chunks, with about 5%
malformed or extreme requests mixed in (bad JSON, a lone surrogate, a body over the limit, a 3.5 MB input to
tokenize, a sampling setting that breaks its own row); then 12 non-streaming clients that abandon their requests.
The anchor is each good stream's answer when it runs alone. Targets: no 5xx, every good client completes with the
same text as alone, no slot busy 1 s after the abandonment, the server's RSS back within 10% of where it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time

from common import RESULTS, free_port, make_checkpoint, wait_until_healthy
from common import parser as common_parser

PROMPT = ('import json\nimport os\n\n\ndef load_config(path):\n    """Read the JSON settings file at path and return '
          'them merged over the defaults."""\n'
          '    defaults = {{"name": "example-{i}", "retries": {i}, "verbose": False}}\n')


def start_server(model: str, port: int, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "starcoder", "serve", "--port", str(port), "--max-batch", "16", "--max-queue", "64",
           *extra]
    if model != "embedded":
        cmd += ["--model", model]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return wait_until_healthy(server, port, "starcoder serve")


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


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def idle_after(http, since: float, limit: float = 30.0) -> float:
    """Seconds from `since` until no sequence is active and none waits (from /metrics)."""
    while time.monotonic() - since < limit:
        metrics = (await http.get("/metrics")).text
        busy = sum(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith(("starcoder_active_sequences ", "starcoder_queue_size ")))
        if busy == 0:
            return time.monotonic() - since
        await asyncio.sleep(0.02)
    return float("inf")


async def faults(url: str, pid: int, max_tokens: int) -> dict:
    import httpx

    prompts = [PROMPT.format(i=i) for i in range(32)]
    statuses: list[int] = []

    async def stream(http, prompt: str, hang_up_after: int | None) -> str | None:
        """The streamed text, or None if the stream did not end properly ([DONE] after a finish reason)."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
        async with http.stream("POST", "/v1/completions", json=body) as response:
            statuses.append(response.status_code)
            text, chunks, finished = "", 0, False
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return text if finished else None
                if line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return None
                    text += chunk["choices"][0]["text"]
                    finished = finished or chunk["choices"][0]["finish_reason"] is not None
                    chunks += 1
                    if hang_up_after is not None and chunks >= hang_up_after:
                        return text
        return None

    async def bad(http, kind: str) -> None:
        json_headers = {"Content-Type": "application/json"}
        if kind == "malformed":
            response = await http.post("/v1/completions", content=b'{"prompt": "x", ', headers=json_headers)
        elif kind == "surrogate":
            response = await http.post("/v1/completions", content=b'{"prompt": "a\\ud800b"}', headers=json_headers)
        elif kind == "too large":
            response = await http.post("/v1/completions", json={"prompt": "x" * 5_000_000})
        elif kind == "large input":
            response = await http.post("/tokenize", json={"inputs": PROMPT.format(i=0) * 12_000})
        else:  # a sampling setting that sends the seen tokens' scores to infinity: fails its own row
            response = await http.post("/generate", json={"inputs": PROMPT.format(i=1), "parameters": {
                "do_sample": True, "repetition_penalty": 1e-300, "max_new_tokens": max_tokens}})
        statuses.append(response.status_code)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        alone = [await stream(http, p, None) for p in prompts[:16]]
        await asyncio.gather(*(stream(http, p, None) for p in prompts))  # the full batch's working set, no faults
        await asyncio.sleep(1)
        rss_before = rss(pid)
        statuses.clear()
        results = await asyncio.gather(
            *(stream(http, p, None) for p in prompts[:16]), *(stream(http, p, 3) for p in prompts[16:]),
            *(bad(http, kind) for kind in ("malformed", "surrogate", "too large", "large input", "sampling")))
        good = results[:16]
        idle_after_streams = await idle_after(http, time.monotonic())

        async def abandon(i: int) -> None:
            with contextlib.suppress(httpx.TimeoutException):
                await http.post("/v1/completions", timeout=0.5, json={"prompt": prompts[i], "max_tokens": 1000,
                                                                      "temperature": 0, "ignore_eos": True})

        await asyncio.gather(*(abandon(i) for i in range(12)))
        idle_after_abandon = await idle_after(http, time.monotonic())
        await asyncio.sleep(2)
        rss_after = rss(pid)
    return {"requests": len(statuses), "5xx": sum(s >= 500 for s in statuses),
            "answered_4xx": sum(400 <= s < 500 for s in statuses), "good_clients": len(good),
            "good_completed": sum(g is not None for g in good),
            "good_equal_alone": sum(g == a for g, a in zip(good, alone, strict=True)),
            "good_differing": [[i, a, g] for i, (g, a) in enumerate(zip(good, alone, strict=True)) if g != a],
            "idle_after_streams_s": idle_after_streams, "idle_after_abandon_s": idle_after_abandon,
            "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20}


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, or 1b for a random StarCoderBase-1B shape")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--run", choices=("levels", "faults"), default="levels")
    args = parser.parse_args()
    model = "embedded" if args.model == "embedded" else str(make_checkpoint("starcoderbase-1b", "bfloat16"))
    port = free_port()
    server = start_server(model, port)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(level(url, 1, 1, 8))  # warm-up
        if args.run == "faults":
            result = asyncio.run(faults(url, server.pid, args.max_tokens))
        else:
            results = [asyncio.run(level(url, n, args.requests_per_client, args.max_tokens)) for n in (1, 4, 16)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    name = "embedded model" if args.model == "embedded" else "StarCoderBase-1B shape, random, bf16"
    RESULTS.mkdir(exist_ok=True)
    if args.run == "faults":
        r = result
        print(f"{name}; 32 streams (16 hang up after 3 chunks) + 5 bad requests at once, then 12 abandoned")
        print(f"  requests answered           {r['requests']}, of which 4xx {r['answered_4xx']}")
        print(f"  5xx                         {r['5xx']} (target 0)")
        print(f"  good clients completed      {r['good_completed']}/{r['good_clients']} (target all), "
              f"same text as alone {r['good_equal_alone']}/{r['good_clients']}")
        print(f"  idle after the streams      {r['idle_after_streams_s']:.2f} s")
        print(f"  idle after the abandonment  {r['idle_after_abandon_s']:.2f} s (target <= 1 s)")
        print(f"  server RSS before / after   {r['rss_before_mb']:.0f} / {r['rss_after_mb']:.0f} MB "
              f"({r['rss_after_mb'] / r['rss_before_mb']:.2f}x, target <= 1.10x)")
        (RESULTS / f"serving-faults-{args.model}.json").write_text(json.dumps(result, indent=2))
        return
    print(f"{name}; {args.requests_per_client} requests per client, {args.max_tokens} new tokens each, greedy, "
          f"{os.cpu_count()} cores")
    print(f"{'clients':>8}{'requests':>10}{'tokens/s':>11}{'vs 1 client':>13}{'p50 (s)':>10}{'p99 (s)':>10}")
    for r in results:
        print(f"{r['clients']:8d}{r['requests']:10d}{r['tokens_per_second']:11.1f}"
              f"{r['tokens_per_second'] / results[0]['tokens_per_second']:12.2f}x{r['p50_seconds']:10.2f}"
              f"{r['p99_seconds']:10.2f}")
    (RESULTS / f"serving-{args.model}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
