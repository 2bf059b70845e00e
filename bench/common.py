"""What the benchmarks share: the random checkpoints they run on, running a side in a fresh process, peak RSS."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def make_checkpoint(preset_name: str, dtype_name: str) -> Path:
    """A random checkpoint of a preset's shape, with its family's tokenizer, written once under bench/results/."""
    import torch

    from starcoder import Tokenizer, build_model, init_weights, preset, save_model

    out = RESULTS / f"{preset_name}-{dtype_name}"
    config = preset(preset_name)
    if (out / "config.json").exists():
        if not (out / "tokenizer.json").exists():
            Tokenizer.for_family(config.model_type).save(out)
        return out
    with torch.device("meta"):
        model = build_model(config)
    model = model.to(getattr(torch, dtype_name)).to_empty(device="cpu")
    model.tie_weights()
    torch.manual_seed(0)
    init_weights(model)
    save_model(model, out)
    Tokenizer.for_family(config.model_type).save(out)
    return out


def peak_rss() -> int:
    """This process's peak resident set (VmHWM), file-backed pages of mapped weights included.

    (getrusage's ru_maxrss is not used: Linux carries it over from the parent across exec.)
    """
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(script: str, side: str, args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run `script --child SIDE ARGS` in a fresh process (with `env` added to the environment) and return the
    JSON it prints last."""
    out = subprocess.run([sys.executable, script, "--child", side, *args], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        raise RuntimeError(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def wait_until_healthy(server: subprocess.Popen, port: int, name: str, limit: float = 300) -> subprocess.Popen:
    """The server process once GET /health answers 200 (both ours and llama-server have it)."""
    import time

    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            output = server.stderr.read()[-2000:] if server.stderr else "(its output went to its log file)"
            raise RuntimeError(f"{name} exited: {output}")
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"{name} did not start within {limit:g} s")


@contextlib.contextmanager
def running(server: subprocess.Popen):
    """A server process for the length of a with-block; stopped (and waited for) however the block ends."""
    try:
        yield server
    finally:
        server.terminate()
        server.wait(timeout=60)


def parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: the checkpoint's shape and dtype, and the child-process plumbing."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="starcoderbase-1b", help="shape of the random checkpoint")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p
