"""Training errors: each says what is wrong and what to do, in the user's words."""

from llmkit.errors import LLMKitError


class DataError(LLMKitError, ValueError):
    """Bad training data: a malformed line, an unknown format, too little data, a sequence too long."""


class CheckpointError(LLMKitError):
    """A training checkpoint that is missing, incomplete or does not match the run."""


class TrainConfigError(LLMKitError, ValueError):
    """Settings that cannot work together (batch sizes, presets, YAML files)."""
