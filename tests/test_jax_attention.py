"""Attention of the JAX twin: manual and fused paths, masks, a Flax reference.

Sizes are prime-like (5 heads of 7, query length 11, key length 13) so that a
swapped axis changes a shape or a value and cannot pass.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl.attention import attend_fused, attend_manual, multi_head_attention
from jax_impl.model import causal_mask, init_params, padding_mask
from twinformer.config import ModelConfig

BATCH, HEADS, HEAD_DIM, QUERIES, KEYS = 3, 5, 7, 11, 13


def _inputs(dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(BATCH, QUERIES, HEADS, HEAD_DIM)] + [(BATCH, KEYS, HEADS, HEAD_DIM)] * 2
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def _padding_mask():
    # Row 0 sees all keys, row 1 the first 8, row 2 the first 3: (B, 1, 1, K).
    lengths = np.array([KEYS, 8, 3])
    return jnp.asarray(np.arange(KEYS)[None, :] < lengths[:, None])[:, None, None, :]


def _weighted_sum(attend, mask):
    # A scalar whose gradient reaches every output entry with its own weight.
    def scalar(query, key, value):
        output = attend(query, key, value, mask)
        weights = jnp.linspace(-1, 1, output.size, dtype=output.dtype)
        return jnp.sum(output * weights.reshape(output.shape))

    return scalar


def _grads(attend, mask, inputs):
    # Compiled once, so the backward pass does not dispatch op by op.
    return jax.jit(jax.grad(_weighted_sum(attend, mask), (0, 1, 2)))(*inputs)


def _relative_error(actual, expected):
    return float(jnp.max(jnp.abs(actual - expected)) / jnp.max(jnp.abs(expected)))


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        # float64: jax.nn.dot_product_attention (jax 0.10.2) runs its softmax in
        # float32, so the fused path carries float32 rounding (eps 6e-8) into
        # weights of up to 13 keys.
        (jnp.float64, 1e-6),
        # float32: both paths round at eps 6e-8 through softmax and two einsums.
        (jnp.float32, 1e-5),
    ],
)
def test_attend_manual_matches_fused(dtype, tolerance):
    inputs = _inputs(dtype)
    mask = _padding_mask()
    manual = attend_manual(*inputs, mask)
    fused = attend_fused(*inputs, mask)
    assert manual.shape == (BATCH, QUERIES, HEADS, HEAD_DIM)
    assert manual.dtype == fused.dtype == dtype
    assert _relative_error(fused, manual) < tolerance
    manual_grads = _grads(attend_manual, mask, inputs)
    fused_grads = _grads(attend_fused, mask, inputs)
    for got, want in zip(fused_grads, manual_grads, strict=True):
        # Same rounding as the outputs, through the softmax backward pass.
        assert _relative_error(got, want) < tolerance * 10


def test_attend_manual_matches_formula():
    query, key, value = _inputs(jnp.float64)
    mask = _padding_mask()
    scores = np.einsum("bqhe,bkhe->bhqk", query, key) / np.sqrt(HEAD_DIM)
    scores = np.where(np.asarray(mask), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhe->bqhe", weights, value)
    # float64 throughout; numpy and XLA sum in different orders (~1e-16 each).
    np.testing.assert_allclose(
        attend_manual(query, key, value, mask), expected, atol=1e-12
    )


@pytest.mark.parametrize("attend", [attend_manual, attend_fused])
def test_attend_fully_masked_row_zero(attend):
    inputs = _inputs(jnp.float64)
    # Query 4 of batch row 1 may attend to nothing: (B, 1, Q, K).
    mask = np.ones((BATCH, 1, QUERIES, KEYS), bool)
    mask[1, 0, 4, :] = False
    mask = jnp.asarray(mask)
    output = attend(*inputs, mask)
    assert bool(jnp.all(output[1, 4] == 0.0))
    assert bool(jnp.all(jnp.isfinite(output)))
    grads = _grads(attend, mask, inputs)
    for grad in grads:
        assert bool(jnp.all(jnp.isfinite(grad)))
    # The masked query receives no gradient at all.
    assert bool(jnp.all(grads[0][1, 4] == 0.0))


@pytest.mark.parametrize("attend", [attend_manual, attend_fused])
def test_attend_keyless_padding_row_zero(attend):
    # A padding mask (B, 1, 1, K) whose batch row 2 has no key at all: the
    # fused path zeroes that row's values rather than its output.
    inputs = _inputs(jnp.float64)
    lengths = np.array([KEYS, 8, 0])
    mask = jnp.asarray(np.arange(KEYS)[None, :] < lengths[:, None])[:, None, None, :]
    output = attend(*inputs, mask)
    assert bool(jnp.all(output[2] == 0.0))
    # The other rows match the manual path to the float32 rounding of the
    # library's softmax, as in test_attend_manual_matches_fused.
    expected = attend_manual(*inputs, mask)
    assert _relative_error(output[:2], expected[:2]) < 1e-6
    grads = _grads(attend, mask, inputs)
    for grad in grads:
        assert bool(jnp.all(jnp.isfinite(grad)))
        # Nothing of row 2 reaches the output, so nothing of it gets gradient.
        assert bool(jnp.all(grad[2] == 0.0))


@pytest.mark.parametrize("attend", [attend_manual, attend_fused])
def test_attend_combined_mask_hides_keys(attend):
    query, key, value = _inputs(jnp.float64)
    # Causal (1, 1, Q, K) with queries at key positions 2..12, and padding
    # (B, 1, 1, K) that hides keys 8..12 of row 1.
    mask = causal_mask(jnp.arange(KEYS - QUERIES, KEYS), KEYS) & _padding_mask()
    output = attend(query, key, value, mask)
    noise = jnp.asarray(
        np.random.default_rng(1).normal(size=(KEYS - 8, HEADS, HEAD_DIM))
    )

    # Row 1: keys 8..12 are padding, so changing them changes nothing.
    changed = attend(query, key.at[1, 8:].add(noise), value.at[1, 8:].add(noise), mask)
    np.testing.assert_array_equal(changed, output)

    # Row 0: key 12 is visible to the last query only (causal).
    changed = attend(
        query, key.at[0, 12].add(noise[0]), value.at[0, 12].add(noise[0]), mask
    )
    np.testing.assert_array_equal(changed[0, :-1], output[0, :-1])
    assert float(jnp.max(jnp.abs(changed[0, -1] - output[0, -1]))) > 1e-3


def _config(attention):
    return ModelConfig(
        37,
        37,
        model_dim=HEADS * HEAD_DIM,
        num_heads=HEADS,
        ff_dim=17,
        num_encoder_layers=1,
        num_decoder_layers=1,
        max_length=KEYS,
        attention=attention,
    )


def _flax_params(params):
    # Flax keeps per-head kernels: query/key/value (D, H, E), output (H, E, D).
    def heads(name):
        return {
            "kernel": params[name]["kernel"].reshape(-1, HEADS, HEAD_DIM),
            "bias": params[name]["bias"].reshape(HEADS, HEAD_DIM),
        }

    return {
        "query": heads("query"),
        "key": heads("key"),
        "value": heads("value"),
        "out": {
            "kernel": params["output"]["kernel"].reshape(HEADS, HEAD_DIM, -1),
            "bias": params["output"]["bias"],
        },
    }


def test_multi_head_attention_matches_flax():
    config = _config("manual")
    params = init_params(config, jax.random.key(3), jnp.float64)
    params = params["decoder"]["layers_0"]["cross_attention"]
    # Non-zero biases, so a bias in the wrong place cannot pass.
    rng = np.random.default_rng(4)
    for name in ("query", "key", "value", "output"):
        params[name]["bias"] = jnp.asarray(rng.normal(size=HEADS * HEAD_DIM))
    query_input = jnp.asarray(rng.normal(size=(BATCH, QUERIES, HEADS * HEAD_DIM)))
    key_value_input = jnp.asarray(rng.normal(size=(BATCH, KEYS, HEADS * HEAD_DIM)))
    mask = _padding_mask()
    ours, cache = multi_head_attention(
        params, query_input, key_value_input, mask, config=config
    )
    reference = nn.MultiHeadDotProductAttention(
        num_heads=HEADS,
        qkv_features=HEADS * HEAD_DIM,
        out_features=HEADS * HEAD_DIM,
        dtype=jnp.float64,
        param_dtype=jnp.float64,
        deterministic=True,
    )
    theirs = reference.apply(
        {"params": _flax_params(params)},
        query_input,
        key_value_input,
        key_value_input,
        mask=mask,
    )
    assert cache is None
    assert ours.shape == (BATCH, QUERIES, HEADS * HEAD_DIM)
    # float64 on both sides; only summation order differs (~1e-16 per term).
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_multi_head_attention_paths_agree_with_padding_mask():
    rng = np.random.default_rng(5)
    inputs = jnp.asarray(rng.normal(size=(BATCH, KEYS, HEADS * HEAD_DIM)), jnp.float32)
    ids = jnp.asarray(np.where(np.arange(KEYS) < np.array([[13], [8], [3]]), 5, 0))
    outputs = []
    for path in ("manual", "fused"):
        config = _config(path)
        params = init_params(config, jax.random.key(6), jnp.float32)
        params = params["encoder"]["layers_0"]["self_attention"]
        outputs.append(
            multi_head_attention(
                params, inputs, inputs, padding_mask(ids), config=config
            )[0]
        )
    # float32: softmax and four projections round at eps 6e-8 on O(1) values.
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
