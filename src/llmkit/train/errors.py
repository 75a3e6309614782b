"""Training errors: each says what is wrong and what to do, in the user's words."""

from llmkit.errors import DataError, LLMKitError  # noqa: F401  (DataError: bad training data too)


class CheckpointError(LLMKitError):
    """A training checkpoint that is missing, incomplete or does not match the run."""


class TrainConfigError(LLMKitError, ValueError):
    """Settings that cannot work together (batch sizes, presets, YAML files)."""
