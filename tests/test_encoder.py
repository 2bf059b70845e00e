"""The encoder family (StarEncoder, StarPII) against transformers' BERT on tiny random StarEncoder-shaped models:
outputs, losses, checkpoints both ways, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from starcoder.checkpoint import save_model  # noqa: E402
from starcoder.config import preset  # noqa: E402
from starcoder.errors import StarCoderError  # noqa: E402
from starcoder.loader import load_model  # noqa: E402
from starcoder.model import build_model, init_weights  # noqa: E402

HEADS = {"pretraining": "BertForPreTraining", "masked_lm": "BertForMaskedLM",
         "token_classification": "BertForTokenClassification"}


def hf_config(**overrides) -> transformers.BertConfig:
    """StarEncoder's settings (gelu, 1e-12, two token types) at a tiny size; vocabulary of 4 extra tokens."""
    return transformers.BertConfig(**{"vocab_size": 260, "hidden_size": 64, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "intermediate_size": 128,
                                      "max_position_embeddings": 96, "num_labels": 7, "pad_token_id": 0,
                                      **overrides})


def batch(vocab: int = 260):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 30:], mask[2, 11:] = 0, 0  # right padding
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 20:] = 1  # a second segment, as next-sentence prediction pairs them
    return ids, mask, types


@pytest.fixture(params=list(HEADS))
def reference(request, tmp_path):
    torch.manual_seed(0)
    model = getattr(transformers, HEADS[request.param])(hf_config()).eval()
    model.save_pretrained(tmp_path)
    return request.param, model, tmp_path


def test_outputs_and_losses_equal_transformers(reference):
    head, theirs, directory = reference
    ours = load_model(directory, dtype="float32")
    assert ours.config.head == head and ours.config.encoder
    ids, mask, types = batch()
    labels = torch.full_like(ids, -100)
    if head == "token_classification":
        labels[mask.bool()] = torch.randint(0, 7, (int(mask.sum()),), generator=torch.Generator().manual_seed(2))
    else:
        labels[:, ::7] = ids[:, ::7]  # the masked positions' original tokens
    extra = {"next_sentence_label": torch.tensor([0, 1, 0])} if head == "pretraining" else {}
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                     output_hidden_states=True, **extra)
        got = ours(ids, mask, types, labels=labels, output_hidden_states=True, **extra)
    real = mask.bool()  # what pad positions hold is nobody's business
    ref_logits = ref.prediction_logits if head == "pretraining" else ref.logits
    assert (got.logits - ref_logits)[real].abs().max() <= 1e-5
    assert len(got.hidden_states) == len(ref.hidden_states) == 3
    for a, b in zip(got.hidden_states, ref.hidden_states, strict=True):
        assert (a - b)[real].abs().max() <= 1e-5
    assert abs(got.loss.item() - ref.loss.item()) <= 1e-5
    if head == "pretraining":
        assert (got.next_sentence_logits - ref.seq_relationship_logits).abs().max() <= 1e-5


def test_our_checkpoints_load_in_transformers(tmp_path):
    for head in HEADS:
        torch.manual_seed(3)
        model = build_model(preset("tiny-starencoder", vocab_size=260, head=head, num_labels=5))
        init_weights(model)
        assert model.config.num_parameters() == sum(p.numel() for p in model.parameters())
        save_model(model, tmp_path / head)
        theirs = getattr(transformers, HEADS[head]).from_pretrained(tmp_path / head).eval()
        assert json.loads((tmp_path / head / "config.json").read_text())["architectures"] == [HEADS[head]]
        ids, mask, types = batch()
        with torch.no_grad():
            ours, ref = model.eval()(ids, mask, types), theirs(input_ids=ids, attention_mask=mask, token_type_ids=types)
        ref_logits = ref.prediction_logits if head == "pretraining" else ref.logits
        assert (ours.logits - ref_logits)[mask.bool()].abs().max() <= 1e-5
        again = load_model(tmp_path / head, dtype="float32")
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values(),
                                                     strict=True))


def test_files_holding_the_tied_decoder_load(tmp_path):
    """Older checkpoints (as bigcode/starencoder's) store cls.predictions.decoder.weight and .bias too."""
    from safetensors.torch import save_file

    torch.manual_seed(4)
    theirs = transformers.BertForPreTraining(hf_config()).eval()
    theirs.save_pretrained(tmp_path)
    state = {k: v.contiguous().clone() for k, v in theirs.state_dict().items()}
    state["bert.embeddings.position_ids"] = torch.arange(96)[None]
    assert "cls.predictions.decoder.weight" in state and "cls.predictions.decoder.bias" in state
    save_file(state, tmp_path / "model.safetensors")
    ours = load_model(tmp_path, dtype="float32")
    assert ours.mlm.decoder.weight is ours.model.embed.weight


def test_unsupported_bert_configs_and_too_long_inputs(tmp_path):
    transformers.BertForMaskedLM(hf_config(position_embedding_type="relative_key")).save_pretrained(tmp_path)
    with pytest.raises(StarCoderError, match="position_embedding_type 'relative_key'"):
        load_model(tmp_path)
    model = build_model(preset("tiny-starencoder", vocab_size=260))
    init_weights(model)
    with pytest.raises(StarCoderError, match="129 tokens are more than the encoder's 128 positions"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_text_generation_commands_refuse_an_encoder(reference, capsys):
    from starcoder.__main__ import main

    head, _, directory = reference
    for command in (["complete", "--model", str(directory), "def f():"], ["quantize", "--model", str(directory),
                                                                           "--out", str(directory / "q")]):
        assert main(command) != 0
        assert f"needs a causal language model (StarCoder, StarCoder2); this is a StarEncoder (bert) model with a " \
               f"{head} head" in capsys.readouterr().err


def test_masking_rates_and_sample_layout(tmp_path):
    import numpy as np

    from starcoder.tokenizer import Tokenizer
    from starcoder.train.data import TokenDataset, read_corpus, tokenize_corpus
    from starcoder.train.encoder_samples import EncoderTokens, mask_tokens, pretraining_sample

    tokenizer = Tokenizer.for_family("bert")
    tokens = EncoderTokens.of(tokenizer)
    assert (tokens.pad, tokens.sep, tokens.cls, tokens.mask) == (49152, 49153, 49154, 49155)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 49152, 200_000)
    maskable = np.ones(len(ids), dtype=bool)
    maskable[::10] = False
    inputs, labels = mask_tokens(ids, maskable, rng, tokens, 49156)
    chosen = labels != -100
    assert not chosen[::10].any() and abs(chosen.sum() / maskable.sum() - 0.15) < 0.005
    assert np.array_equal(labels[chosen], ids[chosen])
    masked, kept = (inputs[chosen] == tokens.mask).mean(), (inputs[chosen] == ids[chosen]).mean()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01  # the rest: random tokens
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"def f{i}(x):\n    return x * {i}\n" * 6, "path": f"m{i}.py"})
                              for i in range(40)))
    tokenize_corpus(read_corpus([rows]), tokenizer, tmp_path / "data", 0.0, 0.0)
    dataset = TokenDataset(tmp_path / "data" / "train", 64)
    labels_seen = set()
    for g in range(40):
        sample = pretraining_sample(dataset, g % len(dataset), g, tokens, 49156, seed=0)
        ids, types = sample["input_ids"], sample["token_type_ids"]
        assert len(ids) == 64 and ids[0] == tokens.cls and ids[-1] == tokens.sep and (ids == tokens.sep).sum() >= 2
        assert types[:32].sum() == 0 and types[32:].all()  # <cls> + 30 + <sep>, then B and its <sep>
        labels_seen.add(int(sample["next_sentence_label"]))
        again = pretraining_sample(dataset, g % len(dataset), g, tokens, 49156, seed=0)
        assert all(np.array_equal(sample[k], again[k]) for k in sample)  # a function of (seed, g) alone
    assert labels_seen == {0, 1}


def test_starcoder_train_pretrains_an_encoder(tmp_path):
    from starcoder.__main__ import main
    from starcoder.tokenizer import Tokenizer
    from starcoder.train.data import read_corpus, tokenize_corpus
    from starcoder.train.loop import TrainConfig, train

    assert main(["init", str(tmp_path / "encoder"), "--preset", "tiny-starencoder"]) == 0
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"content": f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" * 8,
                                          "path": f"m{i}.py"}) for i in range(60)))
    tokenize_corpus(read_corpus([rows]), Tokenizer.from_dir(tmp_path / "encoder"), tmp_path / "data", 0.1, 0.0)
    config = TrainConfig(model=str(tmp_path / "encoder"), data=str(tmp_path / "data"), out=str(tmp_path / "run"),
                         seq_len=48, micro_batch=4, max_steps=20, lr=3e-3, warmup_steps=2, eval_every=10,
                         save_every=10, eval_batches=2)
    history = train(config, progress=False)["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 1.5 and "val_loss" in history[-1]
    trained = transformers.BertForPreTraining.from_pretrained(tmp_path / "run" / "final").eval()
    ours = load_model(tmp_path / "run" / "final", dtype="float32")
    ids, mask, types = batch(49156)
    with torch.no_grad():
        assert (ours(ids, mask, types).logits - trained(input_ids=ids, attention_mask=mask, token_type_ids=types)
                .prediction_logits)[mask.bool()].abs().max() <= 1e-4
    # a decoder's tokenizer lacks the encoder's tokens: a clear error
    tokenize_corpus(read_corpus([rows]), Tokenizer.for_family("gpt_bigcode"), tmp_path / "data2", 0.1, 0.0)
    with pytest.raises(StarCoderError, match="<mask> missing"):
        train(TrainConfig(model=str(tmp_path / "encoder"), data=str(tmp_path / "data2"), out=str(tmp_path / "r2"),
                          seq_len=48, max_steps=1), progress=False)
