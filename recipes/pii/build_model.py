"""Build the shipped PII model (`starcoder prepare --pii-model default`): a StarPII-format token classifier.

    python recipes/pii/build_model.py [--work /tmp/starcoder-pii] [--stage all|data|train|export]

data    labelled documents in BigCode's PII dataset format (synthesize.py): 24,000 for training, plus the project's
        labelled snippets (tests/data/pii_labelled.txt) twice; 1,000 more, from another seed, for the held-out loss.
        The held-out set the figures are measured on (tests/data/pii_heldout.txt) is never read but to exclude its
        values.
train   `starcoder train` (train.yaml) on a small StarEncoder-shaped encoder (model_config.json: StarEncoder's
        vocabulary and tokenizer, hidden 64, 6 layers) from random weights: there is no pre-trained StarEncoder
        body offline, and at this size the token-classification data teaches what is needed.
export  the final model in float16 with its tokenizer and training history (every 100th step) to
        src/starcoder/assets/pii_model/; recipes/pii/loss.png is the run's loss curve.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
ASSETS = ROOT / "src" / "starcoder" / "assets" / "pii_model"
TRAIN_DOCUMENTS, VAL_DOCUMENTS, LABELLED_COPIES = 24_000, 1_000, 2


def build_data(work: Path) -> None:
    sys.path.insert(0, str(HERE))
    from synthesize import Synth, carriers, document

    from starcoder.data.pii_labels import read_labelled

    code = carriers()
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    labelled = [{"text": text, "fragments": [{"category": f.kind, "position": [f.start, f.end], "value": f.value}
                                             for f in found]}
                for _, text, found in read_labelled(ROOT / "tests" / "data" / "pii_labelled.txt")]
    for split, seed, count, extra in (("train", 0, TRAIN_DOCUMENTS, labelled * LABELLED_COPIES),
                                      ("val", 1, VAL_DOCUMENTS, [])):
        synth = Synth(seed)
        rows = [document(synth, code) for _ in range(count)] + extra
        synth.rng.shuffle(rows)
        with open(data / f"{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{split}: {len(rows)} documents, {sum(len(r['fragments']) for r in rows)} labelled spans")


def train(work: Path) -> None:
    from starcoder.__main__ import main
    from starcoder.train.loop import TrainConfig
    from starcoder.train.loop import train as run

    init = work / "init"
    if not (init / "config.json").is_file() and main(["init", str(init), "--config", str(HERE / "model_config.json"),
                                                      "--force"]) != 0:
        raise SystemExit("init failed")
    config = TrainConfig.from_file(HERE / "train.yaml", {"model": str(init), "data": str(work / "data"),
                                                         "out": str(work / "run")})
    result = run(config)
    print(f"trained {result['steps']} steps; final held-out loss {result['history'][-1].get('val_loss')}")


def export(work: Path) -> None:
    import torch

    from starcoder.checkpoint import save_model
    from starcoder.files import read_settings
    from starcoder.loader import load_model
    from starcoder.tokenizer import load_tokenizer

    final = work / "run" / "final"
    model = load_model(final, dtype="float32").to(torch.float16)
    # positions past the training windows were never trained: the shipped model has only those it learned, so
    # the PII stage reads documents in windows of that length
    trained = read_settings(HERE / "train.yaml")["seq_len"]
    model.config.max_positions = trained
    model.model.pos_embed.weight = torch.nn.Parameter(model.model.pos_embed.weight[:trained].clone())
    shutil.rmtree(ASSETS, ignore_errors=True)
    save_model(model, ASSETS)
    load_tokenizer(final).save(ASSETS)
    history = json.loads((work / "run" / "history.json").read_text())
    thinned = [h for h in history if "val_loss" in h or h["step"] % 100 == 0]  # every 100th step, and each eval
    (ASSETS / "training_history.json").write_text(json.dumps(thinned, indent=1))
    size = sum(p.stat().st_size for p in ASSETS.iterdir()) / 1e6
    print(f"exported to {ASSETS} ({size:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/starcoder-pii"))
    parser.add_argument("--stage", choices=["all", "data", "train", "export"], default="all")
    args = parser.parse_args()
    for stage, run in (("data", build_data), ("train", train), ("export", export)):
        if args.stage in ("all", stage):
            run(args.work)


if __name__ == "__main__":
    main()
