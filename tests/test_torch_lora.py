"""LoRA in the PyTorch twin: the classic adapter bugs, merging, saving.

Tiny model: 5 heads of 7 (model_dim 35), ff_dim 22, vocabulary 37, so the
feed-forward layers are non-square (35 -> 22 and 22 -> 35).
"""

import warnings

import pytest
import torch

from torch_impl.lora import (
    LoRALinear,
    inject_lora,
    load_adapter,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from torch_impl.loss import label_smoothed_cross_entropy
from torch_impl.model import Transformer
from twinformer.checkpoint import read_tensors
from twinformer.config import PAD_ID, LoraConfig, ModelConfig
from twinformer.errors import CheckpointError, LoraError
from twinformer.param_map import base_tensor_specs

VOCAB, BATCH = 37, 3
TARGETS = ("query", "value", "feed_forward.hidden", "feed_forward.output")


def tiny_config(**changes) -> ModelConfig:
    fields = dict(
        source_vocab_size=VOCAB,
        target_vocab_size=VOCAB,
        model_dim=35,
        num_heads=5,
        ff_dim=22,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_length=17,
        dropout=0.0,
        embedding_dropout=0.0,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def lora_model(dtype=torch.float64, rank=3, targets=TARGETS, **lora_changes):
    generator = torch.Generator().manual_seed(0)
    model = Transformer(tiny_config(), dtype, generator).eval()
    config = LoraConfig(rank=rank, alpha=5.0, targets=targets, **lora_changes)
    inject_lora(model, config, generator)
    return model, config


def randomize_adapters(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(generator=generator)


def token_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(4, VOCAB, (BATCH, 11), generator=generator)
    target = torch.randint(4, VOCAB, (BATCH, 13), generator=generator)
    source[1, 6:] = PAD_ID
    return source, target


def test_inject_names_and_freezing():
    model, config = lora_model()
    paths = list(lora_layers(model))
    # 2 encoder layers x 4 targets + 2 decoder layers x (2 self + 2 cross + 2 ffn).
    assert len(paths) == 2 * 4 + 2 * 6
    base_names = {spec.name for spec in base_tensor_specs(model.config)}
    lora_names = {f"{p}.lora_{m}" for p in paths for m in "AB"}
    assert set(model.state_dict()) == base_names | lora_names
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == ("lora_" in name), name


def test_fresh_adapter_leaves_outputs_equal():
    generator = torch.Generator().manual_seed(0)
    base = Transformer(tiny_config(), torch.float32, generator).eval()
    source, target = token_batch()
    before = base(source, target)
    inject_lora(base, LoraConfig(rank=3, alpha=5.0, targets=("all",)))
    # B starts at zero, so the update adds exact zeros.
    assert torch.equal(base(source, target), before)


def test_adapter_dropout_skips_frozen_path():
    model, _ = lora_model(dropout=0.5)
    source, target = token_batch()
    expected = model(source, target)
    model.train()  # model dropout is 0; only the adapter input is dropped
    assert torch.equal(model(source, target), expected)


def test_grads_reach_a_when_b_nonzero():
    model, _ = lora_model()
    randomize_adapters(model)
    source, target = token_batch()
    model(source, target).square().mean().backward()
    for path, layer in lora_layers(model).items():
        assert layer.lora_A.grad.abs().sum() > 0, path
        assert layer.weight.grad is None, path


def test_adam_steps_move_only_adapters():
    model, _ = lora_model(dtype=torch.float32)
    base = {name: value.clone() for name, value in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    source, target = token_batch()
    model.train()
    for _ in range(3):
        logits = model(source, target)
        loss = label_smoothed_cross_entropy(logits, target, 0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, value in model.state_dict().items():
        if "lora_" in name:
            assert not torch.equal(value, base[name]), f"{name} did not move"
        else:
            assert torch.equal(value, base[name]), f"{name} changed"


def test_saved_adapter_holds_only_adapter_tensors(tmp_path):
    model, config = lora_model(dtype=torch.float32)
    save_adapter(model, config, tmp_path / "adapter")
    tensors = read_tensors(tmp_path / "adapter" / "adapter.safetensors")
    assert all(name.endswith((".lora_A", ".lora_B")) for name in tensors)
    # A is (r, in) and B is (out, r): r * (in + out) values per layer.
    # Attention layers are 35 -> 35, hidden 35 -> 22, output 22 -> 35.
    rank = config.rank
    per_encoder = 2 * rank * 70 + 2 * rank * 57
    per_decoder = 4 * rank * 70 + 2 * rank * 57
    expected = 2 * per_encoder + 2 * per_decoder
    assert sum(value.size for value in tensors.values()) == expected


def test_adapter_round_trip(tmp_path):
    model, config = lora_model()
    randomize_adapters(model)
    save_adapter(model, config, tmp_path)
    source, target = token_batch()
    expected = model(source, target)

    generator = torch.Generator().manual_seed(0)
    fresh = Transformer(tiny_config(), torch.float64, generator).eval()
    assert load_adapter(fresh, tmp_path) == config
    # Identical weights and inputs: bit-identical outputs.
    assert torch.equal(fresh(source, target), expected)


def test_adapter_rejects_other_base(tmp_path):
    model, config = lora_model()
    save_adapter(model, config, tmp_path)
    other = Transformer(tiny_config(ff_dim=23))
    with pytest.raises(CheckpointError, match="ff_dim"):
        load_adapter(other, tmp_path)
    with pytest.raises(CheckpointError, match="missing tensor"):
        load_lora_state_dict(model, {})
    wrong = dict(lora_state_dict(model))
    name = next(iter(wrong))
    wrong[name] = torch.zeros(4, 35)
    with pytest.raises(CheckpointError, match="shape"):
        load_lora_state_dict(model, wrong)


@pytest.mark.parametrize(("in_features", "out_features"), [(35, 22), (22, 35)])
def test_merged_matches_unmerged_layer(in_features, out_features):
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(in_features, out_features), rank=3, alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(7, 13, in_features)
    unmerged = layer(x)
    layer.merge()
    merged = layer(x)
    error = ((merged - unmerged).abs().max() / unmerged.abs().max()).detach()
    # float32: W x + s B (A x) vs (W + s B A) x, sums of <= 35 products
    # rounded differently, ~1e-7 relative.
    assert float(error) < 1e-6


def test_merged_matches_unmerged_model():
    model, _ = lora_model(targets=("all",))
    randomize_adapters(model)
    source, target = token_batch()
    unmerged = model(source, target)
    merge_lora(model)
    merged = model(source, target)
    error = ((merged - unmerged).abs().max() / unmerged.abs().max()).detach()
    # float64: one rounding per merged weight, carried through 4 layers.
    assert float(error) < 1e-12


def test_merged_layer_skips_adapter():
    layer = LoRALinear(torch.nn.Linear(35, 22).double(), rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 35, dtype=torch.float64)
    expected = layer(x)
    layer.merge()
    with torch.no_grad():
        layer.lora_A.zero_()  # a merged layer must not read A or B any more
    # float64: (W + s B A) x vs W x + s B A x, one rounding apart.
    assert torch.allclose(layer(x), expected, atol=1e-12, rtol=0)


def test_unmerge_restores_weights():
    model, _ = lora_model()
    randomize_adapters(model)
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    merge_lora(model)
    changed = model.encoder.layers[0].self_attention.query.weight
    assert not torch.equal(
        changed, before["encoder.layers.0.self_attention.query.weight"]
    )
    unmerge_lora(model)
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            # float64: W + d - d is W to within one rounding of |d|.
            assert torch.allclose(parameter, before[name], atol=1e-12, rtol=0), name


def test_double_merge_warns_and_changes_nothing():
    model, _ = lora_model()
    randomize_adapters(model)
    merge_lora(model)
    merged = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.warns(UserWarning, match="already merged"):
        merge_lora(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, merged[name]), name
    with pytest.warns(UserWarning, match="already merged"):
        lora_layers(model)["encoder.layers.0.self_attention.query"].merge()


def test_unmerge_without_merge_warns():
    model, _ = lora_model()
    with pytest.warns(UserWarning, match="not merged"):
        unmerge_lora(model)


def test_merge_rejects_non_finite_adapter():
    model, _ = lora_model()
    randomize_adapters(model)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad():
        model.decoder.layers[1].feed_forward.output.lora_A[0, 0] = float("nan")
    with pytest.raises(LoraError, match=r"decoder.layers.1.feed_forward.output.lora_A"):
        merge_lora(model)
    for name, value in model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, before[name]), name
    assert not any(layer.merged for layer in lora_layers(model).values())


def test_inject_rejects_bad_requests():
    with pytest.raises(LoraError, match="'attn' matches no linear layer"):
        lora_model(targets=("attn",))
    with pytest.raises(LoraError, match="rank 23 exceeds min"):
        lora_model(rank=23, targets=("feed_forward.hidden",))
    model, config = lora_model()
    with pytest.raises(LoraError, match="already has LoRA"):
        inject_lora(model, config)


@pytest.mark.parametrize(
    ("use_rslora", "expected"), [(False, 5.0 / 4), (True, 5.0 / 2)]
)
def test_scaling_plain_and_rslora(use_rslora, expected):
    model, config = lora_model(rank=4, use_rslora=use_rslora)
    assert config.scaling == expected
    layer = lora_layers(model)["encoder.layers.0.self_attention.value"]
    assert layer.scaling == expected
    randomize_adapters(model)
    delta = expected * layer.lora_B @ layer.lora_A
    # float64: the same product, computed once each way.
    assert torch.allclose(layer.delta_weight(), delta, atol=1e-14, rtol=0)


def test_no_warnings_on_normal_merge():
    model, _ = lora_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_lora(model)
        unmerge_lora(model)
