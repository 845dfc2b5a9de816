"""Adam with the warmup schedule of section 5.3, and gradient clipping.

JAX twin of ``torch_impl/optim.py``, as one optax chain. Section 5.3 trains with Adam
(beta1 0.9, beta2 0.98, eps 1e-9, no weight decay) and the learning rate

    lr = lr_scale * d_model^-0.5 * min(s^-0.5, s * warmup_steps^-1.5)

for optimizer step s counted from 1 (``twinformer.schedule``). Clipping
follows ``torch.nn.utils.clip_grad_norm_``: every gradient is scaled by
min(1, max_norm / (norm + 1e-6)), with norm the global L2 norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from twinformer.config import TrainConfig

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
CLIP_EPSILON = 1e-6


def learning_rate_schedule(train_config: TrainConfig, model_dim: int) -> optax.Schedule:
    """Return count -> learning rate for optax, where count = step - 1.

    This is ``twinformer.schedule.transformer_learning_rate`` written with
    jnp, because optax calls it on a traced counter. It computes in float64
    when 64-bit JAX is on; optax casts the rate to each gradient's dtype.
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    scale = train_config.lr_scale * model_dim**-0.5
    warmup = train_config.warmup_steps

    def schedule(count: jax.Array) -> jax.Array:
        # optax counts updates from 0; the formula counts steps from 1.
        step = jnp.asarray(count, dtype) + 1.0
        return scale * jnp.minimum(step**-0.5, step * warmup**-1.5)

    return schedule


class ClipState(NamedTuple):
    """``clip_by_global_norm`` keeps no state."""


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all updates by min(1, max_norm / (global_norm + 1e-6)).

    ``optax.clip_by_global_norm`` scales by max_norm / norm without the 1e-6;
    this version matches ``torch.nn.utils.clip_grad_norm_`` so the twins clip
    identically.

    Args:
        max_norm: the largest global L2 norm let through.

    Returns:
        A stateless gradient transformation.
    """

    def init(params: Any) -> ClipState:
        del params
        return ClipState()

    def update(
        updates: Any, state: ClipState, params: Any = None
    ) -> tuple[Any, ClipState]:
        del params
        norm = optax.tree.norm(updates)
        scale = jnp.minimum(1.0, max_norm / (norm + CLIP_EPSILON))
        scaled = jax.tree_util.tree_map(
            lambda update: (update * scale).astype(update.dtype), updates
        )
        return scaled, state

    return optax.GradientTransformation(init, update)


def make_optimizer(
    train_config: TrainConfig, model_dim: int
) -> optax.GradientTransformation:
    """Build clipping (when ``clip_grad_norm`` > 0) followed by scheduled Adam.

    Args:
        train_config: Adam moments, schedule and clipping settings.
        model_dim: d_model, which scales the schedule.

    Returns:
        The optax transformation; its state contains Adam's moments for exactly
        the leaves of the tree passed to ``init``.
    """
    adam = optax.adam(
        learning_rate=learning_rate_schedule(train_config, model_dim),
        b1=train_config.adam_beta1,
        b2=train_config.adam_beta2,
        eps=train_config.adam_eps,
    )
    if train_config.clip_grad_norm > 0:
        return optax.chain(clip_by_global_norm(train_config.clip_grad_norm), adam)
    return adam
