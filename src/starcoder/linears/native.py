"""Our int4/int8 decode kernels (kernels.cpp), compiled on first use for this CPU.

They need AVX-512 with BF16 (Zen 4 and later, Sapphire Rapids and later) and a C++ compiler; the build is cached
(torch's extension directory, ~/.cache/torch_extensions) and takes about a minute once. Elsewhere, or with
STARCODER_NATIVE_KERNELS=0, QuantLinear uses PyTorch's own int4/int8 kernels instead.

Decoding quantizes the activations to int8 and uses integer dot products where the CPU has AVX512-VNNI (every
CPU with AVX512-BF16 so far); STARCODER_INT8_ACTIVATIONS=0 keeps the bfloat16 activations (the exact path).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
SOURCE = Path(__file__).with_name("kernels.cpp")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(flags.split(":", 1)[1].split())


def cpu_supported() -> bool:
    return all(flag in cpu_flags() for flag in REQUIRED_FLAGS)


def int8_activations() -> bool:
    """Whether decoding kernels quantize activations to int8 for integer dot products (AVX512-VNNI)."""
    return os.environ.get("STARCODER_INT8_ACTIVATIONS", "1") != "0" and "avx512_vnni" in cpu_flags()


@functools.cache
def kernels():
    """The compiled module, or None when this machine cannot build or run it."""
    if os.environ.get("STARCODER_NATIVE_KERNELS", "1") == "0" or not cpu_supported():
        return None
    try:
        from torch.utils.cpp_extension import load

        # The name carries a hash of the source, so an edited kernel is rebuilt rather than a stale one loaded.
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        return load(name=f"starcoder_quant_{digest}", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                                  "-mavx512vnni", "-mfma"],
                    extra_ldflags=["-fopenmp"], verbose=False)  # at::parallel_for is OpenMP: serial without it
    except Exception as e:  # no compiler, no headers, a failed build: the stock kernels still work
        lines = str(e).splitlines()
        reason = next((line for line in lines if "error" in line.lower() and ".cpp" in line), lines[0] if lines else "")
        log.warning("could not build the int4/int8 kernels (%s: %s); using PyTorch's, which decode slower",
                    type(e).__name__, reason)
        return None
