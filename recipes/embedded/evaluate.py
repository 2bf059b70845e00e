"""Evaluate the embedded model on its held-out test split, for MODEL_CARD.md.

    python recipes/embedded/evaluate.py [--model src/starcoder/assets/model] [--work /tmp/starcoder-embedded]

  held-out loss     mean next-token cross-entropy over the test split (512-token windows, no FIM), and its
                    perplexity
  function bodies   100 functions from held-out files: the prompt is the file up to the end of the function's
                    signature (and docstring), trailing whitespace stripped as HumanEval prompts are (a newline
                    and the next line's indentation are one token, so a prompt ending in a bare newline would
                    be out of distribution); greedy completion of at most 128 tokens, cut where the body ends
                    (the first non-blank line indented no deeper than the `def`); the function must parse with ast
  FIM examples      a line masked in held-out functions, filled in greedily
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import random
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).parent


def held_out_loss(model, data: Path) -> dict:
    from starcoder.train.data import TokenDataset

    dataset = TokenDataset(data / "test", seq_len=512)
    total, count = 0.0, 0
    with torch.inference_mode():
        for first in range(0, len(dataset), 8):
            batch = torch.from_numpy(np.stack([dataset[i] for i in range(first, min(first + 8, len(dataset)))]))
            logits = model(batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total, count = total + float(loss), count + batch[:, 1:].numel()
    return {"tokens": count, "loss": total / count, "perplexity": math.exp(total / count)}


def held_out_sources() -> list[tuple[str, str]]:
    """(name, source) of every held-out (test split) file of the corpus the model was trained on (the shipped
    corpus, as it left the data pipeline)."""
    sys.path.insert(0, str(HERE))
    from build import TEST, VAL

    from starcoder.attribution.index import embedded_corpus
    from starcoder.train.data import read_corpus, split_of

    return [(f"{d.repo}/{d.path}", d.content) for d in read_corpus([embedded_corpus()])
            if split_of(d, VAL, TEST) == "test"]


def function_prompts(sources, count: int, seed: int = 0) -> list[dict]:
    """Functions with a body of 2-15 lines: the prompt up to the body, and the indentation of the def."""
    found = []
    for name, source in sources:
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.body:
                continue
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(
                getattr(node.body[0], "value", None), ast.Constant) and len(node.body) > 1 else node.body
            start, end = body[0].lineno - 1, node.end_lineno
            if not 2 <= end - start <= 15 or node.decorator_list:
                continue
            found.append({"file": name, "prompt": "".join(lines[:start]), "def_line": lines[node.lineno - 1],
                          "header": "".join(lines[node.lineno - 1 : start]),
                          "indent": len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip()),
                          "body": "".join(lines[start:end])})
    random.Random(seed).shuffle(found)
    return found[:count]


def body_of(completion: str, indent: int) -> str:
    """The completion up to the first non-blank line indented no deeper than the def (its first line is the rest
    of the signature's line, normally empty)."""
    first, *rest = completion.splitlines(keepends=True) or [""]
    kept = [first]
    for line in rest:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        kept.append(line)
    return "".join(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(HERE.parent.parent / "src" / "starcoder" / "assets" / "model"))
    parser.add_argument("--work", default="/tmp/starcoder-embedded", type=Path)
    parser.add_argument("--out", default=str(HERE / "evaluation.json"))
    args = parser.parse_args()

    import starcoder
    from starcoder.generate import Request, SamplingParams, generate

    sc = starcoder.load(args.model, dtype="float32")
    plain = starcoder.load_model(args.model, dtype="float32")
    results = {"held_out": held_out_loss(plain, args.work / "data")}

    functions = function_prompts(held_out_sources(), 100)
    params = SamplingParams(max_new_tokens=128, truncate=True)
    requests = [Request(sc.tokenizer.encode(f["prompt"].rstrip())[-(4096 - 129):], params) for f in functions]
    completions = generate(sc.model, sc.tokenizer, requests)
    parsed, samples = 0, []
    for f, (c,) in zip(functions, completions, strict=True):
        body = body_of(c.text, f["indent"])
        source = textwrap.dedent(f["header"].rstrip() + body)
        try:
            ast.parse(source)
            ok = bool(body.strip())
        except SyntaxError:
            ok = False
        parsed += ok
        if len(samples) < 3:
            samples.append({"file": f["file"], "signature": f["header"].rstrip(), "completion": body, "parses": ok})
    results["function_bodies"] = {"functions": len(functions), "parse_fraction": parsed / max(1, len(functions)),
                                  "examples": samples}

    fim = []
    for f in functions[:5]:
        body_lines = f["body"].splitlines(keepends=True)
        if len(body_lines) < 3:
            continue
        k = len(body_lines) // 2
        prefix = f["header"] + "".join(body_lines[:k])
        suffix = "".join(body_lines[k + 1 :])
        middle = sc.infill(prefix[-2000:], suffix[:2000], max_new_tokens=48).text
        fim.append({"prefix_tail": "".join(prefix.splitlines(keepends=True)[-3:]), "expected": body_lines[k],
                    "generated": middle, "suffix_head": "".join(suffix.splitlines(keepends=True)[:2])})
    results["fim_examples"] = fim[:3]
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "fim_examples"}, indent=2)[:3000])


if __name__ == "__main__":
    main()
