"""Editor latency against llama.cpp's llama-server on the same weights (issue 15).

    python bench/editor.py [--preset starcoderbase-1b] [--rounds 2] [--keystrokes 20] [--cache-reuse N]
                           [--parts keystrokes head-of-line]

Both servers get the same token ids on their llama.cpp-style `/completion` route (prompt caching on, greedy,
exactly `n_predict` tokens with `ignore_eos`), with 2 slots each, on a random checkpoint of the preset's shape
converted for llama.cpp by its own `convert_hf_to_gguf.py` (bf16). Sides alternate, each in a fresh process.

- Keystroke replay: a line of a real file typed one character at a time, a fill-in-the-middle request per
  keystroke (PSM, ~1,200 tokens of prefix, ~200 of suffix, 16 new tokens), one after another: median and p95
  latency per keystroke. Two files: CPython's textwrap.py and a JavaScript file. Target: median <= 0.5x
  llama-server's.
- Head-of-line: a stream decodes 200 tokens; after its 20th a 2,000-token prompt arrives. Reported: the stream's
  longest gap between tokens from then on, its median gap, and the long prompt's time to answer. Target: longest
  gap <= 3x the median gap.

--cache-reuse N gives both servers the option of that name (RoPE models only, so a StarCoder2 preset): the kept
prompt's tokens after an edit are taken at their new positions, keys re-rotated, when at least N of them match.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import llamacpp
from common import RESULTS, free_port, make_checkpoint, running
from common import parser as common_parser

SIDES = ("starcoder", "llama.cpp")


def start_ours(model_dir: Path, port: int, extra: list[str]) -> subprocess.Popen:
    from serving import start_server  # same launcher as the serving benchmark

    return start_server(str(model_dir), port, extra=["--max-batch", "2", *extra])


def javascript_file() -> Path:
    candidates = sorted(Path("/usr/lib/node_modules/npm/node_modules").rglob("*.js"), key=lambda p: -p.stat().st_size)
    for path in candidates:
        text = path.read_text(errors="replace")
        if 20_000 < len(text) < 200_000 and text.count("\n") > 400:
            return path
    raise RuntimeError("no JavaScript file of a useful size under /usr/lib/node_modules/npm")


def keystroke_prompts(tokenizer, path: Path, keystrokes: int) -> list[list[int]]:
    """FIM prompts (token ids) for typing one line of `path`: ~1,200 prefix tokens ending in the line typed so
    far, ~200 suffix tokens after it. The prefix starts at a fixed place, so it only grows at its end."""
    text = path.read_text(errors="replace")
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    # the first line of some length that has about 1,200 tokens before it
    first = next(i for i in range(len(lines)) if len(tokenizer.encode(text[: starts[i]])) > 1400)
    row = next(i for i in range(first, len(lines)) if len(lines[i].strip()) >= keystrokes + 8)
    line_start, line = starts[row], lines[row].rstrip("\n")
    prefix_start = next(s for s in starts if len(tokenizer.encode(text[s:line_start])) <= 1200)
    suffix_ids = tokenizer.encode("\n" + text[starts[row + 1] :])[:200]
    fim = [tokenizer.token_id(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    indent = len(line) - len(line.lstrip())
    return [[fim[0], *tokenizer.encode(text[prefix_start:line_start] + line[: indent + k]), fim[1], *suffix_ids,
             fim[2]] for k in range(1, keystrokes + 1)]


async def keystroke_replay(url: str, prompts: list[list[int]]) -> list[float]:
    import httpx

    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        for ids in prompts:
            start = time.perf_counter()
            response = await http.post("/completion", json={"prompt": ids, "n_predict": 16, "temperature": 0,
                                                            "cache_prompt": True, "ignore_eos": True})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


async def head_of_line(url: str, short: list[int], long: list[int]) -> dict:
    import httpx

    arrivals: list[float] = []
    answered: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def long_request() -> None:
            start = time.perf_counter()
            response = await http.post("/completion", json={"prompt": long, "n_predict": 8, "temperature": 0,
                                                            "cache_prompt": True, "ignore_eos": True})
            response.raise_for_status()
            answered["seconds"] = time.perf_counter() - start

        sent = None
        body = {"prompt": short, "n_predict": 200, "temperature": 0, "stream": True, "ignore_eos": True}
        async with http.stream("POST", "/completion", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                arrivals.append(time.perf_counter())
                if len(arrivals) == 20:
                    sent = asyncio.ensure_future(long_request())
        await sent
    gaps = [b - a for a, b in zip(arrivals[19:], arrivals[20:], strict=False)]
    return {"max_gap": max(gaps), "median_gap": statistics.median(gaps), "long_prompt_seconds": answered["seconds"]}


def drafts_taken(url: str) -> tuple[int, int]:
    """Our server's speculation counters: tokens drafted, and kept."""
    import httpx

    values = dict(line.rsplit(" ", 1) for line in httpx.get(f"{url}/metrics").text.splitlines()
                  if line.startswith("starcoder_draft_tokens"))
    return int(values["starcoder_draft_tokens_total"]), int(values["starcoder_draft_tokens_accepted_total"])


def measure(side: str, model_dir: Path, gguf: Path, workloads: dict, extra: dict[str, list[str]]) -> dict:
    port = free_port()
    server = (start_ours(model_dir, port, extra[side]) if side == "starcoder"
              else llamacpp.start_server(gguf, port, context=4096, extra=extra[side]))
    url = f"http://127.0.0.1:{port}"
    with running(server):
        asyncio.run(keystroke_replay(url, [workloads["warm"]]))
        before = drafts_taken(url) if side == "starcoder" else (0, 0)
        result = {name: asyncio.run(keystroke_replay(url, prompts)) for name, prompts in workloads["files"].items()}
        if side == "starcoder":  # during the keystrokes
            result["drafts"] = [after - was for after, was in zip(drafts_taken(url), before, strict=True)]
        if "long" in workloads:
            result["head_of_line"] = asyncio.run(head_of_line(url, workloads["short"], workloads["long"]))
        return result


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keystrokes", type=int, default=20)
    parser.add_argument("--cache-reuse", type=int, default=0, metavar="N")
    parser.add_argument("--speculate", choices=["none", "ngram"], default="none",
                        help="ngram: our prompt lookup, and llama-server's ngram-mod (shared across requests)")
    parser.add_argument("--parts", nargs="+", choices=["keystrokes", "head-of-line"],
                        default=["keystrokes", "head-of-line"])
    args = parser.parse_args()
    import textwrap

    from starcoder import load_tokenizer

    model_dir = make_checkpoint(args.preset, args.dtype)
    gguf = llamacpp.convert(model_dir, RESULTS / f"{args.preset}-{args.dtype}.gguf", "bf16")
    tokenizer = load_tokenizer(model_dir)
    files = {"textwrap.py": Path(textwrap.__file__), "javascript": javascript_file()}
    if "keystrokes" not in args.parts:
        files = {}
    workloads = {"files": {name: keystroke_prompts(tokenizer, path, args.keystrokes) for name, path in files.items()},
                 "warm": tokenizer.encode("def f(x):\n    return x\n")}
    if "head-of-line" in args.parts:
        workloads["short"] = tokenizer.encode(Path(textwrap.__file__).read_text()[:400])[:100]
        workloads["long"] = tokenizer.encode(Path(json.__file__).read_text() * 4)[:2000]
    reuse = ["--cache-reuse", str(args.cache_reuse)] if args.cache_reuse else []
    extra = {side: list(reuse) for side in SIDES}
    if args.speculate == "ngram":  # llama-server's defaults want 48-64-token drafts; a keystroke asks for 16
        extra["starcoder"] += ["--speculate", "ngram"]
        extra["llama.cpp"] += ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "8",
                               "--spec-ngram-mod-n-min", "2", "--spec-ngram-mod-n-max", "15"]
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in SIDES:
            runs[side].append(measure(side, model_dir, gguf, workloads, extra))

    def best(side: str, name: str) -> list[float]:  # the round with the lowest median
        return min((r[name] for r in runs[side]), key=statistics.median)

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(q * len(values)))]

    options = f"; --cache-reuse {args.cache_reuse} on both" if args.cache_reuse else ""
    options += "; n-gram speculation on both" if args.speculate == "ngram" else ""
    print(f"{args.preset}, random, {args.dtype}; {args.keystrokes} keystrokes per file, 16 new tokens each; "
          f"best of {args.rounds} alternating rounds{options}; {files.get('javascript', '')}")
    print(f"{'keystroke latency (s)':34}{'ours':>10}{'llama.cpp':>11}{'ratio':>8}")
    summary = {}
    for name in files:
        ours, theirs = best("starcoder", name), best("llama.cpp", name)
        for label, q in (("median", 0.5), ("p95", 0.95)):
            a, b = pct(ours, q), pct(theirs, q)
            summary[f"{name} {label}"] = (a, b)
            print(f"{name + ' ' + label:34}{a:10.3f}{b:11.3f}{a / b:7.2f}x")
    if args.speculate == "ngram" and files:
        for i, r in enumerate(runs["starcoder"], 1):
            drafted, kept = r["drafts"]
            generated = 16 * sum(len(prompts) for prompts in workloads["files"].values())
            print(f"round {i}, ours: {kept} of {drafted} drafted tokens kept ({kept / max(drafted, 1):.0%}); "
                  f"{kept} of {generated} keystroke tokens came from drafts")
    if "long" in workloads:
        print(f"{'head-of-line (s)':34}{'ours':>10}{'llama.cpp':>11}")
        hol = {side: min((r["head_of_line"] for r in runs[side]), key=lambda h: h["max_gap"]) for side in SIDES}
        for key in ("max_gap", "median_gap", "long_prompt_seconds"):
            print(f"{key:34}{hol['starcoder'][key]:10.3f}{hol['llama.cpp'][key]:11.3f}")
        for side in SIDES:
            print(f"{side}: longest gap / median gap = {hol[side]['max_gap'] / hol[side]['median_gap']:.1f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"editor-{args.preset}.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
