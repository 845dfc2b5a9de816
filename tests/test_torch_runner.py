"""The PyTorch Runner: training, evaluation, decoding, weights in and out."""

import ml_dtypes
import numpy as np
import pytest
import torch

from torch_impl.runner import Runner
from twinformer.config import PAD_ID, LoraConfig, ModelConfig, TrainConfig
from twinformer.data import Batch
from twinformer.errors import CheckpointError, ConfigError
from twinformer.param_map import base_tensor_specs
from twinformer.schedule import transformer_learning_rate

VOCAB, MAX_LENGTH = 13, 10


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one CPU thread: for models this small, torch's thread pool
    costs more than it gains, and on a busy machine it slows steps by 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(**changes) -> ModelConfig:
    fields = dict(
        source_vocab_size=VOCAB,
        target_vocab_size=VOCAB,
        model_dim=32,
        num_heads=4,
        ff_dim=64,
        num_encoder_layers=1,
        num_decoder_layers=1,
        max_length=MAX_LENGTH,
        dropout=0.0,
        embedding_dropout=0.0,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def copy_batch(rng: np.random.Generator, batch: int = 32, max_len: int = 6) -> Batch:
    """Pairs whose target is the source: lengths 2 to max_len, ids 4 to V - 1."""
    source = np.zeros((batch, max_len), np.int32)
    target_input = np.zeros((batch, max_len + 1), np.int32)
    target_output = np.zeros_like(target_input)
    for row, length in enumerate(rng.integers(2, max_len + 1, batch)):
        tokens = rng.integers(4, VOCAB, length)
        source[row, :length] = tokens
        target_input[row, 0] = 1
        target_input[row, 1 : length + 1] = tokens
        target_output[row, :length] = tokens
        target_output[row, length] = 2
    return Batch(source, target_input, target_output)


def test_runner_learns_copy_task():
    train = TrainConfig(warmup_steps=30, label_smoothing=0.1)
    runner = Runner(model_config(), train)
    assert runner.learning_rate == 0.0
    rng = np.random.default_rng(0)
    losses = [runner.train_step(copy_batch(rng)) for _ in range(100)]
    assert runner.learning_rate == pytest.approx(
        transformer_learning_rate(100, 32, 30, 1)
    )
    # Chance level is log(13) = 2.6; 100 steps reach about half of it.
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])


def test_evaluate_loss_sums_tokens():
    runner = Runner(model_config(dropout=0.3), TrainConfig())
    batch = copy_batch(np.random.default_rng(1), batch=5)
    total, count = runner.evaluate_loss(batch)
    assert count == int((batch.target_output_ids != PAD_ID).sum())
    # Dropout is off in evaluation: two calls agree exactly.
    assert runner.evaluate_loss(batch) == (total, count)
    assert total > 0


def test_decoding_shapes_and_types():
    runner = Runner(model_config(), TrainConfig())
    source = copy_batch(np.random.default_rng(2), batch=3).source_ids
    ids = runner.greedy_search(source, 7)
    assert ids.dtype == np.int32
    assert ids.shape[0] == 3
    assert ids.shape[1] <= 7
    beams, scores = runner.beam_search(source, 7, beam_size=3, num_return=2)
    assert beams.dtype == np.int32
    assert beams.shape[:2] == (3, 2)
    assert beams.shape[2] <= 7
    assert scores.shape == (3, 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_base_tensors_round_trip(dtype):
    batch = copy_batch(np.random.default_rng(3), batch=4)
    first = Runner(model_config(), TrainConfig(seed=1), dtype=dtype)
    tensors = first.base_tensors()
    assert sorted(tensors) == sorted(
        s.name for s in base_tensor_specs(first.model_config)
    )
    assert all(value.dtype == np.dtype(dtype) for value in tensors.values())
    second = Runner(
        model_config(), TrainConfig(seed=2), base_tensors=tensors, dtype=dtype
    )
    assert second.evaluate_loss(batch) == first.evaluate_loss(batch)


def test_bfloat16_base_tensors_upcast():
    tensors = Runner(model_config(), TrainConfig()).base_tensors()
    bf16 = {name: value.astype(ml_dtypes.bfloat16) for name, value in tensors.items()}
    runner = Runner(model_config(), TrainConfig(), base_tensors=bf16)
    loaded = runner.base_tensors()
    for name, value in bf16.items():
        assert np.array_equal(loaded[name], value.astype(np.float32)), name


def test_base_tensors_rejected_when_mismatched():
    tensors = Runner(model_config(), TrainConfig()).base_tensors()
    missing = dict(tensors)
    del missing["decoder.layers.0.feed_forward.hidden.bias"]
    with pytest.raises(CheckpointError, match="missing tensor"):
        Runner(model_config(), TrainConfig(), base_tensors=missing)
    with pytest.raises(CheckpointError, match="shape"):
        Runner(model_config(ff_dim=63), TrainConfig(), base_tensors=tensors)


def test_runner_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="'float16'"):
        Runner(model_config(), TrainConfig(), dtype="float16")
    with pytest.raises(ConfigError, match="lora_config"):
        Runner(model_config(), TrainConfig(), adapter_tensors={})


def lora_runner(**kwargs) -> Runner:
    lora = LoraConfig(rank=2, alpha=4.0, targets=("query", "value", "feed_forward.*"))
    return Runner(model_config(), TrainConfig(warmup_steps=5), lora, **kwargs)


def test_lora_runner_counts_and_freezes():
    runner = lora_runner(dtype="float64")
    base = runner.base_tensors()
    trainable, total = runner.parameter_counts()
    # Two 32 -> 32 projections per attention, 3 attentions; 32 -> 64 -> 32 FFN x 2.
    expected = 3 * 2 * 2 * (32 + 32) + 2 * 2 * (32 + 64) * 2
    assert trainable == expected
    assert total == sum(value.size for value in base.values()) + expected

    rng = np.random.default_rng(4)
    adapters = runner.adapter_tensors()
    for _ in range(3):
        runner.train_step(copy_batch(rng, batch=8))
    for name, value in runner.base_tensors().items():
        assert np.array_equal(value, base[name]), name
    for name, value in runner.adapter_tensors().items():
        assert not np.array_equal(value, adapters[name]), name


def test_merged_base_tensors_match_lora():
    runner = lora_runner(dtype="float64")
    rng = np.random.default_rng(5)
    for _ in range(3):
        runner.train_step(copy_batch(rng, batch=8))
    batch = copy_batch(rng, batch=4)
    loss = runner.evaluate_loss(batch)
    merged = runner.merged_base_tensors()
    # The live model stays unmerged.
    assert runner.evaluate_loss(batch) == loss
    assert not np.array_equal(
        merged["encoder.layers.0.self_attention.query.weight"],
        runner.base_tensors()["encoder.layers.0.self_attention.query.weight"],
    )
    plain = Runner(model_config(), TrainConfig(), base_tensors=merged, dtype="float64")
    # float64: W x + s B A x vs (W + s B A) x, one rounding apart.
    assert plain.evaluate_loss(batch)[0] == pytest.approx(loss[0], rel=1e-12)


def test_adapter_tensors_round_trip():
    runner = lora_runner(dtype="float64")
    rng = np.random.default_rng(6)
    for _ in range(3):
        runner.train_step(copy_batch(rng, batch=8))
    batch = copy_batch(rng, batch=4)
    copy = lora_runner(
        dtype="float64",
        base_tensors=runner.base_tensors(),
        adapter_tensors=runner.adapter_tensors(),
    )
    assert copy.evaluate_loss(batch) == runner.evaluate_loss(batch)
    assert Runner(model_config(), TrainConfig()).adapter_tensors() is None
