"""Framework-free core of twinformer: configs, tasks, data, tokenizers, checkpoints.

Nothing under this package imports torch or JAX at module level, so both twins
and the command line can depend on it.
"""

__version__ = "0.1.0"
