"""Scaled dot-product and multi-head attention (Vaswani et al. 2017, section 3.2).

JAX twin of ``torch_impl/attention.py``. The heads axis sits after the length
axis, ``(B, L, H, E)``, the layout of ``jax.nn.dot_product_attention``; the
torch twin keeps ``(B, H, L, E)``.

Masks are boolean, True where a query may attend to a key, and broadcast to
``(B, H, Q, K)``: padding masks are ``(B, 1, 1, K)``, the causal mask
``(1, 1, Q, K)``. A query whose keys are all masked gets a zero output.

Shapes: B batch, Q query length, K key length, H heads (``num_heads``),
E head dim (``head_dim`` = d_k = d_v), D model dim (``model_dim``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jax_impl.lora import dropout, linear_by_name, split_dropout_key
from twinformer.config import LoraConfig, ModelConfig

Tree = dict[str, Any]
PROJECTIONS = ("query", "key", "value", "output")


def attend_manual(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Compute Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V step by step.

    Section 3.2.1, with dropout on the attention weights when
    ``dropout_rate`` > 0 (the paper does not use it).

    Args:
        query: queries.
        key: keys.
        value: values.
        mask: boolean, True where a query may attend to a key.
        dropout_rate: dropout on the attention weights.
        dropout_key: PRNG key for that dropout.
        deterministic: True disables dropout.

    Returns:
        The attended values; zero for a query with every key masked.

    Shape:
        query (B, Q, H, E), key and value (B, K, H, E), mask broadcastable to
        (B, H, Q, K) -> (B, Q, H, E).
    """
    # Scores: one scaled dot product per query and key, (B, H, Q, K).
    scores = jnp.einsum("bqhe,bkhe->bhqk", query, key) / math.sqrt(query.shape[-1])

    # Masked keys get the dtype's minimum, so softmax gives them zero weight.
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    # A row with every key masked would be a uniform average; make it zero.
    weights = jnp.where(mask, weights, jnp.zeros_like(weights))
    weights = dropout(weights, dropout_rate, dropout_key, deterministic)

    # Weighted sum of values: (B, H, Q, K) x (B, K, H, E) -> (B, Q, H, E).
    return jnp.einsum("bhqk,bkhe->bqhe", weights, value)


def attend_fused(
    query: jax.Array, key: jax.Array, value: jax.Array, mask: jax.Array
) -> jax.Array:
    """Compute the same attention as ``attend_manual`` with one library call.

    ``jax.nn.dot_product_attention`` has no dropout argument, so this path
    serves evaluation and training without attention dropout.

    NOTE: its XLA implementation (jax 0.10.2) computes the softmax in float32
    even for float64 inputs, so in float64 this path matches ``attend_manual``
    only to about 1e-6. Float64 parity checks use the manual path.

    Args:
        query: queries.
        key: keys.
        value: values.
        mask: boolean, True where a query may attend to a key.

    Returns:
        The attended values; zero for a query with every key masked.

    Shape:
        query (B, Q, H, E), key and value (B, K, H, E), mask broadcastable to
        (B, H, Q, K) -> (B, Q, H, E).
    """
    # The library averages the values for a row with every key masked, but
    # such rows must give zeros. has_key is (B, Q or 1, H, 1).
    has_key = jnp.swapaxes(jnp.any(mask, axis=-1), 1, 2)[..., None]
    if mask.shape[-2] == 1:
        # JAX difference: with a padding mask every query may attend to the
        # same keys, so zeroing the values of a batch row without keys zeroes
        # its output, and no pass over the output is needed.
        # NOTE: this relies on the library's XLA implementation (the default
        # in jax 0.10.2), which fills masked scores with a finite number, so
        # that a row without keys averages the zeroed values.
        value = jnp.where(has_key, value, jnp.zeros_like(value))
        return jax.nn.dot_product_attention(query, key, value, mask=mask)
    output = jax.nn.dot_product_attention(query, key, value, mask=mask)
    return jnp.where(has_key, output, jnp.zeros_like(output))


def multi_head_attention(
    params: Tree,
    query_input: jax.Array,
    key_value_input: jax.Array | None,
    mask: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
    cache: Tree | None = None,
    cache_position: jax.Array | int = 0,
) -> tuple[jax.Array, Tree | None]:
    """Compute MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, section 3.2.2.

    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V); the h heads of width d_k
    are one (D, D) projection each, split into (H, E).

    Args:
        params: ``{"query", "key", "value", "output"}``, each
            ``{"kernel": (D, D), "bias": (D,)}``.
        query_input: the sequence whose positions are the queries.
        key_value_input: the sequence attended to. With a ``cache``, its keys
            and values are written into the cache at ``cache_position``; None
            reads the cached keys and values unchanged.
        mask: boolean, True where a query may attend to a key, over the L
            cache positions when a cache is given.
        config: model shape and the attention path ("manual" or "fused").
        adapters: LoRA leaves for some of the four projections, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key for attention and LoRA dropout.
        deterministic: True disables dropout.
        cache: ``{"key": (B, L, H, E), "value": (B, L, H, E)}``, or None to
            attend to ``key_value_input`` alone.
        cache_position: first cache index that the new keys fill.

    Returns:
        The output (B, Q, D) and the updated cache (None without one).

    Shape:
        query_input (B, Q, D), key_value_input (B, K, D) -> (B, Q, D).
    """
    keys = split_dropout_key(dropout_key, len(PROJECTIONS) + 1, deterministic)
    project = _projector(params, adapters, lora_config, deterministic)

    # Project to heads: queries (B, Q, H, E); keys and values (B, K, H, E).
    query = _split_heads(project("query", query_input, keys[0]), config.num_heads)
    if cache is None:
        key, value = _project_key_value(project, key_value_input, keys, config)
    else:
        cache = _read_cache(
            project, key_value_input, cache, cache_position, keys, config
        )
        key, value = cache["key"], cache["value"]

    # Attend per head; training with attention dropout takes the manual path.
    heads = _attend(query, key, value, mask, config, keys[3], deterministic)

    # Join the heads and apply W^O: (B, Q, H, E) -> (B, Q, D).
    joined = heads.reshape(heads.shape[:2] + (config.model_dim,))
    return project("output", joined, keys[4]), cache


def project_key_value(
    params: Tree,
    key_value_input: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Project (B, K, D) inputs to keys and values, each (B, K, H, E), no dropout."""
    project = _projector(params, adapters, lora_config, deterministic=True)
    return _project_key_value(project, key_value_input, [None] * 3, config)


def _projector(
    params: Tree,
    adapters: Tree | None,
    lora_config: LoraConfig | None,
    deterministic: bool,
) -> Callable[[str, jax.Array, jax.Array | None], jax.Array]:
    def project(name: str, x: jax.Array, key: jax.Array | None) -> jax.Array:
        return linear_by_name(
            params, adapters, lora_config, name, x, key, deterministic
        )

    return project


def _project_key_value(
    project: Callable, key_value_input: jax.Array, keys: list, config: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    key = _split_heads(project("key", key_value_input, keys[1]), config.num_heads)
    value = _split_heads(project("value", key_value_input, keys[2]), config.num_heads)
    return key, value


def _read_cache(
    project: Callable,
    key_value_input: jax.Array | None,
    cache: Tree,
    position: jax.Array | int,
    keys: list,
    config: ModelConfig,
) -> Tree:
    # JAX difference: the cache comes back updated instead of written in place.
    if key_value_input is None:
        return cache
    new_key, new_value = _project_key_value(project, key_value_input, keys, config)
    return {
        "key": lax.dynamic_update_slice_in_dim(cache["key"], new_key, position, 1),
        "value": lax.dynamic_update_slice_in_dim(
            cache["value"], new_value, position, 1
        ),
    }


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    # (B, L, D) -> (B, L, H, E)
    return x.reshape(x.shape[:2] + (num_heads, x.shape[-1] // num_heads))


def _attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    mask: jax.Array,
    config: ModelConfig,
    dropout_key: jax.Array | None,
    deterministic: bool,
) -> jax.Array:
    # JAX difference: jax.nn.dot_product_attention has no dropout, whereas the
    # torch twin's fused path passes dropout_p to scaled_dot_product_attention.
    needs_dropout = not deterministic and config.attention_dropout > 0
    if config.attention == "fused" and not needs_dropout:
        return attend_fused(query, key, value, mask)
    return attend_manual(
        query,
        key,
        value,
        mask,
        dropout_rate=config.attention_dropout,
        dropout_key=dropout_key,
        deterministic=deterministic,
    )
