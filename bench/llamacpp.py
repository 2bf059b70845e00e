"""llama.cpp, the CPU anchor of the benchmarks: built from the llama-cpp-python sdist (a registry package) with the
native CPU flags, and its own `convert_hf_to_gguf.py` for the same random weights. Everything lands once under
bench/results/llamacpp/ (a build takes minutes; later runs reuse it).

    python bench/llamacpp.py                    # download and build (llama-server, llama-bench, llama-quantize)
    python bench/llamacpp.py --convert DIR OUT [--outtype bf16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from common import RESULTS, wait_until_healthy

ROOT = RESULTS / "llamacpp"
TARGETS = ("llama-server", "llama-bench", "llama-quantize")


def source() -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist (downloaded and unpacked on first use)."""
    found = sorted(ROOT.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    ROOT.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "-d", str(ROOT),
                    "llama-cpp-python"], check=True)
    (sdist,) = sorted(ROOT.glob("llama_cpp_python-*.tar.gz"))[-1:]
    with tarfile.open(sdist) as tar:
        tar.extractall(ROOT, filter="data")
    return sorted(ROOT.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]


def build(targets: tuple[str, ...] = TARGETS) -> Path:
    """The directory holding the built programs (native CPU flags: AVX-512, VNNI, AMX where the CPU has them)."""
    tree = source()
    out = tree / "build"
    if not all((out / "bin" / t).exists() for t in targets):
        if not (out / "CMakeCache.txt").exists():
            subprocess.run(["cmake", "-B", str(out), "-S", str(tree), "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                           check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(out), "-j", str(os.cpu_count() or 2), "--target", *targets],
                       check=True, stdout=subprocess.DEVNULL)
    return out / "bin"


def convert(model_dir: Path, out: Path, outtype: str = "bf16") -> Path:
    """llama.cpp's own conversion of an HF checkpoint (once per output file)."""
    if not out.exists():
        subprocess.run([sys.executable, __file__, "--convert", str(model_dir), str(out), "--outtype", outtype],
                       check=True)
    return out


def _run_converter(model_dir: str, out: str, outtype: str) -> None:
    tree = source()
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", outtype]
    from conversion.base import TextModel

    # The converter names a tokenizer's pre-tokenizer by hashing its output on a test string, and knows only
    # published tokenizers. Ours (shipped in the package, trained on CPython's standard library) splits text as
    # StarCoder's does: digits one by one, then the GPT-2 regex, which llama.cpp calls "starcoder".
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "starcoder"
    import runpy

    runpy.run_path(str(tree / "convert_hf_to_gguf.py"), run_name="__main__")


def start_server(gguf: Path, port: int, parallel: int = 2, context: int = 4096, threads: int | None = None,
                 extra: list[str] = ()):
    """llama-server on loopback with prompt caching (its default), `parallel` slots sharing `context` tokens, and
    any `extra` options."""
    threads = threads or os.cpu_count() or 2
    server = subprocess.Popen([str(build() / "llama-server"), "-m", str(gguf), "--port", str(port), "--host",
                               "127.0.0.1", "-t", str(threads), "-tb", str(threads), "-c", str(context * parallel),
                               "--parallel", str(parallel), "--no-webui", *extra],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return wait_until_healthy(server, port, "llama-server")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--convert", nargs=2, metavar=("MODEL_DIR", "OUT"))
    parser.add_argument("--outtype", default="bf16")
    args = parser.parse_args()
    if args.convert:
        _run_converter(*args.convert, args.outtype)
    else:
        print(build())
