"""PII found by a StarPII-format model: a tiny token classifier whose weights are set so that it tags exactly the
tokens of one email address (B-EMAIL, then I-EMAIL) and nothing else, run over windows, post-filtered, and used
by `starcoder prepare --pii-model` beside or instead of the regex stage."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("datasketch")

from starcoder.__main__ import main  # noqa: E402
from starcoder.checkpoint import save_model  # noqa: E402
from starcoder.config import preset  # noqa: E402
from starcoder.data.pii_model import PiiModel, keep  # noqa: E402
from starcoder.model import build_model, init_weights  # noqa: E402
from starcoder.paths import default_model_dir  # noqa: E402
from starcoder.tokenizer import load_tokenizer  # noqa: E402

LABELS = ["O", "B-AMBIGUOUS", "I-AMBIGUOUS", "B-EMAIL", "I-EMAIL", "B-IP_ADDRESS", "I-IP_ADDRESS", "B-KEY", "I-KEY",
          "B-NAME", "I-NAME", "B-PASSWORD", "I-PASSWORD", "B-USERNAME", "I-USERNAME"]  # StarPII's
EMAIL = "dana.wells@quarry.io"
MIT = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software"


def code(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "\n".join(f"value_{rng.randrange(1000)} = compute_{rng.randrange(1000)}({rng.randrange(100)})"
                     for _ in range(lines))


def document(lines_before: int = 3) -> str:
    return code(1, lines_before) + f'\nADMIN = "{EMAIL}"\n' + code(2, 30) + "\n"


@pytest.fixture(scope="module")
def email_model(tmp_path_factory):
    """Every block adds nothing (zero output projections), so each token's state is its own normalized
    embedding: the email's first token points at B-EMAIL, its other tokens at I-EMAIL, every other token at O."""
    tokenizer = load_tokenizer(default_model_dir())
    encoding = tokenizer.encoding(document())
    start = document().index(EMAIL)
    email_ids = [i for i, (a, b) in zip(encoding.ids, encoding.offsets, strict=True)
                 if a < start + len(EMAIL) and b > start]
    others = set(encoding.ids) - set(email_ids)
    assert email_ids and not set(email_ids) & others  # the fixture needs tokens of the address alone
    config = preset("tiny-starencoder", head="token_classification", num_labels=len(LABELS))
    config.hf_config = {"id2label": {str(i): label for i, label in enumerate(LABELS)}}
    model = build_model(config)
    init_weights(model)
    directions = torch.eye(64)[:3] * 8 - 8 / 64  # three zero-mean directions: O, B-EMAIL, I-EMAIL
    with torch.no_grad():
        model.model.embed.weight.copy_(directions[0].expand(config.vocab_size, 64))
        model.model.embed.weight[email_ids[0]] = directions[1]
        model.model.embed.weight[email_ids[1:]] = directions[2]
        model.model.pos_embed.weight.zero_()
        model.model.type_embed.weight.zero_()
        for block in model.model.layers:
            for linear in (block.attn.o, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        for label, direction in ((0, 0), (3, 1), (4, 2)):
            model.classifier.weight[label] = directions[direction]
    out = tmp_path_factory.mktemp("pii") / "email-model"
    save_model(model, out)
    tokenizer.save(out)
    return out


def test_the_model_finds_the_address_in_every_window(email_model):
    detector = PiiModel(str(email_model))
    assert detector.window == 128  # the tiny encoder's positions (this tokenizer has no <cls> / <sep>)
    for lines_before in (0, 3, 20, 40):  # the address in the first window, in a margin, further on
        text = document(lines_before)
        found = detector.find(text)
        assert [(f.kind, f.value, f.detector) for f in found] == [("EMAIL", EMAIL, "model")], lines_before
        assert text[found[0].start : found[0].end] == EMAIL


def test_bigcodes_post_filters():
    assert keep("NAME", "Dana Wells") and not keep("NAME", "Dana")
    assert keep("KEY", "hG7xQ2pLz9Kw4RtY") and not keep("KEY", "hG7xQ2pL") and not keep("KEY", "password_hash")
    assert keep("IP_ADDRESS", "52.14.203.77")
    assert not any(keep("IP_ADDRESS", ip) for ip in ("192.168.0.1", "8.8.8.8", "10.0.0.1", "not.an.ip"))
    assert not keep("USERNAME", "dwells") and not keep("AMBIGUOUS", "anything")
    assert keep("EMAIL", EMAIL) and not keep("EMAIL", "quarry.io") and keep("PASSWORD", "hunter22")


def test_prepare_with_the_model_alone_and_with_the_regexes(email_model, tmp_path):
    tree = tmp_path / "acme"
    tree.mkdir()
    (tree / "LICENSE").write_text(MIT)
    (tree / "settings.py").write_text(document() + 'SERVER = "52.14.203.77"\n')
    for detectors, flags in (("model", ["--no-pii-regex"]), ("both", [])):
        out = tmp_path / detectors
        assert main(["prepare", "--input", str(tree), "--out", str(out), "--workers", "1",
                     "--pii-model", str(email_model), *flags]) == 0
        pii = json.loads((out / "report.json").read_text())["stages"]["pii"]
        content = json.loads((out / "shard-00000.jsonl").read_text())["content"]
        assert EMAIL not in content and 'ADMIN = "<EMAIL>"' in content
        if detectors == "model":
            assert pii["findings_by_detector"] == {"model EMAIL": 1} and "52.14.203.77" in content
        else:  # the regex stage finds the address too and wins the tie; it alone finds the IP
            assert pii["findings_by_detector"] == {"regex EMAIL": 1, "regex IP_ADDRESS": 1}


def test_bad_pii_settings_are_clear_errors(tmp_path, capsys):
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a.py").write_text("x = 1\n")
    assert main(["prepare", "--input", str(tree), "--out", str(tmp_path / "o1"), "--no-pii-regex"]) != 0
    assert "--no-pii-regex leaves no PII detector" in capsys.readouterr().err
    encoder = build_model(preset("tiny-starencoder"))  # a pre-training head, not a token classifier
    init_weights(encoder)
    save_model(encoder, tmp_path / "encoder")
    assert main(["prepare", "--input", str(tree), "--out", str(tmp_path / "o2"), "--pii-model",
                 str(tmp_path / "encoder")]) != 0
    assert "a PII model is a token classifier" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()  # stopped before any work


FIRST = ["Alice", "Bruno", "Chen", "Dmitri", "Emma", "Farah", "Goran", "Hana", "Ivan", "Julia"]
LAST = ["Moreau", "Okafor", "Lindqvist", "Tanaka", "Kowalski", "Haddad", "Rossi", "Nguyen", "Weber", "Silva"]


def named_document(seed: int) -> tuple[str, str]:
    rng = random.Random(seed)
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    return code(seed, rng.randrange(1, 6)) + f"\n# maintained by {name}\n" + code(seed + 1, 3) + "\n", name


def test_train_fine_tunes_a_token_classifier_from_labelled_spans(tmp_path, capsys):
    """`starcoder train` on BigCode-format labelled documents puts a new head on an encoder body and learns the
    entity; the result is a StarPII-format model that PiiModel and transformers read."""
    from starcoder.errors import StarCoderError
    from starcoder.train.loop import TrainConfig, train

    assert main(["init", str(tmp_path / "encoder"), "--preset", "tiny-starencoder"]) == 0
    data = tmp_path / "labelled"
    data.mkdir()
    for split, seeds in (("train", range(0, 400, 2)), ("val", range(1000, 1040, 2))):
        rows = []
        for seed in seeds:
            text, name = named_document(seed)
            start = text.index(name)
            rows.append({"text": text, "fragments": [{"category": "NAME", "position": [start, start + len(name)],
                                                      "value": name}]})
        (data / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(model=str(tmp_path / "encoder"), data=str(data), out=str(tmp_path / "run"), seq_len=64,
                         micro_batch=8, max_steps=70, lr=3e-3, warmup_steps=5, eval_every=35, save_every=35,
                         eval_batches=2)
    history = train(config, progress=False)["history"]
    assert history[-1]["val_loss"] < 0.1 < history[0]["loss"]
    finder = PiiModel(str(tmp_path / "run" / "final"))
    assert [kind for kind, _ in finder.kinds] == ["", "NAME", "NAME"]
    for seed in range(2001, 2011, 2):  # documents never trained on
        text, name = named_document(seed)
        assert [(f.kind, f.value) for f in finder.find(text)] == [("NAME", name)]
    transformers = pytest.importorskip("transformers")
    theirs = transformers.BertForTokenClassification.from_pretrained(tmp_path / "run" / "final")
    assert theirs.config.id2label == {0: "O", 1: "B-NAME", 2: "I-NAME"}

    # labelled spans for a decoder, and spans outside their text, are clear errors
    with pytest.raises(StarCoderError, match="fine-tunes an encoder"):
        train(TrainConfig(model="default", data=str(data), out=str(tmp_path / "r2"), max_steps=1), progress=False)
    (data / "train.jsonl").write_text(json.dumps({"text": "abc", "fragments": [{"category": "KEY",
                                                                                "position": [1, 9]}]}) + "\n")
    with pytest.raises(StarCoderError, match=r"train.jsonl:1: .*within the text's 3 characters"):
        train(TrainConfig(model=str(tmp_path / "encoder"), data=str(data), out=str(tmp_path / "r3"), seq_len=64,
                          max_steps=1),
              progress=False)


def test_the_shipped_model_finds_each_kind_and_prepare_uses_it(tmp_path):
    """`--pii-model default`: the StarPII-format model this package trained (recipes/pii/build_model.py), on values
    it never saw, and in prepare beside the regexes: it adds a name they miss."""
    finder = PiiModel("default")
    assert {kind for kind, _ in finder.kinds} == {"", "EMAIL", "IP_ADDRESS", "KEY", "NAME", "PASSWORD", "USERNAME"}
    text = ('DB_HOST = "52.14.203.77"\n# Author: Mariana Costa <mariana.costa@proton.me>\n'
            'DB_PASSWORD = "Sunfl0wer!2024"\napi_key = "sk_live_9fJ2kLm4Nq8Rt5Vw1Xy7Za3b"\n'
            'CHECKSUM = "9e107d9d372bb6826bd81d3542a419d6"  # md5 of the release\nHOST = "10.0.0.12"\n')
    assert [(f.kind, f.value) for f in finder.find(text)] == [
        ("IP_ADDRESS", "52.14.203.77"), ("NAME", "Mariana Costa"), ("EMAIL", "mariana.costa@proton.me"),
        ("PASSWORD", "Sunfl0wer!2024"), ("KEY", "sk_live_9fJ2kLm4Nq8Rt5Vw1Xy7Za3b")]
    tree = tmp_path / "acme"
    tree.mkdir()
    (tree / "LICENSE").write_text(MIT)
    (tree / "setup.py").write_text("# Thanks to Mariana Costa for the original patch.\n" + code(3, 20))
    out = tmp_path / "out"
    assert main(["prepare", "--input", str(tree), "--out", str(out), "--workers", "1", "--pii-model", "default"]) == 0
    pii = json.loads((out / "report.json").read_text())["stages"]["pii"]
    content = json.loads((out / "shard-00000.jsonl").read_text())["content"]
    assert "# Thanks to <NAME> for" in content and pii["findings_by_detector"] == {"model NAME": 1}
