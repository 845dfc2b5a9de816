"""LoRA adapters as a pytree separate from the frozen base (Hu et al. 2021).

A linear layer h = x W + b is adapted by a low-rank update (LoRA, section 4.1):

    h = x W + b + (alpha / r) * dropout(x) A B

with A (in, r) Kaiming-uniform and B (r, out) zero, so a fresh adapter leaves
the output unchanged. Names: ``lora_rank`` is r, ``lora_alpha`` is alpha,
``scaling`` is alpha / r (alpha / sqrt(r) with rsLoRA).

The adapter tree mirrors the base tree but holds only the targeted linear
layers, each with two leaves instead of ``kernel`` and ``bias``::

    {"encoder": {"layers_0": {"self_attention": {"query": {
        "lora_A": (in, R), "lora_B": (R, out)}}}}, ...}

Paths come from ``twinformer.param_map.adapter_tensor_specs``. Because the
base and adapter trees are separate and every function here is pure,
``merge_lora`` returns a new base tree. Merging twice means passing an
already-merged tree back in by hand, which no code path in this package does.

This module also contains ``dropout`` and ``split_dropout_key``, which every other
module of the JAX twin uses for its dropout.

Shapes: B batch, L sequence length, R rank; ``in`` and ``out`` are the layer's
input and output widths.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from twinformer import checkpoint
from twinformer.config import LoraConfig, ModelConfig
from twinformer.errors import ConfigError, LoraError
from twinformer.param_map import adapter_tensor_specs, from_tree, to_tree

Tree = dict[str, Any]


def dropout(
    x: jax.Array, rate: float, key: jax.Array | None, deterministic: bool
) -> jax.Array:
    """Zero each entry with probability ``rate`` and scale the rest by 1/(1-rate).

    Args:
        x: any array.
        rate: drop probability in [0, 1).
        key: PRNG key; only read when dropout is active.
        deterministic: True returns ``x`` unchanged (evaluation).

    Returns:
        An array of the shape and dtype of ``x``.
    """
    if deterministic or rate == 0.0:
        return x
    keep_prob = 1.0 - rate
    # JAX difference: an entry is kept when sqrt(u) < sqrt(keep_prob) for a
    # uniform float32 u, not when u < keep_prob. Since sqrt is monotonic, the
    # two masks differ at most for the one grid value of u (spacing 2^-23)
    # nearest keep_prob. XLA counts the square root as expensive, so it
    # computes the mask once and keeps it for the backward pass (23 MB more
    # temporary memory in a d_model 256, 4+4 layer step of 32 x 32 tokens).
    # With the plain comparison XLA computed the random bits again in each of
    # the mask's three users, and the step took 2.8% longer on one CPU core.
    uniform = jax.random.uniform(key, x.shape, jnp.float32)
    keep = jnp.sqrt(uniform) < np.float32(math.sqrt(keep_prob))
    return jnp.where(keep, x / keep_prob, jnp.zeros_like(x))


def split_dropout_key(
    key: jax.Array | None, num: int, deterministic: bool
) -> list[jax.Array | None]:
    """Split one dropout key into ``num`` keys, one per use.

    Returns ``num`` Nones when ``deterministic`` is True.

    Raises:
        ConfigError: ``deterministic`` is False and ``key`` is None.
    """
    if deterministic:
        return [None] * num
    if key is None:
        raise ConfigError(
            "dropout_key is None but deterministic=False; pass a key from "
            "jax.random.key(seed) or set deterministic=True"
        )
    return list(jax.random.split(key, num))


def lora_linear(
    params: Tree,
    adapter: Tree | None,
    x: jax.Array,
    *,
    scaling: float,
    dropout_rate: float,
    dropout_key: jax.Array | None,
    deterministic: bool,
) -> jax.Array:
    """Apply h = x W + b + scaling * dropout(x) A B, without forming W + s A B.

    Args:
        params: ``{"kernel": (in, out), "bias": (out,)}``, the frozen layer.
        adapter: ``{"lora_A": (in, R), "lora_B": (R, out)}``, or None for a
            plain linear layer.
        x: input activations.
        scaling: alpha / r (``LoraConfig.scaling``).
        dropout_rate: dropout on the adapter's input only.
        dropout_key: PRNG key for that dropout.
        deterministic: True disables dropout.

    Returns:
        The layer output.

    Shape:
        x (..., in) -> (..., out).
    """
    output = matmul_rows(x, params["kernel"]) + params["bias"]
    if adapter is None:
        return output
    # Dropout applies to the low-rank path only; the frozen path uses x.
    lora_input = dropout(x, dropout_rate, dropout_key, deterministic)
    # (..., in) @ (in, R) @ (R, out) -> (..., out)
    update = matmul_rows(matmul_rows(lora_input, adapter["lora_A"]), adapter["lora_B"])
    return output + scaling * update


@jax.custom_vjp
def matmul_rows(x: jax.Array, matrix: jax.Array) -> jax.Array:
    """Return x @ matrix as one 2-D product over the rows of x.

    JAX difference: XLA's CPU backend is slow at two forms of this product's
    gradient. So the function flattens the leading axes and has its own
    backward pass, and it computes the numbers of ``x @ matrix``. Because of
    the custom backward pass, the model supports reverse-mode differentiation
    (``jax.grad``, ``jax.vjp``) but not forward mode (``jax.jvp``).
    Measured on one CPU core with d_model 256: the flattening took a
    feed-forward block's forward and backward pass from 44 ms to 35 ms, and
    the weight gradient below from 10.3 ms to 4.8 ms per product.

    Shape:
        x (..., in), matrix (in, out) -> (..., out).
    """
    rows = x.reshape(-1, x.shape[-1]) @ matrix
    return rows.reshape(x.shape[:-1] + (matrix.shape[-1],))


def _matmul_rows_forward(
    x: jax.Array, matrix: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return matmul_rows(x, matrix), (x, matrix)


def _matmul_rows_backward(
    residuals: tuple[jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, matrix = residuals
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    grad_rows = grad.reshape(-1, matrix.shape[-1])  # (N, out)
    grad_x = (grad_rows @ matrix.T).reshape(x.shape)
    # The matrix gradient x^T g contracts the N rows of both operands. XLA's
    # CPU dot writes such a product about 2.4x more slowly as (in, out) than
    # as (out, in) when in > out, so that case computes (g^T x)^T. The
    # barrier stops XLA from folding the transpose back into the product.
    if matrix.shape[0] > matrix.shape[1]:
        grad_matrix = lax.optimization_barrier(grad_rows.T @ rows).T
    else:
        grad_matrix = rows.T @ grad_rows
    return grad_x, grad_matrix


matmul_rows.defvjp(_matmul_rows_forward, _matmul_rows_backward)


def linear_by_name(
    params: Tree,
    adapters: Tree | None,
    lora_config: LoraConfig | None,
    name: str,
    x: jax.Array,
    dropout_key: jax.Array | None,
    deterministic: bool,
) -> jax.Array:
    """Apply the linear layer ``params[name]``, with its adapter when there is one.

    Args:
        params: a subtree holding ``name``: ``{"kernel", "bias"}``.
        adapters: the matching adapter subtree, or None.
        lora_config: scaling and dropout; read only when ``name`` is adapted.
        name: the layer's key, such as "query" or "hidden".
        x: input activations.
        dropout_key: PRNG key for LoRA dropout.
        deterministic: True disables dropout.

    Returns:
        The layer output, as ``lora_linear``.
    """
    adapter = adapters.get(name) if adapters else None
    return lora_linear(
        params[name],
        adapter,
        x,
        scaling=lora_config.scaling if adapter else 0.0,
        dropout_rate=lora_config.dropout if adapter else 0.0,
        dropout_key=dropout_key,
        deterministic=deterministic,
    )


def init_lora(
    model_config: ModelConfig,
    lora_config: LoraConfig,
    key: jax.Array,
    dtype: Any = jnp.float32,
) -> Tree:
    """Build a fresh adapter tree: A Kaiming-uniform, B zero.

    A is drawn from U(-1/sqrt(in), 1/sqrt(in)), the bound that PyTorch's
    ``kaiming_uniform_(a=sqrt(5))`` gives, as in the LoRA reference code.

    Args:
        model_config: the base model the adapters attach to.
        lora_config: rank and targets.
        key: PRNG key.
        dtype: dtype of the adapter leaves, float32 or float64.

    Returns:
        The adapter tree described in the module docstring.

    Raises:
        ConfigError: an unsupported dtype, or float64 without 64-bit JAX.
        LoraError: a target matches no layer, or the rank exceeds a layer's
            min(in, out).
    """
    # Imported here because jax_impl.model imports this module.
    from jax_impl.model import resolve_dtype

    dtype = resolve_dtype(dtype)
    specs = adapter_tensor_specs(model_config, lora_config)
    keys = jax.random.split(key, len(specs))
    tree: Tree = {}
    for spec, spec_key in zip(specs, keys, strict=True):
        shape = spec.jax_shape
        if spec.path[-1] == "lora_A":
            bound = 1.0 / math.sqrt(shape[0])
            value = jax.random.uniform(spec_key, shape, dtype, -bound, bound)
        else:
            value = jnp.zeros(shape, dtype)
        _set_leaf(tree, spec.path, value)
    return tree


def merge_lora(params: Tree, adapters: Tree, lora_config: LoraConfig) -> Tree:
    """Return a new base tree with W + scaling * A B in each adapted kernel.

    Args:
        params: the base tree; it is not modified.
        adapters: the adapter tree.
        lora_config: gives the scaling.

    Returns:
        A base tree of the same structure.

    Raises:
        LoraError: an adapter leaf contains NaN or infinity, or targets a layer
            that ``params`` does not have.
    """
    return _apply_updates(params, adapters, lora_config, sign=1.0)


def unmerge_lora(params: Tree, adapters: Tree, lora_config: LoraConfig) -> Tree:
    """Return a new base tree with W - scaling * A B, undoing ``merge_lora``.

    The result equals the original base up to float rounding.
    """
    return _apply_updates(params, adapters, lora_config, sign=-1.0)


def _apply_updates(
    params: Tree, adapters: Tree, lora_config: LoraConfig, sign: float
) -> Tree:
    merged = jax.tree_util.tree_map(lambda leaf: leaf, params)
    for path, adapter in _adapted_layers(adapters):
        for name in ("lora_A", "lora_B"):
            if not bool(jnp.all(jnp.isfinite(adapter[name]))):
                raise LoraError(
                    f"adapter {'/'.join(path + (name,))} contains NaN or infinity; "
                    "the adapter diverged in training, so retrain it with a lower "
                    "learning rate or stronger gradient clipping"
                )
        layer = _get_node(merged, path)
        update = adapter["lora_A"] @ adapter["lora_B"]
        layer["kernel"] = layer["kernel"] + sign * lora_config.scaling * update
    return merged


def _adapted_layers(
    tree: Tree, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], Tree]]:
    if "lora_A" in tree:
        return [(prefix, tree)]
    found = []
    for key, child in tree.items():
        found += _adapted_layers(child, prefix + (key,))
    return found


def _get_node(tree: Tree, path: tuple[str, ...]) -> Tree:
    node = tree
    for depth, key in enumerate(path):
        if key not in node:
            raise LoraError(
                f"adapter layer {'/'.join(path)} has no base layer "
                f"({'/'.join(path[: depth + 1])} is missing); the adapter was "
                "built for another model configuration"
            )
        node = node[key]
    return node


def _set_leaf(tree: Tree, path: tuple[str, ...], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def adapter_tensors(
    adapters: Tree, model_config: ModelConfig, lora_config: LoraConfig
) -> dict[str, np.ndarray]:
    """Flatten an adapter tree into checkpoint names and layout (numpy)."""
    specs = adapter_tensor_specs(model_config, lora_config)
    return from_tree(jax.device_get(adapters), specs, source="adapter tree")


def adapters_from_tensors(
    tensors: dict[str, np.ndarray],
    model_config: ModelConfig,
    lora_config: LoraConfig,
    dtype: Any = jnp.float32,
    source: str = "adapter tensors",
) -> Tree:
    """Build an adapter tree of ``dtype`` from checkpoint-layout arrays.

    Raises:
        CheckpointError: a tensor is missing, unexpected or mis-shaped.
    """
    specs = adapter_tensor_specs(model_config, lora_config)
    tree = to_tree(tensors, specs, source=source)
    return jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, dtype), tree)


def save_adapter(
    directory: str | os.PathLike,
    adapters: Tree,
    lora_config: LoraConfig,
    model_config: ModelConfig,
) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json``, as the torch twin."""
    tensors = adapter_tensors(adapters, model_config, lora_config)
    checkpoint.write_adapter(directory, tensors, lora_config, model_config)


def load_adapter(
    directory: str | os.PathLike, model_config: ModelConfig, dtype: Any = jnp.float32
) -> tuple[LoraConfig, Tree]:
    """Read an adapter directory written by either twin.

    Returns:
        The adapter's LoraConfig and its tree in ``dtype``.

    Raises:
        CheckpointError: the files are missing or were written for another
            base model.
    """
    lora_config, tensors = checkpoint.read_adapter(directory, model_config)
    tree = adapters_from_tensors(
        tensors, model_config, lora_config, dtype, source=str(directory)
    )
    return lora_config, tree
