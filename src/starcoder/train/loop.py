"""The training loop: AdamW, warmup + cosine, accumulation, clipping, bf16 autocast, eval, atomic checkpoints and
exact resume, on torch.distributed (DDP, or FSDP for models too big for one device) when run under torchrun.

    starcoder train CONFIG.{yaml,toml} [--field value ...]
    torchrun --nproc-per-node 2 -m starcoder train CONFIG ...

Sample g of training is fixed by the data (TokenDataset.global_sample), and step s uses samples
[s * G, (s + 1) * G) of the global batch G = micro_batch * grad_accum * world_size, split across ranks and
micro-batches in order. So a resumed run, or one on another number of processes with the same global batch,
sees exactly the same data at every step.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoint import save_model
from ..config import Config
from ..errors import StarCoderError
from ..files import atomic_dir, pyplot, read_settings, save_figure, write_json_atomic
from ..linears.dense import onednn_supports
from ..loader import load_model
from ..paths import default_model_dir
from ..tokenizer import Tokenizer, load_tokenizer
from .data import TokenDataset
from .encoder_samples import EncoderObjective, EncoderTokens
from .token_labels import LabelledWindows, TokenLabelling, is_labelled_data, token_classification

log = logging.getLogger(__name__)
DEFAULT_MODEL = "default"  # `model: default` fine-tunes the embedded model


@dataclass
class TrainConfig:
    model: str  # the model to start from: a directory (`starcoder init`, a trained model), or "default" (embedded)
    data: str  # the directory `starcoder tokenize` wrote
    out: str  # the run directory: checkpoints/, final/, loss.png, log.jsonl
    seq_len: int = 512
    micro_batch: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    autocast: str = "auto"  # "bfloat16", "none" (float32 throughout), or auto: bfloat16 where computed natively
    fim_rate: float = 0.5
    spm_rate: float = 0.5
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep: int = 2
    log_every: int = 10
    seed: int = 0
    distributed: str = "ddp"  # under torchrun: "ddp" or "fsdp"
    max_minutes: float = 0.0  # stop early (saving) after this much wall time; 0 = no limit

    def __post_init__(self) -> None:
        positive = ("seq_len", "micro_batch", "grad_accum", "max_steps", "eval_every", "eval_batches",
                    "save_every", "keep", "log_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise StarCoderError(f"train config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.autocast not in ("auto", "bfloat16", "none"):
            raise StarCoderError(f"train config: autocast must be auto, bfloat16 or none, got {self.autocast!r}")
        if self.distributed not in ("ddp", "fsdp"):
            raise StarCoderError(f"train config: distributed must be ddp or fsdp, got {self.distributed!r}")
        if not 0 <= self.fim_rate <= 1 or not 0 <= self.spm_rate <= 1:
            raise StarCoderError("train config: fim_rate and spm_rate must be in [0, 1]")

    @classmethod
    def from_file(cls, path: str | os.PathLike, overrides: dict[str, str] | None = None) -> TrainConfig:
        """A YAML or TOML file, each field overridable (values as strings, converted to the field's type)."""
        path = Path(path)
        raw = read_settings(path)
        known = {f.name: f for f in fields(cls)}
        for key in list(raw) + list(overrides or {}):
            if key not in known:
                raise StarCoderError(f"{path}: unknown field {key!r}; fields: {', '.join(known)}")
        for key, value in (overrides or {}).items():
            raw[key] = _convert(key, value, known[key].type)
        for key in ("model", "data", "out"):  # paths in the file are relative to the file
            if raw.get(key) == DEFAULT_MODEL and key == "model":
                continue
            if key in raw and key not in (overrides or {}) and not os.path.isabs(str(raw[key])):
                raw[key] = str((path.parent / str(raw[key])).resolve())
        try:
            return cls(**raw)
        except TypeError as e:
            raise StarCoderError(f"{path}: {e}") from None


def _convert(key: str, value: str, annotation: str):
    kind = {"int": int, "float": float, "str": str}.get(str(annotation), str)
    try:
        return kind(value)
    except ValueError:
        raise StarCoderError(f"--{key.replace('_', '-')}: expected {kind.__name__}, got {value!r}") from None


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device="cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, device)


def _mean_across(value: float, d: Dist) -> float:
    if d.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / d.world


def _wrap(model: torch.nn.Module, config: TrainConfig, d: Dist) -> torch.nn.Module:
    if d.world == 1:
        return model
    if config.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.model.layers:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device] if d.device.startswith("cuda") else None)


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Full (unsharded) model and optimizer state on the CPU, whatever the wrapping."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state, optim_state) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


# ---------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(directory: Path) -> Path | None:
    done = sorted(p for p in directory.glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def _save_checkpoint(directory: Path, step: int, model, optimizer, tokenizer: Tokenizer, config: TrainConfig,
                     history: list[dict], d: Dist) -> None:
    model_state, optim_state = _state(model, optimizer)  # collective under FSDP: every rank takes part
    if not d.main:
        return
    # a checkpoint exists only once complete: a kill at any moment leaves the previous one
    with atomic_dir(directory / f"step-{step:07d}") as tmp:
        _save_weights(_bare(model), model_state, tmp / "model")
        tokenizer.save(tmp / "model")
        torch.save(optim_state, tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(rng, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": asdict(config),
                                                            "history": history}, indent=1))
    for old in sorted(p for p in directory.glob("step-*"))[: -config.keep]:
        shutil.rmtree(old, ignore_errors=True)


def _save_weights(bare: torch.nn.Module, model_state: dict, out: Path) -> None:
    """Save a full state dict as a Hugging Face directory, through a plain copy of the model."""
    with torch.device("meta"):
        plain = type(bare)(bare.config)
    plain.load_state_dict(model_state, assign=True, strict=False)
    plain.tie_weights()
    save_model(plain, out)


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


# ---------------------------------------------------------------------------------------------- the loop
def _batch(dataset: TokenDataset | LabelledWindows, first: int, size: int, device: str,
           objective: EncoderObjective | TokenLabelling | None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Training samples first .. first + size - 1: token windows, or an encoder's keyword arguments."""
    if objective is not None:
        return objective.batch(dataset, [(dataset.global_index(first + i), first + i) for i in range(size)], device)
    return torch.from_numpy(np.stack([dataset.global_sample(first + i) for i in range(size)])).to(device)


def _autocast_bfloat16(config: TrainConfig, device: str) -> bool:
    """Whether to train under bfloat16 autocast: as configured, and with "auto" where the device computes bfloat16
    natively (CPUs without AVX512-BF16 emulate it: a tiny encoder trained 4x slower than in float32)."""
    if config.autocast != "auto":
        return config.autocast == "bfloat16"
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    return onednn_supports(torch.bfloat16)


def _loss(model, batch: torch.Tensor | dict[str, torch.Tensor], config: TrainConfig, device: str) -> torch.Tensor:
    autocast = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if _autocast_bfloat16(config, device)
                else nullcontext())
    if isinstance(batch, dict):  # an encoder: the model computes its own losses (masked LM, next sentence)
        with autocast:
            return model(**batch).loss.float()
    inputs, targets = batch[:, :-1], batch[:, 1:]  # (B, L) each
    with autocast:
        logits = model(inputs).logits  # (B, L, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate(model, dataset: TokenDataset | LabelledWindows, config: TrainConfig, d: Dist,
             objective: EncoderObjective | TokenLabelling | None = None) -> float:
    """Mean loss over the first eval_batches micro-batches of the held-out split (no FIM, same every time)."""
    model.eval()
    losses = []
    n = min(config.eval_batches * config.micro_batch, len(dataset))
    for first in range(d.rank * config.micro_batch, n, config.micro_batch * d.world):
        idx = range(first, min(first + config.micro_batch, n))
        if objective is not None:
            batch = objective.batch(dataset, [(i, i) for i in idx], d.device)
        else:
            batch = torch.from_numpy(np.stack([dataset[i] for i in idx])).to(d.device)
        losses.append(float(_loss(model, batch, config, d.device)))
    model.train()
    return _mean_across(sum(losses) / max(1, len(losses)), d)


def _encoder_objective(model_config: Config, tokenizer: Tokenizer, config: TrainConfig) -> EncoderObjective | None:
    """StarEncoder's objective for an encoder (see encoder_samples.py); None for a decoder."""
    if not model_config.encoder:
        return None
    if model_config.head == "token_classification":
        raise StarCoderError(f"{config.data}: a token classifier trains on labelled documents (a .jsonl file with "
                             "fragments, a labelled .txt file, or a directory with train.jsonl and val.jsonl), not "
                             "on token shards")
    return EncoderObjective(EncoderTokens.of(tokenizer), model_config.vocab_size, config.seed,
                            next_sentence=model_config.head == "pretraining")


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training; returns the history and where the final model is."""
    d = setup_distributed()
    out = Path(config.out)
    checkpoints = out / "checkpoints"
    if d.main:
        checkpoints.mkdir(parents=True, exist_ok=True)
    data = Path(config.data)
    labelled = is_labelled_data(data)
    resume = latest_checkpoint(checkpoints)
    start_from = resume / "model" if resume else default_model_dir() if config.model == DEFAULT_MODEL else config.model
    # token shards carry the tokenizer they were made with; labelled text is read with the model's own
    tokenizer = load_tokenizer(start_from) if labelled else Tokenizer.from_dir(data / "tokenizer")
    model = load_model(start_from, dtype="float32", device=d.device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise StarCoderError(f"the data's tokenizer has {tokenizer.vocab_size} tokens; the model only "
                             f"{model.config.vocab_size}")
    if config.seq_len > model.config.max_positions:
        raise StarCoderError(f"seq_len {config.seq_len} exceeds the model's {model.config.max_positions} positions")
    if labelled:
        model, train_set, val_set = token_classification(model, tokenizer, data, config.seq_len, config.seed)
        objective = TokenLabelling()
    else:
        objective = _encoder_objective(model.config, tokenizer, config)
        fim_rate = 0.0 if objective is not None else config.fim_rate  # an encoder reads both ways: no FIM
        train_set = TokenDataset(data / "train", config.seq_len, tokenizer, fim_rate, config.spm_rate, config.seed)
        val_set = TokenDataset(data / "val", config.seq_len)
    model.train()

    wrapped = _wrap(model, config, d)  # before the optimizer: FSDP replaces the parameters with sharded ones
    decay = [p for p in wrapped.parameters() if p.dim() >= 2]
    no_decay = [p for p in wrapped.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=(config.beta1, config.beta2), foreach=True)
    start, history = 0, []
    if resume:
        state = json.loads((resume / "trainer_state.json").read_text())
        start, history = state["step"], state["history"]
        optim_state = torch.load(resume / "optimizer.pt", weights_only=False)
        model_state, _ = _state(wrapped, optimizer)
        _load_state(wrapped, optimizer, model_state, optim_state)
        rng = torch.load(resume / "rng.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if d.main:
            log.info("resumed from %s at step %d", resume, start)
    else:
        torch.manual_seed(config.seed)

    global_batch = config.micro_batch * config.grad_accum * d.world
    tokens_per_step = global_batch * config.seq_len
    bar = None
    if progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=config.max_steps, initial=start, desc="training", unit="step", dynamic_ncols=True)
    began, step_time = time.monotonic(), time.monotonic()
    step = start
    for step in range(start, config.max_steps):
        lr = learning_rate(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            first = step * global_batch + (d.rank * config.grad_accum + micro) * config.micro_batch
            batch = _batch(train_set, first, config.micro_batch, d.device, objective)
            sync = micro == config.grad_accum - 1 or d.world == 1 or config.distributed == "fsdp"
            with nullcontext() if sync else wrapped.no_sync():
                loss = _loss(wrapped, batch, config, d.device)
                (loss / config.grad_accum).backward()
            loss_sum += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(wrapped.parameters(), config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = _mean_across(loss_sum / config.grad_accum, d)
        now = time.monotonic()
        record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_second": tokens_per_step / max(now - step_time, 1e-9)}
        step_time = now
        if (step + 1) % config.eval_every == 0 or step + 1 == config.max_steps:
            record["val_loss"] = evaluate(wrapped, val_set, config, d, objective)
        history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_second']:.0f}")
        out_of_time = config.max_minutes and (now - began) / 60 >= config.max_minutes
        if (step + 1) % config.save_every == 0 or step + 1 == config.max_steps or out_of_time:
            _save_checkpoint(checkpoints, step + 1, wrapped, optimizer, tokenizer, config, history, d)
        if out_of_time:
            break
    if bar is not None:
        bar.close()
    final = out / "final"
    model_state, _ = _state(wrapped, optimizer)
    if d.main:
        with atomic_dir(final) as tmp:
            _save_weights(_bare(wrapped), model_state, tmp)
            tokenizer.save(tmp)
        write_json_atomic(out / "history.json", history, indent=1)
        plot_losses(history, out / "loss.png")
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return {"history": history, "final": str(final), "steps": step + 1}


def plot_losses(history: list[dict], path: Path) -> None:
    plt = pyplot("train")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", linewidth=1)
    evals = [h for h in history if "val_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["val_loss"] for h in evals], "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
