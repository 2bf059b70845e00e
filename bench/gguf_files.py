"""GGUF in and out (issue 18): our exports run in llama.cpp, and llama.cpp's files run here.

    python bench/gguf_files.py [--rounds 2] [--prompt 512] [--new 64]

Greedy agreement, on the embedded model (trained weights, so its greedy choices have margins; random weights
make near-ties that any rounding flips): `starcoder export` writes it as bf16, q8_0, q4_0 and q4_k_m; llama-server
(built from the llama-cpp-python sdist, see llamacpp.py) generates greedy tokens from each file for a few code
prompts, given as token ids. Compared with: ours on the same file (float32 compute, as llama.cpp's CPU path), and
llama-server on llama.cpp's own conversion of the same weights (convert_hf_to_gguf.py bf16 and q8_0, then
llama-quantize q4_0 and q4_k_m). llama-server's /tokenize is compared with our tokenizer on the prompts too.

Speed, on a random StarCoderBase-1B-shaped checkpoint: llama.cpp's own q8_0 and q4_0 files (and our q4_0
export), loaded by us in a fresh process (load seconds, peak RSS against the file size, prefill, decode) and by
llama-bench, sides alternating, best of --rounds.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import llamacpp
import vs_llamacpp
from common import RESULTS, free_port, make_checkpoint, run_child, running
from common import parser as common_parser

PROMPTS = [
    'import os\n\n\ndef list_python_files(directory):\n    """Return the paths of the .py files under it."""\n',
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<fim_prefix>def mean(values):\n    total = <fim_suffix>\n    return total / len(values)\n<fim_middle>",
]
QUANTS = ("bf16", "q8_0", "q4_0", "q4_k_m")
ENDS: set[int] = set()  # the embedded model's end-of-generation ids, set in greedy_check


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def llama_greedy(gguf: Path, prompts: list[list[int]], new: int, texts: list[str]) -> tuple[list[list[int]], bool]:
    """Greedy continuations from llama-server, and whether its tokenizer agrees with ours on the prompt texts."""
    port = free_port()
    with running(llamacpp.start_server(gguf, port, parallel=1, context=1024)):
        outs = [post(port, "/completion", {"prompt": ids, "n_predict": new, "temperature": 0, "top_k": 1,
                                           "cache_prompt": False, "return_tokens": True})["tokens"]
                for ids in prompts]
        tokenized = [post(port, "/tokenize", {"content": text, "parse_special": True})["tokens"] for text in texts]
    return outs, tokenized == prompts


def our_verdict(gguf: Path, prompts: list[list[int]], theirs: list[list[int]]) -> str:
    """Whether our model, on the same file in float32, picks llama.cpp's greedy tokens (teacher-forced on them);
    where it does not, how close the tie was: our logit of our token minus our logit of theirs."""
    import torch

    from starcoder import load

    model = load(gguf, dtype="float32").model
    follow, gaps = 0, []
    with torch.inference_mode():
        for ids, tokens in zip(prompts, theirs, strict=True):
            tokens = _until_end(tokens, ENDS)
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : len(ids) - 1 + len(tokens)]
            ours = logits.argmax(-1).tolist()
            miss = next((i for i, (a, b) in enumerate(zip(ours, tokens, strict=True)) if a != b), None)
            if miss is None:
                follow += 1
            else:
                gaps.append(f"at token {miss}, gap {float(logits[miss, ours[miss]] - logits[miss, tokens[miss]]):.4f}")
    return f"{follow}/{len(prompts)} same tokens" + (f" (diverging {'; '.join(gaps)})" if gaps else "")


def _until_end(tokens: list[int], ends: set[int]) -> list[int]:
    """The tokens before the first end-of-generation token (llama-server stops there and leaves it out)."""
    return tokens[: next((i for i, t in enumerate(tokens) if t in ends), len(tokens))]


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """Identical continuations, and the mean length of the common start."""
    a, b = [_until_end(x, ENDS) for x in a], [_until_end(x, ENDS) for x in b]

    def common(x, y):
        n = min(len(x), len(y))
        return next((i for i in range(n) if x[i] != y[i]), n)

    same = sum(x == y for x, y in zip(a, b, strict=True))
    return f"{same}/{len(a)} identical, common start {sum(map(common, a, b)) / len(a):.0f} tokens"


def greedy_check(new: int) -> None:
    from starcoder.gguf_weights import export_model
    from starcoder.paths import default_model_dir
    from starcoder.tokenizer import load_tokenizer

    model = default_model_dir()
    tokenizer = load_tokenizer(model)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    ENDS.update(tokenizer.token_id(t) for t in ("<|endoftext|>", "<file_sep>", "<fim_pad>", "<repo_name>")
                if tokenizer.token_id(t) is not None)
    theirs = {kind: llamacpp.convert(model, RESULTS / f"embedded-llamacpp-{kind}.gguf", kind)
              for kind in ("bf16", "q8_0")}
    for kind in ("q4_0", "q4_k_m"):
        theirs[kind] = RESULTS / f"embedded-llamacpp-{kind}.gguf"
        if not theirs[kind].exists():
            subprocess.run([str(llamacpp.build() / "llama-quantize"), str(theirs["bf16"]), str(theirs[kind]),
                            kind.upper()], check=True, capture_output=True)
    print(f"embedded model, {len(PROMPTS)} code prompts, {new} greedy tokens (stopping at <|endoftext|>)")
    for kind in QUANTS:
        ours_file = export_model(model, RESULTS / f"embedded-ours-{kind}.gguf", kind)
        on_ours, tokenizer_agrees = llama_greedy(ours_file, prompts, new, PROMPTS)
        on_theirs, _ = llama_greedy(theirs[kind], prompts, new, PROMPTS)
        print(f"  {kind:7} llama.cpp on our file, against ours on it: {our_verdict(ours_file, prompts, on_ours)}; "
              f"against llama.cpp on its own file: {agreement(on_ours, on_theirs)}; llama.cpp's tokenizer from our "
              f"file {'agrees' if tokenizer_agrees else 'DISAGREES'}")


def speed(rounds: int, prompt: int, new: int) -> None:
    import torch

    from starcoder.gguf_weights import export_model

    bf16 = make_checkpoint("starcoderbase-1b", "bfloat16")
    files, _ = vs_llamacpp.llama_weights("starcoderbase-1b", bf16)
    ours_q4 = RESULTS / "starcoderbase-1b-ours-q4_0.gguf"
    if not ours_q4.exists():
        start = time.perf_counter()
        export_model(bf16, ours_q4, "q4_0")
        print(f"starcoder export --quant q4_0 of the 1B shape: {time.perf_counter() - start:.0f} s")
    rows = {"llama.cpp q8_0": files["q8_0"], "llama.cpp q4_0": files["q4_0"], "ours q4_0 (export)": ours_q4}
    threads = torch.get_num_threads()
    results: dict[str, dict[str, list]] = {name: {"ours": [], "llama.cpp": []} for name in rows}
    for round_ in range(rounds):
        for name, path in rows.items():
            for side in (("ours", "llama.cpp") if round_ % 2 == 0 else ("llama.cpp", "ours")):
                if side == "ours":
                    run = run_child(str(Path(__file__).with_name("quantization.py")), "speed",
                                    ["--path", str(path), "--prompt", str(prompt), "--new", str(new)])
                else:
                    run = vs_llamacpp.llama_bench(path, prompt, new, threads)
                results[name][side].append(run)
                print(name, side, json.dumps(run), flush=True)
    print(f"\nStarCoderBase-1B shape, random weights; {threads} threads, prompt {prompt}, {new} new tokens, batch 1; "
          f"fresh process per measurement, best of {rounds}, sides alternating")
    print(f"{'file':<22}{'MB':>7}{'our load s':>12}{'our peak RSS MB':>17}{'prefill ours / llama':>24}"
          f"{'decode ours / llama':>24}")
    for name, path in rows.items():
        o, ll = results[name]["ours"], vs_llamacpp.best(results[name]["llama.cpp"])
        load_s, peak = min(r["load_seconds"] for r in o), min(r["peak_rss"] for r in o)
        o = vs_llamacpp.best(o)
        print(f"{name:<22}{path.stat().st_size / 1e6:>7.0f}{load_s:>12.1f}{peak / 1e6:>17.0f}"
              f"{o['prefill']:>10.0f} / {ll['prefill']:<6.0f}({o['prefill'] / ll['prefill']:.2f}x)"
              f"{o['decode']:>8.1f} / {ll['decode']:<6.1f}({o['decode'] / ll['decode']:.2f}x)")


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--part", choices=["greedy", "speed", "both"], default="both")
    args = parser.parse_args()
    if args.part in ("greedy", "both"):
        greedy_check(48)
    if args.part in ("speed", "both"):
        speed(args.rounds, args.prompt, args.new)


if __name__ == "__main__":
    main()
