"""Weight conversion between the twins: exact round trips and checked inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

from jax_impl.lora import init_lora
from jax_impl.model import init_params
from parity.convert import (
    jax_to_torch,
    state_dict_to_tensors,
    torch_to_jax,
    tree_to_tensors,
)
from parity.ladder import LORA_ALPHA, ladder_model_config
from torch_impl.lora import inject_lora, merge_lora
from torch_impl.model import Transformer
from twinformer.config import LoraConfig
from twinformer.errors import CheckpointError, LoraError

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}
VARIANTS = {
    "tied": {},
    "untied": {"share_embeddings": False, "tie_output": False},
    "pre-LN": {"norm_position": "pre"},
}
LORA = LoraConfig(rank=3, alpha=LORA_ALPHA, targets=("query", "feed_forward.hidden"))


def _torch_model(dtype, lora, **changes):
    config = ladder_model_config(**changes)
    generator = torch.Generator().manual_seed(0)
    model = Transformer(config, TORCH_DTYPES[dtype], generator)
    if lora:
        inject_lora(model, LORA, generator)
        with torch.no_grad():  # B is zero after injection; make it informative
            for name, parameter in model.named_parameters():
                if name.endswith("lora_B"):
                    parameter.normal_(generator=generator)
    return model


def _assert_state_dicts_equal(a, b):
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        # Conversion copies values, so the round trip is bit-exact.
        assert torch.equal(a[name], b[name]), name


def _assert_trees_equal(a, b):
    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [path for path, _ in leaves_a] == [path for path, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype, path
        # Conversion copies values, so the round trip is bit-exact.
        assert np.array_equal(np.asarray(x), np.asarray(y)), path


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_round_trip_exact(dtype, variant, lora):
    model = _torch_model(dtype, lora, **VARIANTS[variant])
    params, adapters = torch_to_jax(model)
    assert (adapters is None) == (not lora)
    back = jax_to_torch(params, adapters, model.config, LORA if lora else None)
    _assert_state_dicts_equal(model.state_dict(), back.state_dict())


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("variant", ["tied", "untied"])
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_jax_round_trip_exact(dtype, variant, lora):
    config = ladder_model_config(**VARIANTS[variant])
    params = init_params(config, jax.random.key(1), dtype)
    adapters = None
    if lora:
        adapters = init_lora(config, LORA, jax.random.key(2), dtype)
        adapters = jax.tree.map(lambda leaf: leaf + 0.5, adapters)  # B non-zero
    model = jax_to_torch(params, adapters, config, LORA if lora else None)
    params_back, adapters_back = torch_to_jax(model)
    _assert_trees_equal(params, params_back)
    if lora:
        _assert_trees_equal(adapters, adapters_back)


def test_bfloat16_model_converts_exactly():
    model = _torch_model("float32", True).to(torch.bfloat16)
    params, adapters = torch_to_jax(model)
    leaf = params["target_embedding"]["embedding"]
    assert leaf.dtype == jnp.bfloat16
    back = jax_to_torch(params, adapters, model.config, LORA)
    _assert_state_dicts_equal(model.state_dict(), back.state_dict())


def test_merged_lora_model_rejected():
    model = _torch_model("float32", True)
    merge_lora(model)
    with pytest.raises(LoraError, match="unmerge_lora"):
        torch_to_jax(model)


def _base_state(dtype="float32"):
    model = _torch_model(dtype, False)
    return model.config, dict(model.state_dict())


def test_state_dict_missing_tensor_named():
    config, state = _base_state()
    del state["decoder.layers.1.feed_forward.output.bias"]
    with pytest.raises(
        CheckpointError, match="decoder.layers.1.feed_forward.output.bias"
    ):
        state_dict_to_tensors(state, config)


def test_state_dict_unexpected_tensor_named():
    config, state = _base_state()
    state["encoder.layers.2.feed_forward.output.bias"] = torch.zeros(35)
    with pytest.raises(CheckpointError, match="encoder.layers.2"):
        state_dict_to_tensors(state, config)


def test_state_dict_misshaped_tensor_named():
    config, state = _base_state()
    name = "encoder.layers.0.self_attention.query.weight"
    state[name] = state[name][:, :34]
    with pytest.raises(CheckpointError, match=r"query.weight.*\(35, 34\)"):
        state_dict_to_tensors(state, config)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float16])
def test_state_dict_wrong_dtype_named(dtype):
    config, state = _base_state()
    name = "encoder.layers.0.feed_forward_norm.weight"
    state[name] = state[name].to(dtype)
    with pytest.raises(CheckpointError, match=f"{name}.*{str(dtype)[6:]}"):
        state_dict_to_tensors(state, config)


def test_state_dict_missing_adapter_named():
    model = _torch_model("float32", True)
    state = dict(model.state_dict())
    del state["decoder.layers.0.self_attention.query.lora_B"]
    with pytest.raises(CheckpointError, match="self_attention.query.lora_B"):
        state_dict_to_tensors(state, model.config, LORA)


def test_tied_alias_equal_is_dropped():
    config, state = _base_state()
    state["source_embedding.weight"] = state["target_embedding.weight"].clone()
    base, _ = state_dict_to_tensors(state, config)
    assert "source_embedding.weight" not in base


def test_tied_alias_different_rejected():
    config, state = _base_state()
    state["output_projection.weight"] = state["target_embedding.weight"] + 1
    with pytest.raises(CheckpointError, match="output_projection.weight"):
        state_dict_to_tensors(state, config)


def test_tree_missing_leaf_named():
    config = ladder_model_config()
    params = init_params(config, jax.random.key(0))
    del params["decoder"]["layers_1"]["cross_attention"]["value"]["bias"]
    with pytest.raises(CheckpointError, match="layers_1/cross_attention/value/bias"):
        tree_to_tensors(params, None, config)


def test_tree_unexpected_leaf_named():
    config = ladder_model_config()
    params = init_params(config, jax.random.key(0))
    params["output_projection"] = {"kernel": jnp.zeros((35, 37))}
    with pytest.raises(CheckpointError, match="output_projection/kernel"):
        tree_to_tensors(params, None, config)


def test_tree_misshaped_leaf_named():
    config = ladder_model_config()
    params = init_params(config, jax.random.key(0))
    layer = params["encoder"]["layers_0"]["feed_forward"]["hidden"]
    layer["kernel"] = layer["kernel"].T  # torch layout by mistake
    with pytest.raises(CheckpointError, match="feed_forward/hidden/kernel"):
        tree_to_tensors(params, None, config)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16])
def test_tree_wrong_dtype_named(dtype):
    config = ladder_model_config()
    params = init_params(config, jax.random.key(0))
    leaf = params["target_embedding"]["embedding"]
    params["target_embedding"]["embedding"] = leaf.astype(dtype)
    with pytest.raises(CheckpointError, match="target_embedding.weight"):
        jax_to_torch(params, None, config)


def test_tree_mixed_dtypes_rejected():
    config = ladder_model_config()
    params = init_params(config, jax.random.key(0))
    bias = params["encoder"]["layers_0"]["self_attention"]["key"]["bias"]
    params["encoder"]["layers_0"]["self_attention"]["key"]["bias"] = bias.astype(
        jnp.float64
    )
    with pytest.raises(CheckpointError, match="self_attention.key.bias"):
        jax_to_torch(params, None, config)


def test_tree_adapters_without_config_rejected():
    config = ladder_model_config()
    params = init_params(config, jax.random.key(0))
    adapters = init_lora(config, LORA, jax.random.key(1))
    with pytest.raises(CheckpointError, match="LoraConfig"):
        tree_to_tensors(params, adapters, config, None)


def test_bfloat16_numpy_tensor_accepted():
    config, state = _base_state()
    bf16 = {name: value.to(torch.bfloat16) for name, value in state.items()}
    base, _ = state_dict_to_tensors(bf16, config)
    assert base["target_embedding.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
