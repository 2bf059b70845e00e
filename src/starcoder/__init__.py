"""starcoder: the BigCode code models (StarCoder, StarCoder2, StarEncoder) and everything people do with them."""

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
