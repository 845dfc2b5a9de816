"""The table from checkpoint tensor names to the JAX parameter tree.

A checkpoint (``model.safetensors``, ``adapter.safetensors``) names each tensor
by its PyTorch ``state_dict`` key. The JAX twin keeps the same values in nested
dicts with Flax's leaf names. One row per tensor gives where it goes and how
its layout changes:

    torch name (shape)                          JAX path (shape)
    target_embedding.weight (V, D)              target_embedding/embedding (V, D)
    encoder.layers.0.self_attention.query.weight (out, in)
                                  encoder/layers_0/self_attention/query/kernel (in, out)
    encoder.layers.0.self_attention.query.bias  .../query/bias
    encoder.layers.0.self_attention_norm.weight .../self_attention_norm/scale
    encoder.layers.0.self_attention.query.lora_A (R, in)   .../query/lora_A (in, R)
    encoder.layers.0.self_attention.query.lora_B (out, R)  .../query/lora_B (R, out)

Two-dimensional linear and LoRA weights are transposed; everything else keeps
its layout.

Tied tensors appear once. With ``share_embeddings`` the encoder reads
``target_embedding`` and no ``source_embedding`` exists; with ``tie_output`` the
output projection reads ``target_embedding`` and no ``output_projection`` exists.

Everything here is numpy only, so both twins and the converters share it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinformer.config import ALL_LINEAR, LoraConfig, ModelConfig
from twinformer.errors import CheckpointError, LoraError

# dtypes a checkpoint may hold; bfloat16 arrives as ml_dtypes.bfloat16 in numpy.
ALLOWED_DTYPES = ("float32", "float64", "bfloat16")


@dataclass(frozen=True)
class TensorSpec:
    """One row of the table: a checkpoint tensor and its JAX location."""

    name: str  # torch state_dict key
    path: tuple[str, ...]  # keys into the nested JAX dict
    shape: tuple[int, ...]  # shape in the checkpoint (torch layout)
    transpose: bool  # True for 2-D weights stored (out, in) in torch, (in, out) in JAX

    @property
    def jax_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape)) if self.transpose else self.shape


@dataclass(frozen=True)
class LinearLayer:
    """A linear layer of the model, by dotted module path."""

    path: str  # e.g. "decoder.layers.1.cross_attention.value"
    in_features: int
    out_features: int


def jax_path(module_path: str) -> tuple[str, ...]:
    """Map a dotted torch module path to JAX tree keys ("layers.0" -> "layers_0")."""
    parts = module_path.split(".")
    keys: list[str] = []
    for part in parts:
        if part.isdigit() and keys:
            keys[-1] = f"{keys[-1]}_{part}"
        else:
            keys.append(part)
    return tuple(keys)


def _attention_linears(prefix: str, model_dim: int) -> list[LinearLayer]:
    return [
        LinearLayer(f"{prefix}.{name}", model_dim, model_dim)
        for name in ("query", "key", "value", "output")
    ]


def _feed_forward_linears(prefix: str, config: ModelConfig) -> list[LinearLayer]:
    return [
        LinearLayer(f"{prefix}.hidden", config.model_dim, config.ff_dim),
        LinearLayer(f"{prefix}.output", config.ff_dim, config.model_dim),
    ]


def linear_layers(config: ModelConfig) -> list[LinearLayer]:
    """List every adaptable linear layer, encoder first, in forward order."""
    layers: list[LinearLayer] = []
    for i in range(config.num_encoder_layers):
        prefix = f"encoder.layers.{i}"
        layers += _attention_linears(f"{prefix}.self_attention", config.model_dim)
        layers += _feed_forward_linears(f"{prefix}.feed_forward", config)
    for i in range(config.num_decoder_layers):
        prefix = f"decoder.layers.{i}"
        layers += _attention_linears(f"{prefix}.self_attention", config.model_dim)
        layers += _attention_linears(f"{prefix}.cross_attention", config.model_dim)
        layers += _feed_forward_linears(f"{prefix}.feed_forward", config)
    return layers


def _layer_norm_names(config: ModelConfig) -> list[str]:
    names: list[str] = []
    for i in range(config.num_encoder_layers):
        for sublayer in ("self_attention_norm", "feed_forward_norm"):
            names.append(f"encoder.layers.{i}.{sublayer}")
    for i in range(config.num_decoder_layers):
        for sublayer in (
            "self_attention_norm",
            "cross_attention_norm",
            "feed_forward_norm",
        ):
            names.append(f"decoder.layers.{i}.{sublayer}")
    if config.norm_position == "pre":
        names += ["encoder.final_norm", "decoder.final_norm"]
    return names


def base_tensor_specs(config: ModelConfig) -> list[TensorSpec]:
    """List every base-model tensor of a checkpoint for ``config``."""
    d = config.model_dim
    specs: list[TensorSpec] = []
    if not config.share_embeddings:
        specs.append(
            TensorSpec(
                "source_embedding.weight",
                ("source_embedding", "embedding"),
                (config.source_vocab_size, d),
                False,
            )
        )
    specs.append(
        TensorSpec(
            "target_embedding.weight",
            ("target_embedding", "embedding"),
            (config.target_vocab_size, d),
            False,
        )
    )
    for layer in linear_layers(config):
        path = jax_path(layer.path)
        specs.append(
            TensorSpec(
                f"{layer.path}.weight",
                path + ("kernel",),
                (layer.out_features, layer.in_features),
                True,
            )
        )
        specs.append(
            TensorSpec(
                f"{layer.path}.bias", path + ("bias",), (layer.out_features,), False
            )
        )
    for norm in _layer_norm_names(config):
        path = jax_path(norm)
        specs.append(TensorSpec(f"{norm}.weight", path + ("scale",), (d,), False))
        specs.append(TensorSpec(f"{norm}.bias", path + ("bias",), (d,), False))
    if not config.tie_output:
        # The output projection has no bias, tied or not, so both forms
        # compute logits = x E^T with a (vocab, model_dim) matrix.
        specs.append(
            TensorSpec(
                "output_projection.weight",
                ("output_projection", "kernel"),
                (config.target_vocab_size, d),
                True,
            )
        )
    return specs


def match_lora_targets(
    patterns: Iterable[str], config: ModelConfig
) -> list[LinearLayer]:
    """Select the linear layers that LoRA adapts.

    A pattern is a glob (``fnmatch``) over a layer's dotted path. It matches a
    layer when it matches the whole path or a dot-separated suffix of it, so
    ``query`` selects every query projection, ``cross_attention.*`` every
    projection of encoder-decoder attention, ``decoder.layers.0.*`` every
    linear of the first decoder layer, and ``all`` every linear layer.

    Raises:
        LoraError: a pattern matches no layer; the message lists valid names.
    """
    layers = linear_layers(config)
    selected: dict[str, LinearLayer] = {}
    for pattern in patterns:
        matched = [layer for layer in layers if _matches(pattern, layer.path)]
        if not matched:
            raise LoraError(
                f"LoRA target {pattern!r} matches no linear layer. Valid names: "
                f"{', '.join(lora_target_names())}, {ALL_LINEAR!r}, or a glob over "
                f"full paths such as {layers[0].path!r}"
            )
        for layer in matched:
            selected[layer.path] = layer
    return [layer for layer in layers if layer.path in selected]


def lora_target_names() -> list[str]:
    """Short target names, one per kind of projection."""
    return [
        "query",
        "key",
        "value",
        "output",
        "self_attention.*",
        "cross_attention.*",
        "feed_forward.hidden",
        "feed_forward.output",
    ]


def _matches(pattern: str, path: str) -> bool:
    if pattern == ALL_LINEAR:
        return True
    parts = path.split(".")
    return any(
        fnmatch.fnmatchcase(".".join(parts[start:]), pattern)
        for start in range(len(parts))
    )


def adapter_tensor_specs(
    model_config: ModelConfig, lora_config: LoraConfig
) -> list[TensorSpec]:
    """List every adapter tensor: ``lora_A`` (r, in) and ``lora_B`` (out, r).

    Raises:
        LoraError: an unknown target, or a rank above min(in, out) of a layer.
    """
    specs: list[TensorSpec] = []
    for layer in match_lora_targets(lora_config.targets, model_config):
        limit = min(layer.in_features, layer.out_features)
        if lora_config.rank > limit:
            raise LoraError(
                f"LoRA rank {lora_config.rank} exceeds min(in, out) = {limit} of "
                f"{layer.path} ({layer.in_features} -> {layer.out_features}); "
                f"use a rank of at most {limit}"
            )
        path = jax_path(layer.path)
        r = lora_config.rank
        specs.append(
            TensorSpec(
                f"{layer.path}.lora_A", path + ("lora_A",), (r, layer.in_features), True
            )
        )
        specs.append(
            TensorSpec(
                f"{layer.path}.lora_B",
                path + ("lora_B",),
                (layer.out_features, r),
                True,
            )
        )
    return specs


def check_tensors(
    tensors: Mapping[str, Any], specs: list[TensorSpec], *, source: str
) -> None:
    """Check names, shapes and dtypes of checkpoint-layout tensors.

    Args:
        tensors: name -> array-like with ``.shape`` and ``.dtype`` (torch or numpy).
        specs: the expected rows.
        source: where the tensors came from, for the message (a file path).

    Raises:
        CheckpointError: naming the first missing, unexpected, mis-shaped or
            mis-typed tensor.
    """
    expected = {spec.name: spec for spec in specs}
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing:
        raise CheckpointError(
            f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in "
            "all); the file was written for another model configuration or is "
            "incomplete"
        )
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} "
            "unexpected in all); the file was written for another model "
            "configuration"
        )
    for name, spec in expected.items():
        shape = tuple(tensors[name].shape)
        if shape != spec.shape:
            raise CheckpointError(
                f"{source}: tensor {name!r} has shape {shape}, expected "
                f"{spec.shape} for this configuration"
            )
        dtype = dtype_name(tensors[name].dtype)
        if dtype not in ALLOWED_DTYPES:
            raise CheckpointError(
                f"{source}: tensor {name!r} has dtype {dtype}; checkpoints hold "
                f"only {', '.join(ALLOWED_DTYPES)}"
            )


def dtype_name(dtype: Any) -> str:
    """Name a torch or numpy dtype the same way ("torch.float32" -> "float32")."""
    return str(dtype).removeprefix("torch.")


def to_tree(
    tensors: Mapping[str, np.ndarray], specs: list[TensorSpec], *, source: str
) -> dict[str, Any]:
    """Build the nested JAX-layout dict from checkpoint-layout numpy arrays."""
    check_tensors(tensors, specs, source=source)
    tree: dict[str, Any] = {}
    for spec in specs:
        value = np.asarray(tensors[spec.name])
        if spec.transpose:
            value = np.ascontiguousarray(value.T)
        node = tree
        for key in spec.path[:-1]:
            node = node.setdefault(key, {})
        node[spec.path[-1]] = value
    return tree


def from_tree(
    tree: Mapping[str, Any], specs: list[TensorSpec], *, source: str
) -> dict[str, np.ndarray]:
    """Flatten a JAX-layout tree into checkpoint-layout numpy arrays.

    Raises:
        CheckpointError: a leaf is missing, extra, mis-shaped or mis-typed.
    """
    flat = _flatten(tree)
    expected_paths = {spec.path: spec for spec in specs}
    for path in flat:
        if path not in expected_paths:
            raise CheckpointError(
                f"{source}: unexpected parameter {'/'.join(path)!r}; the tree was "
                "built for another model configuration"
            )
    tensors: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.path not in flat:
            raise CheckpointError(
                f"{source}: missing parameter {'/'.join(spec.path)!r} "
                f"(checkpoint name {spec.name!r})"
            )
        value = np.asarray(flat[spec.path])
        if tuple(value.shape) != spec.jax_shape:
            raise CheckpointError(
                f"{source}: parameter {'/'.join(spec.path)!r} has shape "
                f"{tuple(value.shape)}, expected {spec.jax_shape}"
            )
        tensors[spec.name] = np.ascontiguousarray(value.T) if spec.transpose else value
    check_tensors(tensors, specs, source=source)
    return tensors


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
    flat: dict[tuple[str, ...], Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix + (key,)))
        else:
            flat[prefix + (key,)] = value
    return flat
