"""Label-smoothed cross-entropy (Vaswani et al. 2017, section 5.4).

JAX twin of ``torch_impl/loss.py``. With smoothing eps and V classes, the
target distribution gives 1 - eps + eps / V to the true token and eps / V to
every other token, as ``optax.smooth_labels`` and
``torch.nn.CrossEntropyLoss(label_smoothing=eps)`` do. Tokens whose label is
PAD_ID are ignored.

Shapes: B batch, T target length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from twinformer.config import PAD_ID
from twinformer.errors import ConfigError

REDUCTIONS = ("mean", "sum")


def label_smoothed_cross_entropy(
    logits: jax.Array, labels: jax.Array, smoothing: float, reduction: str = "mean"
) -> jax.Array:
    """Compute -sum_v q(v) log p(v) per token, with q the smoothed label.

    q = optax.smooth_labels(one_hot(y), eps), so per token this is
    -(1 - eps) log p(y) - (eps / V) sum_v log p(v).

    Args:
        logits: unnormalised scores.
        labels: target ids, PAD_ID where there is no token. Ids outside
            [0, V) are not checked here, because the function runs under
            ``jax.jit``; the Runner checks them first.
        smoothing: epsilon_ls in [0, 1).
        reduction: "mean" over non-padding tokens (0 when there are none), or
            "sum" over them.

    Returns:
        A scalar loss in the dtype of ``logits``.

    Shape:
        logits (B, T, V), labels (B, T) -> ().

    Raises:
        ConfigError: an unknown reduction.
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")

    # Cross-entropy per token against the smoothed label: (B, T).
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    targets = optax.smooth_labels(one_hot, smoothing)
    per_token = optax.softmax_cross_entropy(logits, targets)
    not_padding = labels != PAD_ID
    per_token = jnp.where(not_padding, per_token, jnp.zeros_like(per_token))

    total = per_token.sum()
    if reduction == "sum":
        return total
    count = not_padding.sum().astype(logits.dtype)
    return total / jnp.maximum(count, 1.0)
