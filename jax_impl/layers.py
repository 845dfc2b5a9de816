"""Embeddings, LayerNorm, feed-forward network and the two Transformer layers.

JAX twin of ``torch_impl/layers.py``; each function takes its parameter
subtree, its LoRA subtree (or None), its inputs and a dropout key.

Each sub-layer (attention or feed-forward) is wrapped in a residual connection
and LayerNorm (Vaswani et al. 2017, section 3.1):

    post-LN (the paper):   x = LayerNorm(x + Dropout(Sublayer(x)))
    pre-LN:                x = x + Dropout(Sublayer(LayerNorm(x)))

Shapes: B batch, L sequence length, S source length, T target length,
D model dim, F feed-forward dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_impl.attention import multi_head_attention
from jax_impl.lora import dropout, linear_by_name, split_dropout_key
from twinformer.config import LoraConfig, ModelConfig

Tree = dict[str, Any]


def sinusoidal_position_encoding(
    length: int, model_dim: int, dtype: Any = jnp.float32
) -> jax.Array:
    """Build the fixed position table of section 3.5.

    PE(pos, 2i) = sin(pos / 10000^(2i / d_model)) on even dimensions and
    PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model)) on odd ones. The table is
    computed in float64 with numpy and then cast, so both twins start from the
    same values.

    Args:
        length: number of positions.
        model_dim: d_model; an odd width ends with a sine column.
        dtype: dtype of the result.

    Returns:
        The table.

    Shape:
        (L, D).
    """
    positions = np.arange(length, dtype=np.float64)[:, None]
    rates = 10000.0 ** (-np.arange(0, model_dim, 2, dtype=np.float64) / model_dim)
    angles = positions * rates  # (L, ceil(D / 2))
    table = np.zeros((length, model_dim), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : model_dim // 2])
    return jnp.asarray(table, dtype=dtype)


def embed(
    params: Tree,
    ids: jax.Array,
    *,
    config: ModelConfig,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
    offset: jax.Array | int = 0,
) -> jax.Array:
    """Embed tokens: Dropout(E[ids] * sqrt(d_model) + PE), section 3.4 and 3.5.

    Args:
        params: ``{"embedding": (V, D)}``.
        ids: int32 token ids.
        config: model shape and ``embedding_dropout``.
        dropout_key: PRNG key for the dropout.
        deterministic: True disables dropout.
        offset: position of the first token (non-zero in cached decoding).

    Returns:
        Embedded tokens in the embedding's dtype.

    Shape:
        ids (B, L) -> (B, L, D).
    """
    table = params["embedding"]
    # Look up the rows and scale them by sqrt(d_model): (B, L) -> (B, L, D).
    tokens = table[ids] * math.sqrt(config.model_dim)

    # Add the position encodings of positions offset .. offset + L - 1.
    position_table = sinusoidal_position_encoding(
        config.max_length, config.model_dim, table.dtype
    )
    positions = lax.dynamic_slice_in_dim(position_table, offset, ids.shape[1])
    summed = tokens + positions[None]
    return dropout(summed, config.embedding_dropout, dropout_key, deterministic)


def layer_norm(params: Tree, x: jax.Array, eps: float) -> jax.Array:
    """Normalise the last axis: (x - mean) / sqrt(var + eps) * scale + bias.

    The variance is the biased one (divided by D), as in
    ``torch.nn.LayerNorm``, and eps sits inside the square root.

    Args:
        params: ``{"scale": (D,), "bias": (D,)}``.
        x: activations.
        eps: ``ModelConfig.layer_norm_eps``.

    Returns:
        Normalised activations.

    Shape:
        (..., D) -> (..., D).
    """
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    normalised = (x - mean) / jnp.sqrt(variance + eps)
    return normalised * params["scale"] + params["bias"]


def feed_forward(
    params: Tree,
    x: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Apply FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, section 3.3.

    Args:
        params: ``{"hidden": {"kernel": (D, F), "bias": (F,)},
            "output": {"kernel": (F, D), "bias": (D,)}}``.
        x: activations.
        config: model shape.
        adapters: LoRA leaves for ``hidden`` and/or ``output``, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key for LoRA dropout.
        deterministic: True disables dropout.

    Returns:
        The network's output.

    Shape:
        (B, L, D) -> (B, L, F) -> (B, L, D).
    """
    keys = split_dropout_key(dropout_key, 2, deterministic)
    hidden = linear_by_name(
        params, adapters, lora_config, "hidden", x, keys[0], deterministic
    )
    hidden = jax.nn.relu(hidden)
    return linear_by_name(
        params, adapters, lora_config, "output", hidden, keys[1], deterministic
    )


def encoder_layer(
    params: Tree,
    x: jax.Array,
    mask: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Apply one encoder layer: self-attention, then feed-forward, section 3.1.

    Args:
        params: ``{"self_attention", "self_attention_norm", "feed_forward",
            "feed_forward_norm"}``, the trees of ``multi_head_attention``,
            ``layer_norm`` and ``feed_forward``.
        x: source activations.
        mask: source padding mask (B, 1, 1, S).
        config: model shape, dropout rates and ``norm_position``.
        adapters: this layer's LoRA subtree, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key for all dropout in the layer.
        deterministic: True disables dropout.

    Returns:
        The layer output.

    Shape:
        (B, S, D) -> (B, S, D).
    """
    keys = split_dropout_key(dropout_key, 4, deterministic)
    options = dict(config=config, lora_config=lora_config, deterministic=deterministic)

    # Self-attention sub-layer.
    normed = _normalize_input(params["self_attention_norm"], x, config)
    attended, _ = multi_head_attention(
        params["self_attention"],
        normed,
        normed,
        mask,
        adapters=_subtree(adapters, "self_attention"),
        dropout_key=keys[0],
        **options,
    )
    x = _add_and_normalize(params["self_attention_norm"], x, attended, keys[1], options)

    # Feed-forward sub-layer.
    normed = _normalize_input(params["feed_forward_norm"], x, config)
    transformed = feed_forward(
        params["feed_forward"],
        normed,
        adapters=_subtree(adapters, "feed_forward"),
        dropout_key=keys[2],
        **options,
    )
    return _add_and_normalize(
        params["feed_forward_norm"], x, transformed, keys[3], options
    )


def decoder_layer(
    params: Tree,
    x: jax.Array,
    memory: jax.Array | None,
    self_mask: jax.Array,
    cross_mask: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
    cache: Tree | None = None,
    cache_position: jax.Array | int = 0,
) -> tuple[jax.Array, Tree | None]:
    """Apply one decoder layer: masked self-attention, cross-attention, feed-forward.

    Args:
        params: ``{"self_attention", "self_attention_norm", "cross_attention",
            "cross_attention_norm", "feed_forward", "feed_forward_norm"}``.
        x: target activations.
        memory: encoder output; may be None with a cache.
        self_mask: causal and target padding mask (B, 1, T, T), or
            (B, 1, T, L) over the L cached positions.
        cross_mask: source padding mask (B, 1, 1, S).
        config: model shape, dropout rates and ``norm_position``.
        adapters: this layer's LoRA subtree, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key for all dropout in the layer.
        deterministic: True disables dropout.
        cache: ``{"self_attention": ..., "cross_attention": ...}``, each
            ``{"key", "value"}`` of (B, L or S, H, E), or None. The
            cross-attention entry contains the projected memory, so ``memory``
            is not read with a cache.
        cache_position: position of ``x[:, 0]`` in the cache.

    Returns:
        The layer output (B, T, D) and the updated cache (None without one).

    Shape:
        x (B, T, D), memory (B, S, D) -> (B, T, D).
    """
    keys = split_dropout_key(dropout_key, 6, deterministic)
    options = dict(config=config, lora_config=lora_config, deterministic=deterministic)
    self_cache = None if cache is None else cache["self_attention"]
    cross_cache = None if cache is None else cache["cross_attention"]
    cross_input = memory if cache is None else None

    # Masked self-attention sub-layer.
    normed = _normalize_input(params["self_attention_norm"], x, config)
    attended, self_cache = multi_head_attention(
        params["self_attention"],
        normed,
        normed,
        self_mask,
        adapters=_subtree(adapters, "self_attention"),
        dropout_key=keys[0],
        cache=self_cache,
        cache_position=cache_position,
        **options,
    )
    x = _add_and_normalize(params["self_attention_norm"], x, attended, keys[1], options)

    # Encoder-decoder attention sub-layer.
    normed = _normalize_input(params["cross_attention_norm"], x, config)
    attended, cross_cache = multi_head_attention(
        params["cross_attention"],
        normed,
        cross_input,
        cross_mask,
        adapters=_subtree(adapters, "cross_attention"),
        dropout_key=keys[2],
        cache=cross_cache,
        **options,
    )
    x = _add_and_normalize(
        params["cross_attention_norm"], x, attended, keys[3], options
    )

    # Feed-forward sub-layer.
    normed = _normalize_input(params["feed_forward_norm"], x, config)
    transformed = feed_forward(
        params["feed_forward"],
        normed,
        adapters=_subtree(adapters, "feed_forward"),
        dropout_key=keys[4],
        **options,
    )
    x = _add_and_normalize(
        params["feed_forward_norm"], x, transformed, keys[5], options
    )
    if cache is None:
        return x, None
    return x, {"self_attention": self_cache, "cross_attention": cross_cache}


def _subtree(tree: Tree | None, name: str) -> Tree | None:
    return tree.get(name) if tree else None


# JAX difference: the torch twin wraps each sub-layer in one residual module
# that takes the sub-layer as a callable. Here the attention sub-layer also
# returns its cache, so the wrapper is split into the two halves below.
def _normalize_input(norm_params: Tree, x: jax.Array, config: ModelConfig) -> jax.Array:
    # Pre-LN normalises the sub-layer's input; post-LN passes x through.
    if config.norm_position == "pre":
        return layer_norm(norm_params, x, config.layer_norm_eps)
    return x


def _add_and_normalize(
    norm_params: Tree,
    x: jax.Array,
    sublayer_output: jax.Array,
    dropout_key: jax.Array | None,
    options: dict[str, Any],
) -> jax.Array:
    # Residual dropout on the sub-layer output (section 5.4), then the residual
    # add; post-LN normalises the sum.
    config: ModelConfig = options["config"]
    dropped = dropout(
        sublayer_output, config.dropout, dropout_key, options["deterministic"]
    )
    if config.norm_position == "pre":
        return x + dropped
    return layer_norm(norm_params, x + dropped, config.layer_norm_eps)
