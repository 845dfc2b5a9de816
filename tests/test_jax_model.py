"""Model of the JAX twin: parameter tree, initialisation, layers, checks.

Sizes are prime-like (5 heads of 7, source length 11, target length 13,
vocabulary 37) so that a swapped axis changes a shape and cannot pass.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.layers import layer_norm, sinusoidal_position_encoding
from jax_impl.model import decode, encode, forward, init_params
from twinformer.config import ModelConfig
from twinformer.errors import ConfigError, DataError
from twinformer.param_map import _flatten, base_tensor_specs

BATCH, SOURCE, TARGET, VOCAB = 3, 11, 13, 37


def _config(**changes):
    fields = dict(
        source_vocab_size=VOCAB,
        target_vocab_size=VOCAB,
        model_dim=35,
        num_heads=5,
        ff_dim=17,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_length=17,
    )
    fields.update(changes)
    return ModelConfig(**fields)


def _ids(shape, seed):
    ids = np.random.default_rng(seed).integers(4, VOCAB, shape).astype(np.int32)
    ids[1, shape[1] - 4 :] = 0  # row 1 ends in padding
    return ids


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(share_embeddings=False, source_vocab_size=41),
        dict(tie_output=False),
        dict(norm_position="pre", share_embeddings=False, tie_output=False),
    ],
)
def test_init_params_tree_matches_param_map(changes):
    config = _config(**changes)
    params = init_params(config, jax.random.key(0))
    expected = {spec.path: spec.jax_shape for spec in base_tensor_specs(config)}
    actual = {path: tuple(leaf.shape) for path, leaf in _flatten(params).items()}
    assert actual == expected
    for leaf in jax.tree_util.tree_leaves(params):
        assert leaf.dtype == jnp.float32


def test_init_params_distributions():
    config = _config(model_dim=64, num_heads=4, ff_dim=128, tie_output=False)
    params = init_params(config, jax.random.key(1), jnp.float64)
    embedding = params["target_embedding"]["embedding"]
    # 37 * 64 = 2368 draws: the sample std is within ~3% of 64^-0.5 = 0.125.
    assert abs(float(jnp.std(embedding)) - 0.125) < 0.01
    hidden = params["encoder"]["layers_0"]["feed_forward"]["hidden"]["kernel"]
    bound = np.sqrt(6.0 / (64 + 128))
    assert float(jnp.max(jnp.abs(hidden))) <= bound
    # Uniform on [-a, a] has std a / sqrt(3); 8192 draws put it within 3%.
    assert abs(float(jnp.std(hidden)) - bound / np.sqrt(3)) < 0.03 * bound
    assert bool(
        jnp.all(params["encoder"]["layers_0"]["feed_forward"]["hidden"]["bias"] == 0)
    )
    norm = params["decoder"]["layers_1"]["cross_attention_norm"]
    assert bool(jnp.all(norm["scale"] == 1))
    assert bool(jnp.all(norm["bias"] == 0))


def test_sinusoidal_position_encoding_sin_even_cos_odd():
    table = sinusoidal_position_encoding(13, 35, jnp.float64)
    assert table.shape == (13, 35)
    position, pair = 7, 3
    angle = position / 10000 ** (2 * pair / 35)
    # float64 table against float64 numpy: identical up to rounding (~1e-16).
    assert abs(float(table[position, 2 * pair]) - np.sin(angle)) < 1e-12
    assert abs(float(table[position, 2 * pair + 1]) - np.cos(angle)) < 1e-12
    # An odd width ends with a sine column.
    last = position / 10000 ** (34 / 35)
    assert abs(float(table[position, 34]) - np.sin(last)) < 1e-12


def test_layer_norm_biased_variance_eps_inside():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCH, TARGET, 35)) * 3 + 1
    params = {
        "scale": jnp.asarray(rng.normal(size=35)),
        "bias": jnp.asarray(rng.normal(size=35)),
    }
    eps = 1e-3
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    expected = expected * np.asarray(params["scale"]) + np.asarray(params["bias"])
    # float64 throughout; only summation order differs.
    np.testing.assert_allclose(
        layer_norm(params, jnp.asarray(x), eps), expected, atol=1e-12
    )


@pytest.mark.parametrize("norm_position", ["post", "pre"])
def test_forward_shape_dtype_and_causality(norm_position):
    config = _config(
        norm_position=norm_position,
        tie_output=False,
        num_encoder_layers=1,
        num_decoder_layers=1,
    )
    params = init_params(config, jax.random.key(3), jnp.float64)
    source, target = _ids((BATCH, SOURCE), 4), _ids((BATCH, TARGET), 5)
    run = jax.jit(lambda p, s, t: forward(p, s, t, config=config))
    logits = run(params, source, target)
    assert logits.shape == (BATCH, TARGET, VOCAB)
    assert logits.dtype == jnp.float64
    # Changing target token 6 leaves the logits of positions 0..5 unchanged.
    changed = target.copy()
    changed[:, 6] = 4 + (changed[:, 6] - 3) % (VOCAB - 4)
    other = run(params, source, changed)
    np.testing.assert_array_equal(other[:, :6], logits[:, :6])
    assert float(jnp.max(jnp.abs(other[:, 6:] - logits[:, 6:]))) > 1e-6


def test_forward_dropout_needs_key_and_varies():
    config = _config(num_encoder_layers=1, num_decoder_layers=1)
    params = init_params(config, jax.random.key(6))
    source, target = _ids((BATCH, SOURCE), 7), _ids((BATCH, TARGET), 8)
    with pytest.raises(ConfigError, match="dropout_key"):
        forward(params, source, target, config=config, deterministic=False)
    run = jax.jit(
        lambda key: forward(
            params, source, target, config=config, dropout_key=key, deterministic=False
        )
    )
    first, again, other = (
        run(jax.random.key(1)),
        run(jax.random.key(1)),
        run(jax.random.key(2)),
    )
    np.testing.assert_array_equal(first, again)
    assert float(jnp.max(jnp.abs(first - other))) > 1e-3


def test_encode_decode_reject_bad_ids():
    config = _config()
    params = init_params(config, jax.random.key(9))
    source = _ids((BATCH, SOURCE), 10)
    bad = source.copy()
    bad[2, 3] = VOCAB
    with pytest.raises(DataError, match="token id 37"):
        encode(params, bad, config=config)
    with pytest.raises(DataError, match="max_length"):
        encode(params, np.ones((1, 18), np.int32), config=config)
    memory = jnp.zeros((BATCH, SOURCE, config.model_dim))
    with pytest.raises(DataError, match="token id -1"):
        decode(params, -np.ones((BATCH, 2), np.int32), memory, source, config=config)


def test_init_params_rejects_float64_without_x64():
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        from jax_impl.model import init_params
        from twinformer.config import ModelConfig
        from twinformer.errors import ConfigError
        config = ModelConfig(37, 37, model_dim=8, num_heads=2, ff_dim=8,
                             num_encoder_layers=1, num_decoder_layers=1)
        try:
            init_params(config, jax.random.key(0), jnp.float64)
        except ConfigError as error:
            print("ConfigError:", error)
        params = init_params(config, jax.random.key(0))
        print("dtype", params["target_embedding"]["embedding"].dtype)
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
    assert "JAX_ENABLE_X64=1" in result.stdout
    assert "dtype float32" in result.stdout
