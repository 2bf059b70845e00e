"""`starcoder quantize`: GPTQ over a whole model, one block at a time.

Calibration windows go through the embeddings once; then each block is copied to float32, its linear layers are
quantized in true-sequential order (q, k, v -> o -> fc -> proj: each group's Hessian is collected with the
groups before it already quantized), and the block's quantized outputs become the next block's inputs. Only one
block and the calibration activations are in memory at a time; the rest of the model stays in its memory-mapped
files. Round-to-nearest (--method rtn) needs none of this: each weight is rounded on its own as its block is read.
"""

from __future__ import annotations

import copy
import logging
import random
import sysconfig
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import CheckpointReader, load_config, weight_files
from ..errors import StarCoderError
from ..linears.gptq_layout import LINEARS, QuantSettings, read_quant_config
from ..loader import build
from ..model import Span
from ..paths import resolve_model
from ..tokenizer import Tokenizer
from .files import QuantizedWriter
from .gptq import Hessian, gptq, rtn

log = logging.getLogger(__name__)

# Groups of a block's linears that are quantized together; q, k and v share their input (and so one Hessian).
SEQUENTIAL_GROUPS = (("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.fc",), ("mlp.proj",))


def default_calibration() -> list[Path]:
    """Code every machine has offline: the Python standard library of this interpreter (PSF-licensed)."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def calibration_windows(tokenizer: Tokenizer, paths: list[Path], n_samples: int, seq_len: int,
                        seed: int = 0) -> torch.Tensor:
    """n_samples windows of seq_len tokens (n, L) from the code files (or JSONL rows) at paths: documents in a
    seeded random order, joined by the end token, cut into consecutive windows."""
    from ..train.data import read_corpus

    if n_samples < 1 or seq_len < 2:
        raise StarCoderError(f"calibration needs n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    documents = [d.content for d in read_corpus(paths, exclude=("test", "tests", "site-packages", "idlelib"))]
    random.Random(seed).shuffle(documents)
    need = n_samples * seq_len
    tokens: list[int] = []
    for text in documents:
        tokens.extend(tokenizer.encode(text))
        tokens.append(tokenizer.eos_id)
        if len(tokens) >= need:
            break
    if len(tokens) < need:
        raise StarCoderError(f"the calibration data ({', '.join(map(str, paths))}) has {len(tokens):,} tokens; "
                             f"{n_samples} samples of {seq_len} need {need:,}: give more code (--calibration) or "
                             "lower --n-samples / --seq-len")
    return torch.tensor(tokens[:need]).view(n_samples, seq_len)


@torch.no_grad()
def quantize_model(model: str, out: str | Path, settings: QuantSettings, calibration: list[Path] | None = None,
                   n_samples: int = 128, seq_len: int = 2048, seed: int = 0, method: str = "gptq",
                   progress: bool | None = None) -> dict:
    """Quantize a model directory or hub id into `out` (an AutoGPTQ-compatible directory); returns statistics."""
    settings.check()
    if method not in ("gptq", "rtn"):
        raise StarCoderError(f"method must be gptq or rtn, got {method!r}")
    model_dir = resolve_model(model)
    if model_dir.suffix == ".gguf":
        raise StarCoderError(f"{model_dir}: quantize takes a Hugging Face model directory, not a GGUF file (GGUF "
                             "files are quantized by llama.cpp's llama-quantize, or written by starcoder export)")
    if read_quant_config(model_dir) is not None:
        raise StarCoderError(f"{model_dir} is already quantized")
    out = Path(out)
    if out.resolve() == model_dir.resolve():
        raise StarCoderError("--out must be a new directory, not the model's own")
    config = load_config(model_dir)
    config.require_causal_lm(model_dir, "quantizing")
    shapes = {"attn.q": config.n_embd, "attn.k": config.n_embd, "attn.v": config.n_embd,
              "attn.o": config.n_head * config.head_dim, "mlp.fc": config.n_embd, "mlp.proj": config.n_inner}
    for linear in LINEARS:
        settings.check_layer(linear, shapes[linear])
    tokenizer = Tokenizer.from_dir(model_dir)
    seq_len = min(seq_len, config.max_positions)
    # Round-to-nearest looks at each weight alone: no calibration data, no forward passes.
    windows = (calibration_windows(tokenizer, calibration or default_calibration(), n_samples, seq_len, seed)
               if method == "gptq" else [])

    start_time = time.perf_counter()
    # Memory-mapped: a block's weights are read when the block is reached, and their pages released after it.
    reader = CheckpointReader(weight_files(model_dir))
    lm = build(config, reader)
    decoder, stored = lm.model, lm.model.embed.weight.dtype
    positions = torch.arange(seq_len)[None]
    hidden = [decoder.embed_tokens(window[None], positions).to(stored) for window in windows]
    rotary = decoder.rotary(positions, torch.float32)
    writer = QuantizedWriter(out, config, settings, str(model))
    losses: dict[str, float] = {}
    _peak_rss(reset=True)
    block_peaks: list[int] = []  # the process's peak resident memory while each block was quantized
    bar = tqdm(total=config.n_layer, desc=f"{method} {settings.bits}-bit", unit="block",
               disable=None if progress is None else not progress)
    for index, block in enumerate(decoder.layers):
        if method == "rtn":
            quantized = {name: rtn(block.get_submodule(name).weight, settings) for name in LINEARS}
        else:
            work = copy.deepcopy(block).float()

            def run(x: torch.Tensor, work=work) -> torch.Tensor:
                return work(x.float(), [Span(1, seq_len, rotary=rotary)])

            quantized = _gptq_block(work, hidden, run, settings, losses, index)
            hidden = [run(x).to(stored) for x in hidden]  # the next block's inputs, through this one quantized
            del work
        writer.write_block(index, quantized, block.state_dict())  # the integer weights go to disk now
        block.to_empty(device="meta")  # done with the original weights: let their pages go
        for tensor in reader:
            if _block_of(tensor.name) == index:
                reader.release(tensor)
        block_peaks.append(_peak_rss(reset=True))
        bar.update()
    bar.close()

    writer.finish({n: t for n, t in lm.state_dict().items() if not t.is_meta})
    tokenizer.save(out)
    return {"seconds": time.perf_counter() - start_time, "layers": config.n_layer * len(LINEARS), "gptq_loss": losses,
            "block_peak_rss": block_peaks}


def _block_of(hf_name: str) -> int | None:
    """The block a checkpoint tensor belongs to (transformer.h.3.* or model.layers.3.*), else None."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("h", "layers") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def _peak_rss(reset: bool = False) -> int:
    """This process's peak resident memory (VmHWM) since the last reset; 0 where /proc does not tell."""
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
        if reset:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current RSS
        return peak
    except (OSError, StopIteration):
        return 0


def _gptq_block(work, hidden: list[torch.Tensor], run, settings: QuantSettings, losses: dict[str, float],
                index: int) -> dict:
    """GPTQ over one block's linears (a float32 copy) in true-sequential order: each group's Hessians come from
    the calibration inputs run through the block with the groups before it already quantized."""
    quantized = {}
    for group in SEQUENTIAL_GROUPS if settings.true_sequential else (LINEARS,):
        hessians = _collect_hessians(work, group, hidden, run)
        for position, name in enumerate(group):
            module = work.get_submodule(name)
            # The last user of a Hessian may work in it in place (q, k and v share one).
            last = all(hessians[later] is not hessians[name] for later in group[position + 1:])
            quantized[name], losses[f"{index}.{name}"] = gptq(module.weight, hessians[name].H, settings,
                                                              overwrite=last)
            if last:
                hessians[name].H = None
            module.weight.data = quantized[name].dequantize(torch.float32)  # later groups see the quantized layer
    return quantized


def _collect_hessians(work, group: tuple[str, ...], hidden: list[torch.Tensor], run) -> dict[str, Hessian]:
    """One Hessian per distinct input of the group's linears (q, k and v share one), over every calibration
    window passed through the block."""
    hessians: dict[str, Hessian] = {}
    handles = []
    shared: dict[str, str] = {}
    for name in group:
        source = "attn.q" if name in ("attn.k", "attn.v") and "attn.q" in group else name
        shared[name] = source
        if source == name:
            module = work.get_submodule(name)
            hessian = hessians[name] = Hessian(module.in_features)
            handles.append(module.register_forward_pre_hook(lambda _m, args, h=hessian: h.add(args[0])))
    try:
        for x in hidden:
            run(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: hessians[shared[name]] for name in group}
