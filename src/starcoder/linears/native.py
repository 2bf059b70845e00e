"""Our int4/int8 decode kernels, one build per instruction set, compiled on first use for this CPU.

- "avx512" (kernels_avx512.cpp): bfloat16 models on CPUs with AVX-512 BF16 (Zen 4 and later, Sapphire Rapids and
  later): per-channel int8 weights, int4 ones on the exact path and for long inputs, a quantized model's plain
  bfloat16 head. Activations stay bfloat16 (the exact path), or are quantized to int8 for integer dot products
  where the CPU has AVX512-VNNI (every CPU with AVX512-BF16 so far).
- "avx2" (kernels_avx2.cpp): every x86-64 CPU with AVX2 and FMA, where models compute in float32 (no native
  bfloat16); int4 decoding and grouped int8 (llama.cpp's Q8_0 blocks) on every CPU. Decoding quantizes the
  activations to int8 per block of 32, as llama.cpp does, or keeps them float32 (the exact path). Also decoding's
  attention over a float32 or bfloat16 cache (attention_avx2.h), on every CPU.

A build needs a C++ compiler; it is cached (torch's extension directory, ~/.cache/torch_extensions) and takes about
a minute once. STARCODER_NATIVE_KERNELS=0 turns both off: the layers fall back to PyTorch's own int4/int8 kernels
(quantized.py). STARCODER_INT8_ACTIVATIONS=0 turns every int8-activation path off: the exact products instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# instruction set -> (the CPU flags it needs, its source, the compiler's target flags)
BUILDS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "f16c"), HERE / "kernels_avx512.cpp",
               ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma", "-mf16c"]),
    "avx2": (("avx2", "fma", "f16c"), HERE / "kernels_avx2.cpp", ["-mavx2", "-mfma", "-mf16c"]),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(flags.split(":", 1)[1].split())


def cpu_supported(isa: str = "avx512") -> bool:
    return all(flag in cpu_flags() for flag in BUILDS[isa][0])


def int8_activations_allowed() -> bool:
    return os.environ.get("STARCODER_INT8_ACTIVATIONS", "1") != "0"


@functools.cache
def vnni() -> bool:
    """Whether the CPU has 512-bit integer dot products (AVX512-VNNI, with AVX512-BW): the AVX2 build's int4 decode
    kernel has a version for them (on a Zen 4 EPYC 1.4x the 256-bit one for four rows; one row from memory is
    memory-bound either way)."""
    return {"avx512_vnni", "avx512bw"} <= cpu_flags()


def int8_activations() -> bool:
    """Whether the AVX-512 kernels quantize activations to int8 for integer dot products (AVX512-VNNI)."""
    return int8_activations_allowed() and vnni()


@functools.cache
def kernels(isa: str = "avx512"):
    """The compiled module for an instruction set, or None when this machine cannot build or run it."""
    _, source, target = BUILDS[isa]
    if os.environ.get("STARCODER_NATIVE_KERNELS", "1") == "0" or not cpu_supported(isa):
        return None
    try:
        from torch.utils.cpp_extension import load

        # The name carries a hash of the sources, so an edited kernel is rebuilt rather than a stale one loaded.
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in [source, *sorted(HERE.glob("*.h"))])).hexdigest()[:12]
        return load(name=f"starcoder_{isa}_{digest}", sources=[str(source)], extra_include_paths=[str(HERE)],
                    extra_cflags=["-O3", "-fopenmp", *target],
                    extra_ldflags=["-fopenmp"], verbose=False)  # at::parallel_for is OpenMP: serial without it
    except Exception as e:  # no compiler, no headers, a failed build: the stock kernels still work
        lines = str(e).splitlines()
        reason = next((line for line in lines if "error" in line.lower() and ".cpp" in line), lines[0] if lines else "")
        log.warning("could not build the %s int4/int8 kernels (%s: %s); using PyTorch's, which decode slower", isa,
                    type(e).__name__, reason)
        return None


def avx2_kernels():
    """The AVX2 module, or None where this machine cannot build or run it."""
    return kernels("avx2")
