"""Label-smoothed cross-entropy (Vaswani et al. 2017, section 5.4).

With smoothing eps and V classes, the target distribution gives
1 - eps + eps / V to the true token and eps / V to every other token, as
``torch.nn.CrossEntropyLoss(label_smoothing=eps)`` does. Tokens whose label
is PAD_ID are ignored.

Shapes: B batch, T target length, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torch_impl.layers import check_token_ids
from twinformer.config import PAD_ID
from twinformer.errors import ConfigError

REDUCTIONS = ("mean", "sum")


def label_smoothed_cross_entropy(
    logits: Tensor, labels: Tensor, smoothing: float, reduction: str = "mean"
) -> Tensor:
    """Compute -sum_v q(v) log p(v) per token, with q the smoothed label.

    Per token this is -(1 - eps) log p(y) - (eps / V) sum_v log p(v).

    Args:
        logits: unnormalised scores.
        labels: target ids, PAD_ID where there is no token.
        smoothing: epsilon_ls in [0, 1).
        reduction: "mean" over non-padding tokens (0 when there are none), or
            "sum" over them.

    Returns:
        A scalar loss in the dtype of ``logits``.

    Shape:
        logits (B, T, V), labels (B, T) -> ().

    Raises:
        ConfigError: an unknown reduction.
        DataError: a label outside [0, V).
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_token_ids(labels, logits.shape[-1])

    # Cross-entropy per token against the smoothed label: (B, T).
    log_probs = torch.log_softmax(logits, dim=-1)
    true_class = log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    uniform = log_probs.mean(dim=-1)
    per_token = -(1.0 - smoothing) * true_class - smoothing * uniform
    not_padding = labels != PAD_ID
    per_token = torch.where(not_padding, per_token, torch.zeros_like(per_token))

    total = per_token.sum()
    if reduction == "sum":
        return total
    count = not_padding.sum().to(logits.dtype)
    return total / count.clamp(min=1.0)
