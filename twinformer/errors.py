"""Exceptions that carry a message meant for the user.

The command line prints these without a traceback and exits non-zero; any
other exception is a bug and keeps its traceback.
"""


class TwinformerError(Exception):
    """Base class: the message names the bad value and what to do about it."""


class ConfigError(TwinformerError, ValueError):
    """A configuration value is invalid."""


class DataError(TwinformerError, ValueError):
    """An input file or sequence is invalid."""


class CheckpointError(TwinformerError, ValueError):
    """A run directory or tensor file is missing, incomplete or mismatched."""


class LoraError(TwinformerError, ValueError):
    """A LoRA request cannot be applied to the model."""
