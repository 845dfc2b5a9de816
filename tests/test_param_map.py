"""The checkpoint-name table: coverage, layouts, LoRA targets, load checks."""

import math

import ml_dtypes
import numpy as np
import pytest

from twinformer.config import LoraConfig, ModelConfig
from twinformer.errors import CheckpointError, LoraError
from twinformer.param_map import (
    adapter_tensor_specs,
    base_tensor_specs,
    from_tree,
    jax_path,
    linear_layers,
    match_lora_targets,
    to_tree,
)

# Prime-like sizes so that a swapped axis shows up as a shape mismatch.
CONFIG = ModelConfig(
    source_vocab_size=37,
    target_vocab_size=37,
    model_dim=35,
    num_heads=5,
    ff_dim=23,
    num_encoder_layers=2,
    num_decoder_layers=3,
)


def random_tensors(specs, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(dtype) for s in specs}


def test_jax_path_joins_layer_index():
    assert jax_path("decoder.layers.12.cross_attention.key") == (
        "decoder",
        "layers_12",
        "cross_attention",
        "key",
    )


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_base_specs_cover_tied_and_final_norms(share, tie, norm):
    config = CONFIG.replace(share_embeddings=share, tie_output=tie, norm_position=norm)
    names = {spec.name for spec in base_tensor_specs(config)}
    assert ("source_embedding.weight" in names) == (not share)
    assert ("output_projection.weight" in names) == (not tie)
    assert ("encoder.final_norm.weight" in names) == (norm == "pre")
    assert "target_embedding.weight" in names
    paths = [spec.path for spec in base_tensor_specs(config)]
    assert len(paths) == len(set(paths))


def test_base_specs_parameter_count_by_formula():
    d, f, v = CONFIG.model_dim, CONFIG.ff_dim, CONFIG.target_vocab_size
    attention = 4 * (d * d + d)
    feed_forward = d * f + f + f * d + d
    norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm
    expected = v * d + 2 * encoder_layer + 3 * decoder_layer
    counted = sum(math.prod(spec.shape) for spec in base_tensor_specs(CONFIG))
    assert counted == expected


def test_tree_round_trip_is_bit_exact():
    specs = base_tensor_specs(CONFIG)
    for dtype in (np.float32, np.float64):
        tensors = random_tensors(specs, dtype)
        tree = to_tree(tensors, specs, source="test")
        kernel = tree["decoder"]["layers_2"]["feed_forward"]["hidden"]["kernel"]
        assert kernel.shape == (35, 23)  # (in, out) in JAX, (out, in) in torch
        back = from_tree(tree, specs, source="test")
        assert set(back) == set(tensors)
        for name in tensors:
            assert np.array_equal(back[name], tensors[name]), name
            assert back[name].dtype == tensors[name].dtype


def test_missing_tensor_is_named():
    specs = base_tensor_specs(CONFIG)
    tensors = random_tensors(specs)
    del tensors["decoder.layers.1.cross_attention.value.bias"]
    with pytest.raises(CheckpointError, match="cross_attention.value.bias"):
        to_tree(tensors, specs, source="model.safetensors")


def test_unexpected_tensor_is_named():
    specs = base_tensor_specs(CONFIG)
    tensors = random_tensors(specs)
    tensors["encoder.layers.9.extra"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError, match="encoder.layers.9.extra"):
        to_tree(tensors, specs, source="model.safetensors")


def test_misshaped_tensor_is_named():
    specs = base_tensor_specs(CONFIG)
    tensors = random_tensors(specs)
    tensors["target_embedding.weight"] = np.zeros((41, 35), np.float32)
    with pytest.raises(CheckpointError, match=r"target_embedding.weight.*\(41, 35\)"):
        to_tree(tensors, specs, source="model.safetensors")


@pytest.mark.parametrize("dtype", [np.float16, np.int32])
def test_wrong_dtype_is_rejected(dtype):
    specs = base_tensor_specs(CONFIG)
    tensors = random_tensors(specs)
    tensors["encoder.layers.0.feed_forward_norm.bias"] = np.zeros(35, dtype)
    with pytest.raises(CheckpointError, match="feed_forward_norm.bias.*dtype"):
        to_tree(tensors, specs, source="model.safetensors")


def test_bfloat16_is_accepted():
    specs = base_tensor_specs(CONFIG)
    tensors = random_tensors(specs)
    tensors = {
        name: value.astype(ml_dtypes.bfloat16) for name, value in tensors.items()
    }
    tree = to_tree(tensors, specs, source="model.safetensors")
    assert tree["target_embedding"]["embedding"].dtype == ml_dtypes.bfloat16


def test_from_tree_rejects_extra_leaf():
    specs = base_tensor_specs(CONFIG)
    tree = to_tree(random_tensors(specs), specs, source="test")
    tree["encoder"]["layers_0"]["self_attention"]["query"]["lora_A"] = np.zeros(1)
    with pytest.raises(CheckpointError, match="lora_A"):
        from_tree(tree, specs, source="params")


def test_lora_short_names_select_every_projection_kind():
    query = match_lora_targets(["query"], CONFIG)
    # 2 encoder self-attention + 3 decoder self-attention + 3 cross-attention.
    assert len(query) == 8
    assert all(layer.path.endswith(".query") for layer in query)
    cross = match_lora_targets(["cross_attention.*"], CONFIG)
    assert len(cross) == 12
    ffn = match_lora_targets(["feed_forward.hidden", "feed_forward.output"], CONFIG)
    assert len(ffn) == 10
    assert len(match_lora_targets(["all"], CONFIG)) == len(linear_layers(CONFIG))


def test_lora_full_path_glob():
    layers = match_lora_targets(["decoder.layers.0.*"], CONFIG)
    assert len(layers) == 10
    assert all(layer.path.startswith("decoder.layers.0.") for layer in layers)


def test_lora_unknown_target_lists_valid_names():
    with pytest.raises(LoraError) as error:
        match_lora_targets(["querry"], CONFIG)
    message = str(error.value)
    assert "'querry'" in message
    assert "query" in message
    assert "feed_forward.hidden" in message


def test_lora_rank_above_layer_limit():
    # feed_forward maps 35 -> 23, so ranks above 23 are impossible there.
    lora = LoraConfig(rank=24, targets=("feed_forward.hidden",))
    with pytest.raises(LoraError, match="min\\(in, out\\) = 23"):
        adapter_tensor_specs(CONFIG, lora)
    assert adapter_tensor_specs(CONFIG, LoraConfig(rank=23, targets=lora.targets))


def test_adapter_specs_layouts_and_count():
    lora = LoraConfig(rank=3, targets=("value", "feed_forward.output"))
    specs = adapter_tensor_specs(CONFIG, lora)
    by_name = {spec.name: spec for spec in specs}
    spec_a = by_name["encoder.layers.1.feed_forward.output.lora_A"]
    assert spec_a.shape == (3, 23)
    assert spec_a.jax_shape == (23, 3)
    spec_b = by_name["encoder.layers.1.feed_forward.output.lora_B"]
    assert spec_b.shape == (35, 3)
    assert spec_b.path[-1] == "lora_B"
    # value: 8 layers of 35 -> 35; feed_forward.output: 5 layers of 23 -> 35.
    expected = 8 * 3 * (35 + 35) + 5 * 3 * (23 + 35)
    assert sum(math.prod(spec.shape) for spec in specs) == expected
