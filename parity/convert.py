"""Weight conversion between the PyTorch and the JAX twin.

Every conversion goes through the one table in ``twinformer.param_map``
(``base_tensor_specs``, ``adapter_tensor_specs``, ``to_tree``, ``from_tree``),
with checkpoint-layout numpy arrays in the middle:

    torch state_dict  <->  {checkpoint name: numpy array}  <->  JAX trees

Values are copied, never recomputed, so a round trip in either direction is
bit-exact in every dtype.

Tied tensors are listed once in the table, under ``target_embedding.weight``.
A torch model may still expose an alias in its ``state_dict``
(``source_embedding.weight`` with ``share_embeddings``,
``output_projection.weight`` with ``tie_output``). ``torch_to_jax`` drops such
an alias after checking that it has the same values, and ``jax_to_torch``
fills it back in from ``target_embedding.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import torch

from twinformer.config import LoraConfig, ModelConfig
from twinformer.errors import CheckpointError, ConfigError, LoraError
from twinformer.param_map import (
    adapter_tensor_specs,
    base_tensor_specs,
    check_tensors,
    from_tree,
    to_tree,
)

# Checkpoint name of an alias -> the tensor it shares, and the config flag
# that makes them one tensor.
TIED_ALIASES = {
    "source_embedding.weight": ("target_embedding.weight", "share_embeddings"),
    "output_projection.weight": ("target_embedding.weight", "tie_output"),
}


def tensor_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Copy a torch tensor to numpy, bfloat16 as ``ml_dtypes.bfloat16``.

    numpy has no bfloat16, so those bits travel through an int16 view.
    """
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        bits = tensor.contiguous().view(torch.int16).numpy().copy()
        return bits.view(ml_dtypes.bfloat16)
    return tensor.numpy().copy()


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """Copy a numpy array to a torch tensor; the inverse of ``tensor_to_numpy``."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.dtype(ml_dtypes.bfloat16):
        bits = torch.from_numpy(array.view(np.int16).copy())
        return bits.view(torch.bfloat16)
    return torch.from_numpy(array.copy())


def state_dict_to_tensors(
    state_dict: Mapping[str, torch.Tensor],
    model_config: ModelConfig,
    lora_config: LoraConfig | None = None,
    *,
    source: str = "torch state_dict",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Split a torch ``state_dict`` into checked base and adapter tensors.

    Args:
        state_dict: checkpoint names -> tensors, as ``Module.state_dict()``
            returns them (tied aliases allowed, see the module docstring).
        model_config: the model the tensors belong to.
        lora_config: the adapters' configuration, or ``None`` without LoRA.
        source: where the tensors came from, for error messages.

    Returns:
        (base, adapters): numpy arrays in checkpoint layout; adapters is
        ``None`` without ``lora_config``.

    Raises:
        CheckpointError: a tensor is missing, unexpected, mis-shaped or
            mis-typed, or a tied alias has values of its own.
    """
    tensors = {name: tensor_to_numpy(value) for name, value in state_dict.items()}
    _drop_tied_aliases(tensors, model_config, source)
    base_specs = base_tensor_specs(model_config)
    if lora_config is None:
        check_tensors(tensors, base_specs, source=source)
        return tensors, None
    adapter_specs = adapter_tensor_specs(model_config, lora_config)
    adapter_names = {spec.name for spec in adapter_specs}
    base = {k: v for k, v in tensors.items() if k not in adapter_names}
    adapters = {k: v for k, v in tensors.items() if k in adapter_names}
    check_tensors(base, base_specs, source=source)
    check_tensors(adapters, adapter_specs, source=source)
    return base, adapters


def _drop_tied_aliases(
    tensors: dict[str, np.ndarray], config: ModelConfig, source: str
) -> None:
    for alias, (target, flag) in TIED_ALIASES.items():
        if not getattr(config, flag) or alias not in tensors:
            continue
        if target in tensors and _same_array(tensors[alias], tensors[target]):
            del tensors[alias]
            continue
        raise CheckpointError(
            f"{source}: tensor {alias!r} differs from {target!r} although "
            f"{flag}=True ties them; untie the model with {flag}=False or "
            f"load the tied weights into {target!r}"
        )


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b)


def tensors_to_state_dict(
    base: Mapping[str, np.ndarray],
    adapters: Mapping[str, np.ndarray] | None,
    expected_names: list[str],
) -> dict[str, torch.Tensor]:
    """Build a torch ``state_dict`` with exactly ``expected_names`` as keys.

    Tied aliases that the torch model lists (``expected_names``) are filled
    from the tensor they share.
    """
    tensors = dict(base)
    tensors.update(adapters or {})
    state: dict[str, torch.Tensor] = {}
    for name in expected_names:
        if name not in tensors and name in TIED_ALIASES:
            source_name = TIED_ALIASES[name][0]
        else:
            source_name = name
        if source_name not in tensors:
            raise CheckpointError(
                f"the torch model expects tensor {name!r}, which the converted "
                "weights lack; the configs of the weights and the model differ"
            )
        state[name] = numpy_to_tensor(tensors[source_name])
    return state


def tree_to_tensors(
    params: Mapping[str, Any],
    adapters: Mapping[str, Any] | None,
    model_config: ModelConfig,
    lora_config: LoraConfig | None = None,
    *,
    source: str = "JAX parameters",
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """Flatten JAX base and adapter trees into checkpoint-layout numpy arrays.

    Raises:
        CheckpointError: a leaf is missing, unexpected, mis-shaped or
            mis-typed, or adapters are given without a ``lora_config``.
    """
    base = from_tree(
        _tree_to_numpy(params), base_tensor_specs(model_config), source=source
    )
    if lora_config is None:
        if adapters is not None:
            raise CheckpointError(
                f"{source}: adapters were given without a LoraConfig; pass the "
                "LoraConfig they were built with"
            )
        return base, None
    if adapters is None:
        raise CheckpointError(
            f"{source}: a LoraConfig was given but no adapter tree; pass the "
            "adapters or lora_config=None"
        )
    adapter_tensors = from_tree(
        _tree_to_numpy(adapters),
        adapter_tensor_specs(model_config, lora_config),
        source=f"{source} (adapters)",
    )
    return base, adapter_tensors


def tensors_to_tree(
    tensors: Mapping[str, np.ndarray],
    specs: list,
    *,
    source: str,
) -> dict[str, Any]:
    """Build a JAX tree of device arrays from checkpoint-layout numpy arrays.

    Raises:
        CheckpointError: as ``param_map.to_tree``.
        ConfigError: float64 tensors while JAX runs without x64, which would
            silently round them to float32.
    """
    tree = to_tree(tensors, specs, source=source)
    _require_x64_for(tensors, source)
    return jax.tree.map(jnp.asarray, tree)


def _require_x64_for(tensors: Mapping[str, np.ndarray], source: str) -> None:
    if jax.config.jax_enable_x64:
        return
    for name, value in tensors.items():
        if value.dtype == np.float64:
            raise ConfigError(
                f"{source}: tensor {name!r} is float64 but JAX runs without "
                "x64 and would round it to float32; set JAX_ENABLE_X64=1 "
                "before starting Python, or convert a float32 model"
            )


def _tree_to_numpy(tree: Mapping[str, Any]) -> dict[str, Any]:
    return jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)), dict(tree))


def torch_to_jax(
    model: torch.nn.Module,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Convert a torch ``Transformer`` (with or without LoRA) to JAX trees.

    Args:
        model: a ``torch_impl.model.Transformer``; its ``config`` and, after
            ``inject_lora``, its ``lora_config`` determine the expected tensors.

    Returns:
        (params, adapters): the base tree and the adapter tree (``None``
        without LoRA), as JAX arrays of the model's dtype.

    Raises:
        LoraError: the model's adapters are merged into the base weights.
        CheckpointError: the state_dict does not match the model's config.
        ConfigError: a float64 model while JAX runs without x64.
    """
    from torch_impl.lora import lora_layers

    merged = [path for path, layer in lora_layers(model).items() if layer.merged]
    if merged:
        raise LoraError(
            f"LoRA layer {merged[0]!r} is merged into its base weight, so the "
            "base and adapter tensors cannot be separated; call unmerge_lora "
            "first, or convert the merged base alone"
        )
    model_config: ModelConfig = model.config
    lora_config: LoraConfig | None = getattr(model, "lora_config", None)
    base, adapters = state_dict_to_tensors(
        model.state_dict(), model_config, lora_config, source="torch model"
    )
    params = tensors_to_tree(
        base, base_tensor_specs(model_config), source="torch model"
    )
    if lora_config is None:
        return params, None
    adapter_tree = tensors_to_tree(
        adapters,
        adapter_tensor_specs(model_config, lora_config),
        source="torch model (adapters)",
    )
    return params, adapter_tree


def jax_to_torch(
    params: Mapping[str, Any],
    adapters: Mapping[str, Any] | None,
    model_config: ModelConfig,
    lora_config: LoraConfig | None = None,
) -> torch.nn.Module:
    """Build a torch ``Transformer`` holding the values of JAX trees.

    The model gets the dtype of the trees (float32, float64 or bfloat16) and,
    with ``lora_config``, adapters injected and loaded. It is returned in
    eval mode.

    Args:
        params: the base tree, as ``jax_impl.model.init_params`` builds it.
        adapters: the adapter tree, or ``None`` without LoRA.
        model_config: the model the trees belong to.
        lora_config: the adapters' configuration, or ``None``.

    Returns:
        A ``torch_impl.model.Transformer``.

    Raises:
        CheckpointError: a leaf is missing, unexpected, mis-shaped or
            mis-typed, or the leaves do not share one dtype.
    """
    from torch_impl.lora import inject_lora
    from torch_impl.model import Transformer

    base, adapter_tensors = tree_to_tensors(params, adapters, model_config, lora_config)
    dtype = _common_dtype({**base, **(adapter_tensors or {})})
    model = Transformer(model_config, dtype=dtype)
    if lora_config is not None:
        inject_lora(model, lora_config)
    expected = list(model.state_dict().keys())
    model.load_state_dict(tensors_to_state_dict(base, adapter_tensors, expected))
    return model.eval()


def _common_dtype(tensors: Mapping[str, np.ndarray]) -> torch.dtype:
    # load_state_dict would cast a stray float32 leaf of a float64 model
    # silently, and the copy would no longer be exact.
    first_name, first = next(iter(tensors.items()))
    for name, value in tensors.items():
        if value.dtype != first.dtype:
            raise CheckpointError(
                f"JAX parameters: tensor {name!r} has dtype {value.dtype} but "
                f"{first_name!r} has {first.dtype}; cast every leaf to one dtype"
            )
    return numpy_to_tensor(first[:0]).dtype
