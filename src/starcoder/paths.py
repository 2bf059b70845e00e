"""Where models are: the one shipped in the package, local directories, GGUF files, and hub ids in the Hugging Face
cache."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

from .errors import StarCoderError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_GGUF = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)/([\w./-]+\.gguf)$")  # org/name/path/in/repo.gguf


def default_model_dir(asset: str = "model") -> Path:
    """A model shipped inside the package: the embedded default (used when no model is named), or "pii_model",
    the PII detector (`--pii-model default`)."""
    path = Path(str(resources.files("starcoder") / "assets" / asset))
    if not (path / "config.json").is_file():
        missing = {"model": "no model given, and this installation has no embedded default model",
                   "pii_model": "--pii-model default: this installation has no embedded PII model"}[asset]
        raise StarCoderError(f"{missing} (assets/{asset}); pass a model directory or hub id")
    return path


def resolve_model(path_or_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None) -> Path:
    """A local directory or .gguf file as is; a hub id (org/name), or one GGUF file of a hub repository
    (org/name/file.gguf, as TheBloke's and others' GGUF repositories hold several), through the Hugging Face cache,
    downloading when online."""
    path = Path(path_or_id).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf"):
        return path
    if path.exists():
        raise StarCoderError(f"{path} is a file; pass the model directory that holds config.json, or a .gguf file")
    name = str(path_or_id)
    hub_file = _HUB_GGUF.match(name)
    if not _HUB_ID.match(name) and hub_file is None:
        raise StarCoderError(f"{name}: no such model directory or .gguf file (nor a hub id of the form org/name or "
                             "org/name/file.gguf)")
    from huggingface_hub import constants, hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]

    def fetch(local_only: bool) -> Path:
        if hub_file is not None:
            return Path(hf_hub_download(hub_file[1], hub_file[2], revision=revision, cache_dir=cache_dir,
                                        local_files_only=local_only))
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=local_only,
                                      allow_patterns=None if local_only else patterns))

    try:
        return fetch(local_only=True)
    except LocalEntryNotFoundError:
        pass
    where = cache_dir or constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise StarCoderError(f"{name} is not a local directory and is not in the Hugging Face cache ({where}); "
                             "HF_HUB_OFFLINE is set, so it was not downloaded") from None
    try:
        return fetch(local_only=False)
    except Exception as e:  # network, auth, missing repo: all mean the same thing to the user
        raise StarCoderError(f"{name} is not a local directory, not in the Hugging Face cache ({where}), "
                             f"and could not be downloaded: {type(e).__name__}: {e}") from None
