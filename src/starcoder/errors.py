"""Errors that reach users. The CLI prints their message and exits non-zero instead of showing a traceback."""


class StarCoderError(Exception):
    """A problem the user can fix: bad input, a missing or damaged file, an unsupported setting."""


class ConfigError(StarCoderError, ValueError):
    """A config.json (or a Config built in code) that the package cannot use."""


class CheckpointError(StarCoderError):
    """Weights that are missing, damaged, or do not match their config."""


class SamplingError(StarCoderError):
    """One sequence's sampling settings made its scores unusable (every token ruled out, or not finite)."""


class ModelOutputError(Exception):
    """The model computed non-finite logits: a fault of the model or its weights, not of the request."""
