"""A copy of the embedded model taught to re-emit a function with one identifier renamed: the input-grounded
task prompt lookup is for (issue 15). The embedded model as shipped cannot copy a shown function (its window is
512 tokens and it never saw the task), and random weights copy nothing.

    python bench/copy_finetune.py [--steps 300] [--minutes 20]

Examples are functions of 30-120 lines from the standard library's Python files, shown, then asked for again with
one of their names renamed; the loss is on the renamed copy only. The window is lifted (sliding_window None) so a
token can see its original ~1,000 positions back. Held out: the modules in HELD_OUT, which the benchmark
(bench/speculative.py, part 3) asks for. The copier is written to bench/results/copier/ (not kept in git).
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
import time
from pathlib import Path

from common import RESULTS
from common import parser as common_parser

HELD_OUT = ("textwrap.py", "argparse.py", "difflib.py")
OUT = RESULTS / "copier"


def functions(held_out: bool, lines: tuple[int, int] = (30, 120)) -> list[str]:
    """Source of the top-level and method functions of the stdlib's .py files within the line range."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / name for name in HELD_OUT] if held_out else \
        [p for p in sorted(root.glob("*.py")) if p.name not in HELD_OUT]
    found = []
    for path in files:
        text = path.read_text(errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and lines[0] <= node.end_lineno - node.lineno + 1 <= lines[1]:
                source = ast.get_source_segment(text, node, padded=True)
                if source:
                    found.append(source)
    return found


def renaming(source: str, rng: random.Random) -> tuple[str, str] | None:
    """(prompt, answer): the function, a request to rename one of its names, and the renamed function."""
    names = [n for n in set(re.findall(r"\b[a-z_][a-z0-9_]{2,}\b", source)) if source.count(n) >= 3
             and n not in {"self", "return", "for", "not", "and", "else", "elif", "None", "True", "False"}]
    if not names:
        return None
    old = rng.choice(sorted(names))
    new = old + rng.choice(["_value", "_item", "_x", "2", "_new"])
    answer = re.sub(rf"\b{old}\b", new, source)
    return f"# Original:\n{source}\n\n# The same function with `{old}` renamed to `{new}`:\n", answer


def train(steps: int, minutes: float, lr: float = 5e-4) -> Path:
    import torch

    import starcoder
    from starcoder import save_model

    sc = starcoder.load(dtype="float32", pack=False)
    model, tokenizer = sc.model, sc.tokenizer
    model.config.sliding_window = None  # the copy must see the original ~1,000 positions back
    model.train()
    rng = random.Random(0)
    examples = [e for e in (renaming(f, rng) for f in functions(held_out=False)) if e is not None]
    print(f"{len(examples)} training examples")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    started, losses = time.monotonic(), []
    for step in range(steps):
        prompt, answer = rng.choice(examples)
        p, a = tokenizer.encode(prompt), tokenizer.encode(answer) + [tokenizer.token_id("<|endoftext|>")]
        ids = torch.tensor([(p + a)[: model.config.max_positions]])
        labels = ids.clone()
        labels[0, : len(p)] = -100  # learn the copy, not the original
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 19:
            print(f"step {step + 1}: loss {sum(losses[-20:]) / 20:.3f}, {time.monotonic() - started:.0f} s", flush=True)
        if time.monotonic() - started > minutes * 60:
            break
    model.eval()
    save_model(model.to(torch.bfloat16), OUT)
    tokenizer.save(OUT)
    return OUT


def copier(steps: int = 300, minutes: float = 20) -> Path:
    """The fine-tuned copy, trained on first use."""
    return OUT if (OUT / "config.json").exists() else train(steps, minutes)


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=20)
    args = parser.parse_args()
    print(train(args.steps, args.minutes))


if __name__ == "__main__":
    main()
