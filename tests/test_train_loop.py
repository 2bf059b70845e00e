"""The training loop: learning, exact resume after SIGKILL, DDP and FSDP against one process, configs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from starcoder import StarCoderError, load_model
from starcoder.__main__ import main
from starcoder.tokenizer import Tokenizer
from starcoder.train.data import read_corpus, tokenize_corpus
from starcoder.train.loop import TrainConfig, learning_rate, train

CONFIG = """\
model: {model}
data: {data}
out: {out}
seq_len: 32
micro_batch: 2
grad_accum: 2
max_steps: 12
lr: 3.0e-3
warmup_steps: 2
eval_every: 4
eval_batches: 2
save_every: 3
keep: 2
fim_rate: 0.5
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    assert main(["init", str(root / "model"), "--preset", "tiny-starcoder2"]) == 0
    rows = [{"content": f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" * 8, "path": f"m{i}.py"}
            for i in range(60)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tokenize_corpus(read_corpus([root / "rows.jsonl"]), Tokenizer.from_dir(root / "model"), root / "data", 0.1, 0.0)
    return root


def config_file(setup, out, text=CONFIG):
    path = setup / f"{out}.yaml"
    path.write_text(text.format(model=setup / "model", data=setup / "data", out=setup / out))
    return path


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def losses(setup, out):
    return [h["loss"] for h in json.loads((setup / out / "history.json").read_text())]


@pytest.fixture(scope="module")
def learned(setup):
    """A 30-step training run (its result), shared by the tests that check it and fine-tune its model."""
    config = TrainConfig.from_file(config_file(setup, "learn"), {"max_steps": "30", "save_every": "10"})
    return train(config, progress=False)


def test_training_learns_and_writes_a_transformers_model(setup, learned):
    history = learned["history"]
    assert history[-1]["loss"] < history[0]["loss"] - 2.0
    assert [h["step"] for h in history if "val_loss" in h] == [4, 8, 12, 16, 20, 24, 28, 30]
    out = setup / "learn"
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000020", "step-0000030"]
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out / "final")(ids).logits, hf(ids).logits)


def test_resume_after_sigkill_reaches_the_same_losses(setup):
    straight = config_file(setup, "straight", CONFIG.replace("max_steps: 12", "max_steps: 24"))
    assert run(["-m", "starcoder", "train", str(straight)]).returncode == 0

    killed = config_file(setup, "killed", CONFIG.replace("max_steps: 12", "max_steps: 24"))
    proc = subprocess.Popen([sys.executable, "-m", "starcoder", "train", str(killed)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = setup / "killed" / "checkpoints" / "step-0000006" / "trainer_state.json"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (setup / "killed" / "final").exists(), "the run finished before it could be killed"
    resumed = run(["-m", "starcoder", "train", str(killed)])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert losses(setup, "killed") == pytest.approx(losses(setup, "straight"), rel=1e-6)
    assert len(losses(setup, "killed")) == 24


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(setup, engine):
    config = config_file(setup, f"one-{engine}", CONFIG.replace("max_steps: 12", "max_steps: 4"))
    assert run(["-m", "starcoder", "train", str(config)]).returncode == 0
    two = config_file(setup, f"two-{engine}", CONFIG.replace("max_steps: 12", "max_steps: 4"))
    done = run(["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "starcoder", "train", str(two),
                "--grad-accum", "1", "--distributed", engine])
    assert done.returncode == 0, done.stderr[-3000:]
    # bf16 autocast: reductions split across processes round differently, within 1e-4 of each other
    assert losses(setup, f"two-{engine}") == pytest.approx(losses(setup, f"one-{engine}"), rel=1e-4)
    assert (setup / f"two-{engine}" / "final" / "model.safetensors").is_file()  # gathered from the shards


def test_fine_tune_a_trained_model(setup, learned):
    start = setup / "learn" / "final"
    config = TrainConfig.from_file(config_file(setup, "tuned"), {"model": str(start), "max_steps": "4",
                                                                 "lr": "1e-4"})
    history = train(config, progress=False)["history"]
    assert history[0]["loss"] < 8.0  # starts from the trained weights, not from scratch (about 10.8)


def test_config_files_and_overrides(setup, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d"\nout = "o"\nmax_steps = 7\nlr = 0.01\n')
    config = TrainConfig.from_file(toml, {"micro_batch": "3", "autocast": "none"})
    assert (config.max_steps, config.lr, config.micro_batch, config.autocast) == (7, 0.01, 3, "none")
    assert config.model == str(tmp_path / "m")  # relative to the file
    with pytest.raises(StarCoderError, match="unknown field 'learning_rate'"):
        TrainConfig.from_file(toml, {"learning_rate": "1"})
    with pytest.raises(StarCoderError, match="--max-steps: expected int, got 'many'"):
        TrainConfig.from_file(toml, {"max_steps": "many"})
    with pytest.raises(StarCoderError, match="micro_batch must be a positive integer"):
        TrainConfig.from_file(toml, {"micro_batch": "0"})
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(StarCoderError, match="bad.yaml: cannot parse"):
        TrainConfig.from_file(tmp_path / "bad.yaml")


def test_default_means_the_embedded_model(tmp_path):
    (tmp_path / "run.yaml").write_text("model: default\ndata: d\nout: o\n")
    assert TrainConfig.from_file(tmp_path / "run.yaml").model == "default"


def test_schedule():
    config = TrainConfig(model="m", data="d", out="o", max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 55) == pytest.approx(0.55)
    assert learning_rate(config, 100) == pytest.approx(0.1)


def test_cli_train_errors_are_one_line(setup, capsys):
    assert main(["train", str(setup / "missing.yaml")]) == 2
    assert "missing.yaml: no such file" in capsys.readouterr().err
    assert main(["train", str(config_file(setup, "x")), "--max-steps"]) == 2
    assert "overrides are --field value pairs" in capsys.readouterr().err
