"""Where models are: the one shipped in the package, local directories, GGUF files, and hub ids in the Hugging Face
cache."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from .errors import StarCoderError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def default_model_dir() -> Path:
    """The model shipped inside the package, used when no model is named."""
    path = Path(str(resources.files("starcoder") / "assets" / "model"))
    if not (path / "config.json").is_file():
        raise StarCoderError("no model given, and this installation has no embedded default model; "
                             "pass a model directory or hub id (--model)")
    return path


def resolve_model(path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None) -> Path:
    """A local directory or .gguf file as is; a hub id (org/name) through the Hugging Face cache, downloading when
    online."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists():
        raise StarCoderError(f"{path} is a file; pass the model directory that holds config.json, or a .gguf file")
    name = str(path_or_id)
    if not _HUB_ID.match(name):
        raise StarCoderError(f"{name}: no such model directory (nor a hub id of the form org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    where = cache_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise StarCoderError(f"{name} is not a local directory and is not in the Hugging Face cache ({where}); "
                             "HF_HUB_OFFLINE is set, so it was not downloaded") from None
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all mean the same thing to the user
        raise StarCoderError(f"{name} is not a local directory, not in the Hugging Face cache ({where}), "
                             f"and could not be downloaded: {type(e).__name__}: {e}") from None
