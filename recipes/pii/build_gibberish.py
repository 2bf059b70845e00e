"""Train the gibberish model the PII stage uses to tell random secrets from word-like strings.

    python recipes/pii/build_gibberish.py

BigCode trained gibberish-detector's character-bigram model on Norvig's big.txt, which is not available offline.
This trains the same kind of model on English that every Debian machine has: the license texts under
/usr/share/common-licenses and the docstrings and comments of this Python's standard library (so that identifiers
and code words count as word-like too). The model is lower-case letters only; the stage lower-cases what it checks.
"""

from __future__ import annotations

import ast
import io
import string
import sysconfig
import tokenize
from pathlib import Path

from gibberish_detector import serializer, trainer

OUT = Path(__file__).parents[2] / "src" / "starcoder" / "assets" / "gibberish.model"


def english_texts():
    for path in sorted(Path("/usr/share/common-licenses").iterdir()):
        if path.is_file():
            yield path.read_text(errors="replace")
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        source = path.read_text(errors="replace")
        try:
            tree = ast.parse(source)
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, tokenize.TokenError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                yield ast.get_docstring(node) or ""
        yield "\n".join(t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT)


def main() -> None:
    corpus = "\n".join(english_texts()).lower()
    model = trainer.train_on_content(corpus, string.ascii_lowercase)
    OUT.write_text(serializer.serialize(model))
    print(f"trained on {len(corpus) / 1e6:.1f} MB of English -> {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
