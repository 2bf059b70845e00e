"""starcoder: the BigCode code models (StarCoder, StarCoder2, StarEncoder) and everything people do with them."""

import os

# Large allocations, a model's weights above all, on 2 MB pages (transparent huge pages): decoding streams every
# weight once per token, and from 4 KB pages it read 5-10% slower per decode step (up to 1.6x per layer) on a Zen 4
# EPYC. PyTorch reads this once, at its first allocation, so it takes effect where starcoder is imported before
# torch (the CLI and the server always are); THP_MEM_ALLOC_ENABLE=0 keeps 4 KB pages.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import StarCoder, load
from .cache import KVCache
from .checkpoint import save_model
from .config import Config, preset
from .encoder import EncoderModel
from .errors import CheckpointError, ConfigError, StarCoderError
from .generate import Completion, SamplingParams
from .loader import load_model
from .model import CausalLM, ModelOutput, SequenceClassifier, build_model, init_weights
from .tokenizer import Tokenizer, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CheckpointError",
    "Completion",
    "EncoderModel",
    "Config",
    "ConfigError",
    "KVCache",
    "ModelOutput",
    "SamplingParams",
    "SequenceClassifier",
    "StarCoder",
    "StarCoderError",
    "Tokenizer",
    "build_model",
    "init_weights",
    "load",
    "load_model",
    "load_tokenizer",
    "preset",
    "save_model",
]
