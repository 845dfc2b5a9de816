"""The learning-rate schedule of "Attention Is All You Need", section 5.3.

Both twins' optimizers call this one function, so their schedules cannot drift.
"""

from __future__ import annotations

from twinformer.errors import ConfigError


def transformer_learning_rate(
    step: int, model_dim: int, warmup_steps: int, lr_scale: float
) -> float:
    """Return the learning rate of optimizer step ``step``, counted from 1.

    lr = lr_scale * model_dim^-0.5 * min(step^-0.5, step * warmup_steps^-1.5)
    (Vaswani et al. 2017, equation 3, with ``lr_scale`` = 1). The rate grows
    linearly for ``warmup_steps`` steps, peaks at step ``warmup_steps`` and then
    decays with the inverse square root of the step.

    Args:
        step: optimizer step, 1 for the first update.
        model_dim: d_model, the width of the residual stream.
        warmup_steps: steps of linear warmup.
        lr_scale: factor on the whole schedule (1 in the paper).

    Returns:
        The learning rate as a Python float.

    Raises:
        ConfigError: if ``step``, ``model_dim`` or ``warmup_steps`` is below 1
            or ``lr_scale`` is not positive.
    """
    for name, value in (
        ("step", step),
        ("model_dim", model_dim),
        ("warmup_steps", warmup_steps),
    ):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value!r}")
    if lr_scale <= 0:
        raise ConfigError(f"lr_scale must be positive, got {lr_scale!r}")
    decay = step**-0.5
    warmup = step * warmup_steps**-1.5
    return float(lr_scale * model_dim**-0.5 * min(decay, warmup))
