"""Exception types. Deeper code raises these; the CLI and server turn them into messages and exit codes.

Every message says what happened and what to do about it, in the user's words.
"""


class LLMKitError(Exception):
    """Base of every error llmkit raises on purpose."""


class ModelNotFoundError(LLMKitError):
    """A model name or path that the store and the file system do not know."""


class ModelFormatError(LLMKitError):
    """A checkpoint that is truncated, corrupt, or not in a format llmkit reads."""


class UnsupportedArchitectureError(LLMKitError):
    """A checkpoint whose architecture no registered architecture handles."""


class ContextLengthError(LLMKitError, ValueError):
    """A prompt (plus the tokens asked for) longer than the model's context window."""


class InvalidSamplingError(LLMKitError, ValueError):
    """A sampling or generation setting outside its valid range."""


class PullError(LLMKitError):
    """A model could not be fetched or verified; the store is left as it was."""
