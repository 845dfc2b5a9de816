"""Test-wide settings, applied before any test imports torch or JAX."""

import os

# float64 parity checks need x64; JAX reads this variable when it is imported.
# The twins pass dtypes explicitly, so float32 code paths are unaffected.
os.environ.setdefault("JAX_ENABLE_X64", "1")
# Full float32 matmuls in JAX (its GPU default is TF32).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
