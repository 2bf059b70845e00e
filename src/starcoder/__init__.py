"""starcoder: the BigCode code models (StarCoder, StarCoder2) and everything people do with them."""

from .cache import KVCache
from .checkpoint import load_model, save_model
from .config import Config, preset
from .errors import CheckpointError, ConfigError, StarCoderError
from .model import CausalLM, ModelOutput, SequenceClassifier, build_model, init_weights

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CheckpointError",
    "Config",
    "ConfigError",
    "KVCache",
    "ModelOutput",
    "SequenceClassifier",
    "StarCoderError",
    "build_model",
    "init_weights",
    "load_model",
    "preset",
    "save_model",
]
