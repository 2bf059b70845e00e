"""The ground floor every writer stands on: files that appear whole or not at all, charts, settings files.

Nothing here imports torch, so the tokenizer, the data pipeline, evaluation and attribution can write their
files without it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import StarCoderError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed to `path` when the block ends without an error,
    removed when it fails. So a reader (or a later run) never takes a half-written file for a finished one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes private files; the result is an ordinary one
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `path` to fill; it replaces `path` (and whatever was there) when the
    block ends without an error. Until then the previous `path`, if any, stays whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


def write_json_atomic(path: Path, value, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False))


def pyplot(extra: str):
    """matplotlib's pyplot on its file-only backend, or None (with a warning naming the package extra that
    brings it) when matplotlib is not installed: a chart is never worth failing a run for."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'starcoder[%s]'): no chart written", extra)
        return None
    return plt


def save_figure(fig, path: Path, **options) -> None:
    """Write a matplotlib figure as PNG, atomically, and free it."""
    import matplotlib.pyplot as plt

    try:
        with atomic(path) as tmp:
            fig.savefig(tmp, format="png", **options)
    finally:
        plt.close(fig)


def read_settings(path: Path) -> dict:
    """A mapping of settings from a TOML, JSON or YAML file (by suffix; YAML for any other suffix)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise StarCoderError(f"{path}: no such file") from None
    except OSError as e:
        raise StarCoderError(f"{path}: cannot read ({e})") from None
    except Exception as e:  # the parsers' own error types
        raise StarCoderError(f"{path}: cannot parse ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise StarCoderError(f"{path}: expected a mapping of settings")
    return raw
