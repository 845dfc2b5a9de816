"""Training pieces of the JAX twin: loss, optimizer, Runner.

Sizes are prime-like (lengths 11 and 13, vocabulary 37).
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jax_impl.loss import label_smoothed_cross_entropy
from jax_impl.optim import clip_by_global_norm, learning_rate_schedule, make_optimizer
from jax_impl.runner import Runner, length_bucket
from twinformer.config import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from twinformer.data import Batch
from twinformer.errors import ConfigError, DataError
from twinformer.schedule import transformer_learning_rate

TINY = ModelConfig(
    13,
    13,
    model_dim=32,
    num_heads=4,
    ff_dim=64,
    num_encoder_layers=1,
    num_decoder_layers=1,
    max_length=11,
    dropout=0.0,
    embedding_dropout=0.0,
)


def test_length_bucket_series():
    buckets = sorted({length_bucket(n) for n in range(1, 200)})
    assert buckets == [8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def test_length_bucket_bounds_padding():
    for length in range(1, 1000):
        bucket = length_bucket(length)
        assert bucket >= length
        if length > 8:
            assert bucket < 1.5 * length, length


def test_loss_matches_formula_and_ignores_padding():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(3, 13, 37)))
    labels = rng.integers(1, 37, (3, 13))
    labels[1, 9:] = PAD_ID
    eps = 0.1
    log_p = np.asarray(jax.nn.log_softmax(logits))
    true = np.take_along_axis(log_p, labels[..., None], -1)[..., 0]
    per_token = -(1 - eps) * true - eps * log_p.mean(-1)
    keep = labels != PAD_ID
    total = label_smoothed_cross_entropy(
        logits, jnp.asarray(labels), eps, reduction="sum"
    )
    mean = label_smoothed_cross_entropy(logits, jnp.asarray(labels), eps)
    # float64; optax and numpy sum 37 terms in different orders (~1e-16 each).
    assert abs(float(total) - per_token[keep].sum()) < 1e-10
    assert abs(float(mean) - per_token[keep].mean()) < 1e-12
    # Changing logits at padding positions changes nothing.
    moved = logits.at[1, 10].add(5.0)
    assert float(
        label_smoothed_cross_entropy(moved, jnp.asarray(labels), eps)
    ) == float(mean)
    with pytest.raises(ConfigError, match="reduction"):
        label_smoothed_cross_entropy(logits, jnp.asarray(labels), eps, reduction="max")


@pytest.mark.parametrize("count", [0, 1, 7, 399, 4000, 12345])
def test_schedule_matches_core_schedule(count):
    config = TrainConfig(warmup_steps=400, lr_scale=2.0)
    got = float(learning_rate_schedule(config, 512)(jnp.asarray(count)))
    want = transformer_learning_rate(count + 1, 512, 400, 2.0)
    # float64 with x64 on: the two formulas agree to rounding (~1e-16 relative).
    assert abs(got - want) <= 1e-12 * want


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_by_global_norm_torch_semantics(max_norm):
    grads = {"a": jnp.asarray([3.0, 4.0]), "b": {"c": jnp.asarray([[12.0]])}}
    clip = clip_by_global_norm(max_norm)
    clipped, _ = clip.update(grads, clip.init(grads))
    scale = min(1.0, max_norm / (13.0 + 1e-6))
    # float64; one multiply per element.
    np.testing.assert_allclose(clipped["a"], np.array([3.0, 4.0]) * scale, rtol=1e-15)
    np.testing.assert_allclose(
        clipped["b"]["c"], np.array([[12.0]]) * scale, rtol=1e-15
    )


def test_make_optimizer_first_step_is_adam_times_schedule():
    config = TrainConfig(warmup_steps=10, clip_grad_norm=1.0)
    params = {"w": jnp.ones((2, 3), jnp.float32)}
    grads = {"w": jnp.full((2, 3), 0.5, jnp.float32)}
    optimizer = make_optimizer(config, 32)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # Adam's first step moves each entry by lr * g / (|g| + eps) = lr.
    lr = transformer_learning_rate(1, 32, 10, 1.0)
    assert updates["w"].dtype == jnp.float32
    # float32 update: rounding near 6e-8 relative.
    np.testing.assert_allclose(updates["w"], -lr, rtol=1e-6)


def _copy_batch(rng, batch_size=32):
    # Copy task: target = source, ids 4..12, lengths 2..6.
    lengths = rng.integers(2, 7, batch_size)
    source = np.zeros((batch_size, 6), np.int32)
    target_input = np.zeros((batch_size, 7), np.int32)
    target_output = np.zeros((batch_size, 7), np.int32)
    for row, length in enumerate(lengths):
        tokens = rng.integers(4, 13, length)
        source[row, :length] = tokens
        target_input[row, : length + 1] = np.concatenate([[BOS_ID], tokens])
        target_output[row, : length + 1] = np.concatenate([tokens, [EOS_ID]])
    return Batch(source, target_input, target_output)


def test_runner_learns_copy_task():
    train = TrainConfig(warmup_steps=20, label_smoothing=0.0, seed=1)
    runner = Runner(TINY, train)
    rng = np.random.default_rng(2)
    losses = [runner.train_step(_copy_batch(rng)) for _ in range(100)]
    assert runner.learning_rate == transformer_learning_rate(100, 32, 20, 1.0)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # Chance level is log(13) ~ 2.6. After 100 steps this seed reaches ~1.7
    # (measured); 0.75 of the start leaves room for other float rounding.
    assert last < 0.75 * first, (first, last)
    total, count = runner.evaluate_loss(_copy_batch(rng))
    assert count > 0
    assert total / count < 0.75 * first


def test_runner_lora_trains_adapters_only():
    lora = LoraConfig(rank=2, targets=("query", "value"))
    runner = Runner(
        TINY, TrainConfig(warmup_steps=5), lora_config=lora, dtype="float64"
    )
    base = runner.base_tensors()
    adapters = runner.adapter_tensors()
    rng = np.random.default_rng(3)
    for _ in range(2):
        runner.train_step(_copy_batch(rng, 8))
    for name, value in runner.base_tensors().items():
        np.testing.assert_array_equal(value, base[name])
        assert value.dtype == np.float64
    for name, value in runner.adapter_tensors().items():
        assert np.abs(value - adapters[name]).max() > 0, name
    trainable, total = runner.parameter_counts()
    assert trainable == sum(v.size for v in adapters.values())
    assert total == trainable + sum(v.size for v in base.values())
    merged = runner.merged_base_tensors()
    query = "encoder.layers.0.self_attention.query.weight"
    assert np.abs(merged[query] - base[query]).max() > 0


def test_runner_loads_bfloat16_tensors_and_checks_batch():
    source = Runner(TINY, TrainConfig())
    tensors = {
        k: v.astype(ml_dtypes.bfloat16) for k, v in source.base_tensors().items()
    }
    runner = Runner(TINY, TrainConfig(), base_tensors=tensors)
    for name, value in runner.base_tensors().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, tensors[name].astype(np.float32))
    batch = _copy_batch(np.random.default_rng(4), 4)
    bad = Batch(batch.source_ids + 20, batch.target_input_ids, batch.target_output_ids)
    with pytest.raises(DataError, match="source_ids"):
        runner.train_step(bad)
    with pytest.raises(ConfigError, match="lora_config"):
        Runner(TINY, TrainConfig(), adapter_tensors={})


def test_runner_rejects_float64_without_x64():
    script = textwrap.dedent(
        """
        from jax_impl.runner import Runner
        from twinformer.config import ModelConfig, TrainConfig
        from twinformer.errors import ConfigError
        config = ModelConfig(13, 13, model_dim=8, num_heads=2, ff_dim=8,
                             num_encoder_layers=1, num_decoder_layers=1)
        try:
            Runner(config, TrainConfig(), dtype="float64")
        except ConfigError as error:
            print("ConfigError:", error)
        """
    )
    env = dict(os.environ, JAX_ENABLE_X64="0")
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ConfigError:" in result.stdout
    assert "jax_enable_x64" in result.stdout
