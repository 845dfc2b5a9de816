"""The encoder-decoder Transformer as pure functions (Vaswani et al. 2017).

JAX twin of ``torch_impl/model.py``. The model is a function of the base
parameter tree, the LoRA adapter tree (or None), the token ids, a dropout PRNG
key and a ``deterministic`` flag. ``config`` is a static argument under
``jax.jit``, which works because ``ModelConfig`` is frozen and hashable.

The parameter tree, with ``layers_{i}`` for layer i and the shapes of the
tree's leaves::

    source_embedding/embedding       (V_src, D)   absent with share_embeddings
    target_embedding/embedding       (V, D)
    encoder/layers_{i}/self_attention/{query,key,value,output}/kernel (D, D), bias (D,)
    encoder/layers_{i}/self_attention_norm/scale (D,), bias (D,)
    encoder/layers_{i}/feed_forward/hidden/kernel (D, F), bias (F,)
    encoder/layers_{i}/feed_forward/output/kernel (F, D), bias (D,)
    encoder/layers_{i}/feed_forward_norm/scale, bias
    encoder/final_norm/scale, bias                 pre-LN only
    decoder/layers_{i}/{self_attention,cross_attention}/...   as above
    decoder/layers_{i}/{self_attention,cross_attention,feed_forward}_norm/...
    decoder/layers_{i}/feed_forward/...
    decoder/final_norm/scale, bias                 pre-LN only
    output_projection/kernel         (D, V)        absent with tie_output

``twinformer.param_map.base_tensor_specs`` lists the same leaves with their
checkpoint names.

Shapes: B batch, S source length, T target length, D model dim, V target
vocabulary, F feed-forward dim.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_impl.attention import project_key_value
from jax_impl.layers import decoder_layer, embed, encoder_layer, layer_norm
from jax_impl.lora import matmul_rows, split_dropout_key
from twinformer.config import PAD_ID, LoraConfig, ModelConfig
from twinformer.errors import ConfigError, DataError
from twinformer.param_map import TensorSpec, base_tensor_specs

Tree = dict[str, Any]
SUPPORTED_DTYPES = ("float32", "float64")
X64_FIX = (
    "set JAX_ENABLE_X64=1 or jax.config.update('jax_enable_x64', True) before using JAX"
)


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Return the numpy dtype for a parameter dtype name or object.

    Raises:
        ConfigError: the dtype is neither float32 nor float64, or float64 is
            requested while JAX runs without 64-bit types, where it would
            silently compute in float32.
    """
    name = np.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        raise ConfigError(
            f"parameter dtype {name!r} is not supported; use one of "
            f"{', '.join(SUPPORTED_DTYPES)}"
        )
    if name == "float64" and not jax.config.read("jax_enable_x64"):
        raise ConfigError(
            f"float64 was requested but JAX runs with 32-bit types only; {X64_FIX}"
        )
    return np.dtype(name)


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Tree:
    """Initialise the base parameter tree described in the module docstring.

    Embeddings are normal with std d_model^-0.5, linear kernels Xavier-uniform,
    biases zero, LayerNorm scales one, as in the torch twin.

    Args:
        config: model shape.
        key: PRNG key.
        dtype: float32, or float64 with 64-bit JAX enabled.

    Returns:
        The parameter tree.

    Raises:
        ConfigError: an unsupported dtype (see ``resolve_dtype``).
    """
    dtype = resolve_dtype(dtype)
    specs = base_tensor_specs(config)
    # One draw per distribution, cut into leaves in table order: drawing leaf
    # by leaf would compile one small program per leaf shape.
    draws = {
        kind: _draw(
            kind, sum(_size(s) for s in specs if s.path[-1] == kind), key, dtype
        )
        for kind, key in zip(
            ("embedding", "kernel"), jax.random.split(key), strict=True
        )
    }
    offsets = dict.fromkeys(draws, 0)
    tree: Tree = {}
    for spec in specs:
        kind = spec.path[-1]
        if kind in draws:
            flat = draws[kind][offsets[kind] : offsets[kind] + _size(spec)]
            offsets[kind] += _size(spec)
            value = _scaled(kind, flat.reshape(spec.jax_shape), config)
        else:
            fill = 1.0 if kind == "scale" else 0.0
            value = np.full(spec.jax_shape, fill, dtype)
        node = tree
        for name in spec.path[:-1]:
            node = node.setdefault(name, {})
        node[kind] = jnp.asarray(value, dtype)
    return tree


def _size(spec: TensorSpec) -> int:
    return math.prod(spec.shape)


def _draw(kind: str, size: int, key: jax.Array, dtype: np.dtype) -> np.ndarray:
    # Standard normal for embeddings, U(-1, 1) for kernels.
    if kind == "embedding":
        return np.asarray(jax.random.normal(key, (size,), dtype))
    return np.asarray(jax.random.uniform(key, (size,), dtype, -1.0, 1.0))


def _scaled(kind: str, draw: np.ndarray, config: ModelConfig) -> np.ndarray:
    if kind == "embedding":
        # Normal with std d_model^-0.5.
        return draw * config.model_dim**-0.5
    # Xavier-uniform: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
    return draw * math.sqrt(6.0 / (draw.shape[0] + draw.shape[1]))


def padding_mask(ids: jax.Array) -> jax.Array:
    """Return True where a key is a real token: (B, L) -> (B, 1, 1, L)."""
    return (ids != PAD_ID)[:, None, None, :]


def causal_mask(query_positions: jax.Array, key_length: int) -> jax.Array:
    """Let each query position attend to keys at or before it: (1, 1, Q, K)."""
    key_positions = jnp.arange(key_length)
    return (key_positions[None, :] <= query_positions[:, None])[None, None]


def check_token_ids(ids: Any, vocab_size: int, max_length: int, name: str) -> None:
    """Check concrete token ids before they enter a compiled function.

    Traced values (inside ``jax.jit``) pass unchecked, because their contents
    are unknown until run time.

    Raises:
        DataError: ``ids`` is not a 2-D integer array, contains an id outside
            [0, vocab_size), or is longer than ``max_length``.
    """
    if isinstance(ids, jax.core.Tracer):
        return
    array = np.asarray(ids)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise DataError(
            f"{name} must be a 2-D integer array (batch, length), got shape "
            f"{array.shape} and dtype {array.dtype}"
        )
    if array.shape[1] > max_length:
        raise DataError(
            f"{name} has length {array.shape[1]}, above the model's max_length "
            f"{max_length}; shorten the sequences or build the model with a "
            "larger max_length"
        )
    if array.size and (array.min() < 0 or array.max() >= vocab_size):
        bad = array[(array < 0) | (array >= vocab_size)][0]
        raise DataError(
            f"{name} contains token id {int(bad)}, outside the vocabulary "
            f"[0, {vocab_size}); encode the text with the model's tokenizer"
        )


def encode(
    params: Tree,
    source_ids: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Run the encoder stack over the source, section 3.1.

    Args:
        params: the base tree of the module docstring.
        source_ids: source token ids, PAD_ID after the end.
        config: model shape.
        adapters: the LoRA tree, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key, needed when ``deterministic`` is False.
        deterministic: True disables dropout.

    Returns:
        The memory that the decoder attends to.

    Shape:
        source_ids (B, S) -> (B, S, D).

    Raises:
        DataError: concrete ids outside the vocabulary or too long.
    """
    check_token_ids(
        source_ids, config.source_vocab_size, config.max_length, "source_ids"
    )
    source_ids = jnp.asarray(source_ids, jnp.int32)
    keys = split_dropout_key(dropout_key, config.num_encoder_layers + 1, deterministic)
    layer_adapters = (adapters or {}).get("encoder", {})

    # Embed the source tokens, the target table when the two are shared.
    table = "target_embedding" if config.share_embeddings else "source_embedding"
    x = embed(
        params[table],
        source_ids,
        config=config,
        dropout_key=keys[0],
        deterministic=deterministic,
    )

    # N encoder layers over the padding mask, then the pre-LN final norm.
    mask = padding_mask(source_ids)
    for i in range(config.num_encoder_layers):
        x = encoder_layer(
            params["encoder"][f"layers_{i}"],
            x,
            mask,
            config=config,
            adapters=layer_adapters.get(f"layers_{i}"),
            lora_config=lora_config,
            dropout_key=keys[i + 1],
            deterministic=deterministic,
        )
    if config.norm_position == "pre":
        x = layer_norm(params["encoder"]["final_norm"], x, config.layer_norm_eps)
    return x


def decode(
    params: Tree,
    target_input_ids: jax.Array,
    memory: jax.Array | None,
    source_ids: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
    cache: Tree | None = None,
) -> tuple[jax.Array, Tree | None]:
    """Predict the next token at every target position (section 3.1 and 3.4).

    Args:
        params: the base tree of the module docstring.
        target_input_ids: [BOS] + target, PAD_ID after the end. With a cache,
            the T ids that follow the ``cache["position"]`` ids decoded so far.
        memory: the encoder output; not read with a cache, whose
            cross-attention keys and values were projected once.
        source_ids: the source ids, for the cross-attention padding mask.
        config: model shape.
        adapters: the LoRA tree, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key, needed when ``deterministic`` is False.
        deterministic: True disables dropout.
        cache: from ``init_cache``, or None to decode the whole prefix at once.

    Returns:
        Logits (B, T, V), and the cache with the new keys, values and ids
        written and its position advanced by T (None without a cache).

    Shape:
        target_input_ids (B, T), memory (B, S, D), source_ids (B, S)
        -> (B, T, V).

    Raises:
        DataError: concrete ids outside the vocabulary or too long.
    """
    check_token_ids(
        target_input_ids, config.target_vocab_size, config.max_length, "target ids"
    )
    target_input_ids = jnp.asarray(target_input_ids, jnp.int32)
    keys = split_dropout_key(dropout_key, config.num_decoder_layers + 1, deterministic)
    layer_adapters = (adapters or {}).get("decoder", {})
    offset = 0 if cache is None else cache["position"]

    # Embed the target tokens at their positions.
    x = embed(
        params["target_embedding"],
        target_input_ids,
        config=config,
        dropout_key=keys[0],
        deterministic=deterministic,
        offset=offset,
    )

    # N decoder layers, then the pre-LN final norm.
    self_mask, cache = _self_attention_mask(target_input_ids, cache)
    cross_mask = padding_mask(jnp.asarray(source_ids, jnp.int32))
    layer_caches = []
    for i in range(config.num_decoder_layers):
        x, layer_cache = decoder_layer(
            params["decoder"][f"layers_{i}"],
            x,
            memory,
            self_mask,
            cross_mask,
            config=config,
            adapters=layer_adapters.get(f"layers_{i}"),
            lora_config=lora_config,
            dropout_key=keys[i + 1],
            deterministic=deterministic,
            cache=None if cache is None else cache["layers"][i],
            cache_position=offset,
        )
        layer_caches.append(layer_cache)
    if config.norm_position == "pre":
        x = layer_norm(params["decoder"]["final_norm"], x, config.layer_norm_eps)
    if cache is not None:
        length = target_input_ids.shape[1]
        cache = dict(cache, position=offset + length, layers=layer_caches)
    return output_logits(params, x, config), cache


def _self_attention_mask(
    target_input_ids: jax.Array, cache: Tree | None
) -> tuple[jax.Array, Tree | None]:
    # Without a cache: causal (1, 1, T, T) & target padding (B, 1, 1, T).
    length = target_input_ids.shape[1]
    if cache is None:
        return causal_mask(jnp.arange(length), length) & padding_mask(
            target_input_ids
        ), None

    # With a cache: the new ids join the cached ids, and the mask runs over
    # all L cached positions, (B, 1, T, L). JAX difference: the ids are
    # written with dynamic_update_slice and the cache is returned.
    start = cache["position"]
    key_ids = lax.dynamic_update_slice_in_dim(
        cache["target_ids"], target_input_ids, start, axis=1
    )
    positions = start + jnp.arange(length)
    mask = causal_mask(positions, key_ids.shape[1]) & padding_mask(key_ids)
    return mask, dict(cache, target_ids=key_ids)


def init_cache(
    params: Tree,
    memory: jax.Array,
    max_length: int,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
) -> Tree:
    """Build a decoding cache for up to ``max_length`` decoder positions.

    Self-attention keys and values are preallocated, (B, L, H, E) with
    L = ``max_length``, and written at ``position`` step by step; unused
    positions stay masked because ``target_ids`` contains PAD_ID there.
    Cross-attention keys and values, (B, S, H, E), are projected once here.

    Args:
        params: the base tree of the module docstring.
        memory: encoder output, (B, S, D).
        max_length: decoder positions the cache holds, at most
            ``config.max_length``.
        config: model shape.
        adapters: the LoRA tree, or None.
        lora_config: the adapters' scaling and dropout.

    Returns:
        ``{"position": () int32, "target_ids": (B, L) int32, "layers":
        [{"self_attention": {"key", "value"}, "cross_attention": {"key",
        "value"}}, ...]}``.

    Raises:
        DataError: ``max_length`` exceeds ``config.max_length``.
    """
    if max_length > config.max_length:
        raise DataError(
            f"cache length {max_length} exceeds the model's max_length "
            f"{config.max_length}; decode fewer tokens"
        )
    batch = memory.shape[0]
    shape = (batch, max_length, config.num_heads, config.head_dim)
    layer_adapters = (adapters or {}).get("decoder", {})
    layers = []
    for i in range(config.num_decoder_layers):
        name = f"layers_{i}"
        key, value = project_key_value(
            params["decoder"][name]["cross_attention"],
            memory,
            config=config,
            adapters=(layer_adapters.get(name) or {}).get("cross_attention"),
            lora_config=lora_config,
        )
        empty = jnp.zeros(shape, memory.dtype)
        layers.append(
            {
                "self_attention": {"key": empty, "value": empty},
                "cross_attention": {"key": key, "value": value},
            }
        )
    target_ids = jnp.full((batch, max_length), PAD_ID, jnp.int32)
    return {"position": jnp.int32(0), "target_ids": target_ids, "layers": layers}


def output_logits(params: Tree, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Project to vocabulary logits with no bias, tied or untied (section 3.4).

    Shape:
        (B, T, D) -> (B, T, V).
    """
    if config.tie_output:
        # x E^T with the target embedding matrix E (V, D).
        return matmul_rows(x, params["target_embedding"]["embedding"].T)
    return matmul_rows(x, params["output_projection"]["kernel"])


def forward(
    params: Tree,
    source_ids: jax.Array,
    target_input_ids: jax.Array,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    dropout_key: jax.Array | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Encode the source and decode the shifted target in one pass.

    Args:
        params: the base tree of the module docstring.
        source_ids: source token ids, PAD_ID after the end.
        target_input_ids: [BOS] + target, PAD_ID after the end.
        config: model shape.
        adapters: the LoRA tree, or None.
        lora_config: the adapters' scaling and dropout.
        dropout_key: PRNG key, needed when ``deterministic`` is False.
        deterministic: True disables dropout.

    Returns:
        Logits over the target vocabulary.

    Shape:
        source_ids (B, S), target_input_ids (B, T) -> (B, T, V).

    Raises:
        DataError: concrete ids outside the vocabulary or too long.
    """
    encoder_key, decoder_key = split_dropout_key(dropout_key, 2, deterministic)
    options = dict(config=config, adapters=adapters, lora_config=lora_config)
    memory = encode(
        params,
        source_ids,
        dropout_key=encoder_key,
        deterministic=deterministic,
        **options,
    )
    logits, _ = decode(
        params,
        target_input_ids,
        memory,
        source_ids,
        dropout_key=decoder_key,
        deterministic=deterministic,
        **options,
    )
    return logits
