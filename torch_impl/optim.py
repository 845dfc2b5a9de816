"""Adam with the warmup schedule of section 5.3, and gradient clipping.

lr(step) = lr_scale * model_dim^-0.5 * min(step^-0.5, step * warmup^-1.5), step
counted from 1, from ``twinformer.schedule.transformer_learning_rate``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from twinformer.config import TrainConfig
from twinformer.schedule import transformer_learning_rate


def make_optimizer(
    params: Iterable[nn.Parameter], train_config: TrainConfig, model_dim: int
) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Build Adam (no weight decay) and its learning-rate schedule.

    Call ``scheduler.step()`` after each ``optimizer.step()``. LambdaLR counts
    from 0, so its factor for index i is the schedule's step i + 1; the base
    learning rate is 1 so the factor is the learning rate itself.

    Args:
        params: the trainable parameters only.
        train_config: Adam betas and eps, warmup_steps, lr_scale.
        model_dim: d_model, which the schedule scales by model_dim^-0.5.

    Returns:
        (optimizer, scheduler).
    """
    optimizer = torch.optim.Adam(
        params,
        lr=1.0,
        betas=(train_config.adam_beta1, train_config.adam_beta2),
        eps=train_config.adam_eps,
    )

    def rate(index: int) -> float:
        return transformer_learning_rate(
            index + 1, model_dim, train_config.warmup_steps, train_config.lr_scale
        )

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
    return optimizer, scheduler


def clip_gradients(params: Iterable[nn.Parameter], max_norm: float) -> Tensor | None:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)) of their global norm.

    Args:
        params: parameters whose ``.grad`` to clip in place.
        max_norm: largest global L2 norm; 0 disables clipping.

    Returns:
        The global norm before clipping, or ``None`` when clipping is off.
    """
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
