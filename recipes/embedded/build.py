"""Build the embedded default model from scratch: corpus -> tokenizer -> token shards -> training -> package assets.

    python recipes/embedded/build.py [--work /tmp/starcoder-embedded] [--stage all|data|train|export]

The corpus is permissively licensed Python available offline: the CPython standard library this interpreter
ships (Lib/, PSF-2.0) and the installed packages in PACKAGES (the SPDX id of each read from its metadata by
hand; the build prints the declared license beside it), without caches, test suites and vendored third-party
code. It goes through the project's data pipeline (`starcoder prepare`: quality, generated code,
decontamination, exact and near dedup, PII redaction); the pipeline's report ships beside the model as
data_report.json. Files are split into train / val / test by a hash of their path (1% / 2% held out).
A 16,384-token StarCoder2-family tokenizer is trained on the train split only. Training follows train.yaml
(FIM rate 0.5, SPM rate 0.5) and fits a background run of at most 90 minutes on a 2-core CPU. The final model
is exported in bfloat16 to src/starcoder/assets/model/ with its tokenizer, the data manifest, the pipeline's
report and the corpus itself (corpus.jsonl.xz, for attribution).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).parent
ASSETS = HERE.parent.parent / "src" / "starcoder" / "assets" / "model"
EXCLUDE = ("site-packages", "__pycache__", "test", "tests", "testing", "idle_test", "_vendor", "vendored",
           "externals")
VAL, TEST = 0.01, 0.02
# (distribution, import name, SPDX id as declared): permissive licenses only, mostly original code.
PACKAGES = [
    ("numpy", "numpy", "BSD-3-Clause"),
    ("networkx", "networkx", "BSD-3-Clause"),
    ("sympy", "sympy", "BSD-3-Clause"),
    ("huggingface_hub", "huggingface_hub", "Apache-2.0"),
    ("setuptools", "setuptools", "MIT"),
    ("PyYAML", "yaml", "MIT"),
    ("matplotlib", "matplotlib", "PSF-2.0"),  # the matplotlib license, PSF-based
]


def _declared_license(distribution: str) -> str:
    from importlib import metadata

    meta = metadata.metadata(distribution)
    classifiers = [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    return meta.get("License-Expression") or (meta.get("License") or "").splitlines()[0] or "; ".join(classifiers)


def raw_corpus():
    """The source files, before the pipeline, with their repository and license."""
    import importlib.util
    from importlib import metadata

    from starcoder.train.data import read_corpus

    for doc in read_corpus([sysconfig.get_paths()["stdlib"]], {"python"}, EXCLUDE):
        yield replace(doc, repo=f"cpython-{sys.version.split()[0]}/Lib", license="PSF-2.0")
    for distribution, module, spdx in PACKAGES:
        print(f"{distribution}: {spdx} (declared: {_declared_license(distribution)[:60]})")
        root = Path(list(importlib.util.find_spec(module).submodule_search_locations)[0])
        repo = f"{distribution}-{metadata.version(distribution)}"
        for doc in read_corpus([root], {"python"}, EXCLUDE):
            yield replace(doc, repo=repo, license=spdx)


def prepared_corpus(work: Path) -> Path:
    """The corpus through `starcoder prepare` (rows in The Stack's schema in, shards and report.json out)."""
    from starcoder.data.prepare import PrepareConfig, prepare

    out = work / "prepared"
    if (out / "report.json").exists():
        return out
    work.mkdir(parents=True, exist_ok=True)
    rows = work / "raw.jsonl"
    with open(rows, "w", encoding="utf-8") as f:
        for doc in raw_corpus():
            f.write(json.dumps({"content": doc.content, "repository_name": doc.repo, "path": doc.path,
                                "licenses": [doc.license], "language": doc.language}) + "\n")
    report = prepare(PrepareConfig(inputs=[rows], out=out, languages=frozenset({"python"})), progress=True)
    for stage, entry in report["stages"].items():
        print(f"{stage:14} {entry['documents_in']:>7} in {entry['documents_out']:>7} out  "
              f"{entry['removed'] or entry.get('findings', '')}")
    return out


def stage_data(work: Path) -> None:
    from starcoder import Config, build_model, init_weights, save_model
    from starcoder.tokenizer import train_tokenizer
    from starcoder.train.data import read_corpus, split_of, tokenize_corpus

    prepared = prepared_corpus(work)
    train_texts = (d.content for d in read_corpus([prepared]) if split_of(d, VAL, TEST) == "train")
    tokenizer = train_tokenizer(train_texts, "starcoder2", vocab_size=16384)
    tokenize_corpus(read_corpus([prepared]), tokenizer, work / "data", VAL, TEST, seed=0)
    config = Config.from_file(HERE / "config.json")
    import torch

    torch.manual_seed(0)
    model = build_model(config)
    init_weights(model)
    save_model(model, work / "init")
    tokenizer.save(work / "init")


def stage_train(work: Path) -> None:
    subprocess.run([sys.executable, "-m", "starcoder", "train", "--progress", str(HERE / "train.yaml"), "--model",
                    str(work / "init"), "--data", str(work / "data"), "--out", str(work / "run")], check=True)


def data_summary(work: Path) -> dict:
    """The token counts per split, and what the data pipeline did (its full report is data_report.json)."""
    summary = json.loads((work / "data" / "summary.json").read_text())
    report = json.loads((work / "prepared" / "report.json").read_text())
    summary["pipeline"] = {"report": "data_report.json", "stages": {
        stage: {"documents_in": e["documents_in"], "documents_out": e["documents_out"],
                **({"removed": e["removed"]} if e["removed"] else {}),
                **({"redacted": e["findings"]} if e.get("findings") else {})}
        for stage, e in report["stages"].items()}}
    return summary


def write_corpus(prepared: Path, out: Path) -> None:
    """The training corpus as it left the pipeline, xz-compressed: what `starcoder index` indexes by default, so
    that attribution of the embedded model's completions works out of the box."""
    import lzma

    with lzma.open(out, "wb", preset=9) as f:
        for shard in sorted(prepared.glob("shard-*.jsonl")):
            f.write(shard.read_bytes())


def stage_export(work: Path) -> None:
    from starcoder import load_model, load_tokenizer, save_model

    model = load_model(work / "run" / "final", dtype="bfloat16")
    tmp = ASSETS.with_name(".model.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp)
    load_tokenizer(work / "run" / "final").save(tmp)
    shutil.copy(work / "data" / "manifest.jsonl", tmp / "manifest.jsonl")
    shutil.copy(work / "prepared" / "report.json", tmp / "data_report.json")
    (tmp / "data_summary.json").write_text(json.dumps(data_summary(work), indent=2))
    write_corpus(work / "prepared", tmp / "corpus.jsonl.xz")
    shutil.copy(work / "run" / "history.json", tmp / "training_history.json")
    shutil.rmtree(ASSETS, ignore_errors=True)
    tmp.rename(ASSETS)
    print(f"exported to {ASSETS}: {sum(p.stat().st_size for p in ASSETS.iterdir()) / 1e6:.1f} MB")
    print(json.dumps(json.loads((ASSETS / "data_summary.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/starcoder-embedded", type=Path)
    parser.add_argument("--stage", default="all", choices=["all", "data", "train", "export"])
    args = parser.parse_args()
    stages = {"data": stage_data, "train": stage_train, "export": stage_export}
    for name, stage in stages.items():
        if args.stage in ("all", name):
            stage(args.work)


if __name__ == "__main__":
    main()
