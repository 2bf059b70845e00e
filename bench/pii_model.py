"""The PII stage with a model (issue 19): precision and recall of the shipped model, and MB/s on this machine's
cores against the regex stage.

Quality (--part quality): precision and recall per kind on the project's labelled sets (tests/data/pii_labelled.txt,
which the shipped model trained on, and pii_heldout.txt, which nothing was trained or tuned on) for the regex
stage, the model alone and both combined (`find_pii` with and without `model=`, `regex=`).

Speed (--part speed): StarPII is StarEncoder (BERT: 12 layers, 768 wide, 1,024 positions, vocabulary 49,156) with
a 15-label token classifier. Its weights are not downloadable here, so a random model of exactly that shape stands
in: how fast the stage runs does not depend on the weights, only on the shape and the text. The text is real code:
the rows of bench/data_pipeline.py's corpus (installed permissively licensed packages), --mb of it.

In one run, alternating, best of --rounds: the model detector alone (`PiiModel.find`: tokenize, windows of 512
tokens, forward, spans, post-filters) and the regex stage alone (`find_pii`), each over the same documents, MB/s of
input; the ratio is model / regex.

--model default measures the shipped model's speed instead.

    python bench/pii_model.py [--part quality|speed|all] [--model starpii-shaped|default|DIR] [--mb 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from data_pipeline import build_corpus  # noqa: E402

STARPII_LABELS = ["O", "B-AMBIGUOUS", "I-AMBIGUOUS", "B-EMAIL", "I-EMAIL", "B-IP_ADDRESS", "I-IP_ADDRESS", "B-KEY",
                  "I-KEY", "B-NAME", "I-NAME", "B-PASSWORD", "I-PASSWORD", "B-USERNAME", "I-USERNAME"]


def starpii_shaped(out: Path) -> Path:
    from starcoder.checkpoint import save_model
    from starcoder.config import preset
    from starcoder.model import build_model, init_weights
    from starcoder.tokenizer import Tokenizer

    config = preset("starencoder", head="token_classification", num_labels=len(STARPII_LABELS))
    config.hf_config = {"id2label": {str(i): label for i, label in enumerate(STARPII_LABELS)}}
    torch.manual_seed(0)
    model = build_model(config)
    init_weights(model)
    save_model(model, out)
    Tokenizer.for_family("bert").save(out)
    return out


def documents(megabytes: float) -> list[str]:
    with open(build_corpus(megabytes), encoding="utf-8") as rows:
        return [json.loads(line)["content"] for line in rows]


def quality(location: str) -> None:
    from starcoder.data.pii import KINDS, find_pii
    from starcoder.data.pii_labels import read_labelled, score
    from starcoder.data.pii_model import PiiModel

    model = PiiModel(location)
    detectors = {"regex": find_pii, "model": lambda text: find_pii(text, model=model, regex=False),
                 "both": lambda text: find_pii(text, model=model)}
    for name in ("pii_labelled.txt", "pii_heldout.txt"):
        snippets = read_labelled(Path(__file__).parents[1] / "tests" / "data" / name)
        scores = {detector: score(snippets, find)["kinds"] for detector, find in detectors.items()}
        print(f"\n{name} ({len(snippets)} snippets): precision / recall (labels)")
        print(f"| kind | {' | '.join(detectors)} |\n| --- |{' --- |' * len(detectors)}")
        for kind in KINDS:
            labels = scores["regex"][kind]["true_positives"] + scores["regex"][kind]["false_negatives"]
            cells = [f"{s[kind]['precision']:.2f} / {s[kind]['recall']:.2f}" for s in scores.values()]
            print(f"| {kind} ({labels}) | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["quality", "speed", "all"], default="all")
    parser.add_argument("--model", default="starpii-shaped", help="the model whose speed is measured")
    parser.add_argument("--mb", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.part in ("quality", "all"):
        quality("default")
    if args.part in ("speed", "all"):
        speed(args)


def speed(args: argparse.Namespace) -> None:
    from starcoder.data.pii import find_pii
    from starcoder.data.pii_model import PiiModel

    texts = documents(args.mb)
    size = sum(len(t.encode()) for t in texts)
    with tempfile.TemporaryDirectory() as tmp:
        location = str(starpii_shaped(Path(tmp) / "starpii-shaped")) if args.model == "starpii-shaped" else args.model
        detector = PiiModel(location)
        sides = {"model": detector.find, "regex": find_pii}
        best = {name: 0.0 for name in sides}
        for round_ in range(args.rounds):
            for name in (("model", "regex") if round_ % 2 == 0 else ("regex", "model")):
                start = time.perf_counter()
                found = sum(len(sides[name](text)) for text in texts)
                rate = size / 1e6 / (time.perf_counter() - start)
                best[name] = max(best[name], rate)
                print(f"round {round_ + 1} {name}: {rate:.4g} MB/s ({found} findings)", flush=True)
    threads = torch.get_num_threads()
    print(f"\n{len(texts)} files, {size / 1e6:.1f} MB of code; {threads} threads; best of {args.rounds}")
    print(f"{args.model} model: {best['model']:.4g} MB/s; regex stage: {best['regex']:.4g} MB/s; "
          f"model / regex {best['model'] / best['regex']:.4g}x")


if __name__ == "__main__":
    main()
