"""LoRA of the JAX twin: a separate adapter tree, grads, optax, merge, files.

Sizes are prime-like (5 heads of 7, lengths 11 and 13, vocabulary 37, rank 3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jax_impl.lora import (
    dropout,
    init_lora,
    load_adapter,
    lora_linear,
    matmul_rows,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from jax_impl.model import forward, init_params
from twinformer.config import LoraConfig, ModelConfig
from twinformer.errors import LoraError
from twinformer.param_map import _flatten, adapter_tensor_specs

CONFIG = ModelConfig(
    37,
    37,
    model_dim=35,
    num_heads=5,
    ff_dim=17,
    num_encoder_layers=1,
    num_decoder_layers=1,
    max_length=17,
)
LORA = LoraConfig(rank=3, alpha=5.0, targets=("query", "value", "feed_forward.hidden"))


def _batch():
    rng = np.random.default_rng(0)
    source = rng.integers(4, 37, (3, 11)).astype(np.int32)
    target = rng.integers(4, 37, (3, 13)).astype(np.int32)
    source[1, 7:] = 0
    return source, target


def _with_random_b(adapters, seed=1):
    # Fresh adapters have B = 0; give B values so that the update is non-zero.
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)
    rng = np.random.default_rng(seed)
    values = [
        jnp.asarray(rng.normal(size=leaf.shape) * 0.1, leaf.dtype)
        if path[-1].key == "lora_B"
        else leaf
        for path, leaf in leaves
    ]
    return jax.tree_util.tree_unflatten(treedef, values)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0), jnp.float64)


@pytest.fixture(scope="module")
def run():
    return jax.jit(
        lambda p, a, s, t: forward(p, s, t, config=CONFIG, adapters=a, lora_config=LORA)
    )


def test_init_lora_tree_matches_param_map():
    adapters = init_lora(CONFIG, LORA, jax.random.key(1), jnp.float64)
    expected = {s.path: s.jax_shape for s in adapter_tensor_specs(CONFIG, LORA)}
    actual = {path: tuple(leaf.shape) for path, leaf in _flatten(adapters).items()}
    assert actual == expected
    query = adapters["encoder"]["layers_0"]["self_attention"]["query"]
    assert float(jnp.max(jnp.abs(query["lora_A"]))) <= 1 / np.sqrt(35)
    assert bool(jnp.all(query["lora_B"] == 0))


def test_init_lora_rejects_bad_requests():
    with pytest.raises(LoraError, match="matches no linear layer"):
        init_lora(CONFIG, LoraConfig(targets=("quary",)), jax.random.key(0))
    with pytest.raises(LoraError, match="exceeds min"):
        init_lora(CONFIG, LoraConfig(rank=18, targets=("hidden",)), jax.random.key(0))


def test_lora_linear_matches_formula():
    rng = np.random.default_rng(2)
    layer = {
        "kernel": jnp.asarray(rng.normal(size=(7, 5))),
        "bias": jnp.asarray(rng.normal(size=5)),
    }
    adapter = {
        "lora_A": jnp.asarray(rng.normal(size=(7, 3))),
        "lora_B": jnp.asarray(rng.normal(size=(3, 5))),
    }
    x = jnp.asarray(rng.normal(size=(2, 11, 7)))
    options = dict(scaling=1.5, dropout_rate=0.0, dropout_key=None, deterministic=True)
    got = lora_linear(layer, adapter, x, **options)
    kernel = layer["kernel"] + 1.5 * adapter["lora_A"] @ adapter["lora_B"]
    # float64; the merged kernel sums in another order (~1e-16 per term).
    np.testing.assert_allclose(got, x @ kernel + layer["bias"], atol=1e-12)


@pytest.mark.parametrize(
    "matrix_shape",
    # in > out takes the transposed weight gradient, in < out the direct one.
    [(7, 5), (5, 7)],
)
def test_matmul_rows_gradients_match_matmul(matrix_shape):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 11, matrix_shape[0])))
    matrix = jnp.asarray(rng.normal(size=matrix_shape))
    weights = jnp.asarray(rng.normal(size=(2, 11, matrix_shape[1])))

    def loss(product):
        return lambda x, matrix: jnp.sum(product(x, matrix) * weights)

    got = jax.grad(loss(matmul_rows), argnums=(0, 1))(x, matrix)
    want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, matrix)
    np.testing.assert_array_equal(
        matmul_rows(x, matrix).shape, (2, 11, matrix_shape[1])
    )
    for got_grad, want_grad in zip(got, want, strict=True):
        assert got_grad.shape == want_grad.shape
        # float64: the same products, summed in another order (~1e-16 each).
        np.testing.assert_allclose(got_grad, want_grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.5])
def test_dropout_mask_matches_textbook(rate):
    # dropout keeps an entry when sqrt(u) < sqrt(1 - rate). The textbook mask
    # is u < 1 - rate for the same uniform draw u. They may differ only where
    # u lies within one spacing of the float32 uniform grid (2^-23) of 1 - rate.
    key = jax.random.key(7, impl="philox2x32")
    x = jnp.full((64, 257), 3.0, jnp.float32)
    out = np.asarray(dropout(x, rate, key, deterministic=False))
    uniform = np.asarray(jax.random.uniform(key, x.shape, jnp.float32))
    keep_prob = 1.0 - rate

    kept_mask = out != 0
    textbook = uniform < np.float32(keep_prob)
    near = np.abs(uniform - keep_prob) <= 2.0**-23
    assert np.array_equal(kept_mask[~near], textbook[~near])
    # Kept entries are scaled by 1 / (1 - rate), in float32 arithmetic.
    np.testing.assert_array_equal(
        out[kept_mask], np.float32(3.0) / np.float32(keep_prob)
    )
    # 16,448 draws: the kept fraction lies within 5 standard deviations.
    spread = 5 * np.sqrt(keep_prob * rate / x.size)
    assert abs(kept_mask.mean() - keep_prob) < spread


def test_dropout_gradient_uses_forward_mask():
    key = jax.random.key(8, impl="philox2x32")
    x = jnp.asarray(np.random.default_rng(4).normal(size=(16, 33)), jnp.float32)
    out, pullback = jax.vjp(lambda v: dropout(v, 0.3, key, False), x)
    (grad,) = pullback(jnp.ones_like(x))
    kept_mask = np.asarray(out) != 0
    np.testing.assert_array_equal(np.asarray(grad) != 0, kept_mask)
    np.testing.assert_allclose(np.asarray(grad)[kept_mask], 1 / 0.7, rtol=1e-6)


def test_fresh_adapter_leaves_output_unchanged(params, run):
    adapters = init_lora(CONFIG, LORA, jax.random.key(3), jnp.float64)
    source, target = _batch()
    base = run(params, None, source, target)
    # B = 0 makes the update exactly zero, so the logits are bit-identical.
    np.testing.assert_array_equal(run(params, adapters, source, target), base)


def test_adapter_grads_reach_a_when_b_nonzero(params):
    source, target = _batch()

    def loss(adapters):
        logits = forward(
            params, source, target, config=CONFIG, adapters=adapters, lora_config=LORA
        )
        return jnp.mean(logits**2)

    fresh = init_lora(CONFIG, LORA, jax.random.key(4), jnp.float64)
    grad = jax.jit(jax.grad(loss))
    fresh_grads = _flatten(grad(fresh))
    moved_grads = _flatten(grad(_with_random_b(fresh)))
    for path, value in moved_grads.items():
        assert float(jnp.max(jnp.abs(value))) > 0, path
    for path, value in fresh_grads.items():
        # With B = 0 the gradient of A is exactly zero; B's is not.
        if path[-1] == "lora_A":
            assert float(jnp.max(jnp.abs(value))) == 0.0, path
        else:
            assert float(jnp.max(jnp.abs(value))) > 0, path


def test_optax_steps_train_adapters_only(params):
    source, target = _batch()
    optimizer = optax.adam(1e-2)
    adapters = init_lora(CONFIG, LORA, jax.random.key(5), jnp.float64)
    state = optimizer.init(adapters)
    base_before = jax.tree_util.tree_map(np.array, params)

    @jax.jit
    def step(adapters, state):
        def loss(adapters):
            logits = forward(
                params,
                source,
                target,
                config=CONFIG,
                adapters=adapters,
                lora_config=LORA,
            )
            return jnp.mean(
                optax.softmax_cross_entropy_with_integer_labels(logits, target)
            )

        grads = jax.grad(loss)(adapters)
        updates, state = optimizer.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state

    trained = adapters
    for _ in range(3):
        trained, state = step(trained, state)
    for path, before in _flatten(base_before).items():
        np.testing.assert_array_equal(_flatten(params)[path], before)
    for path, leaf in _flatten(trained).items():
        assert float(jnp.max(jnp.abs(leaf - _flatten(adapters)[path]))) > 0, path
    # Adam's moments cover exactly the adapter leaves, with their shapes.
    adam_state = state[0]
    for moments in (adam_state.mu, adam_state.nu):
        assert jax.tree_util.tree_structure(moments) == jax.tree_util.tree_structure(
            adapters
        )
        for path, leaf in _flatten(moments).items():
            assert leaf.shape == _flatten(adapters)[path].shape


def test_merge_unmerge_round_trip(params, run):
    adapters = _with_random_b(init_lora(CONFIG, LORA, jax.random.key(6), jnp.float64))
    source, target = _batch()
    merged = merge_lora(params, adapters, LORA)
    # Pure: the input tree is untouched and the merged tree is a new one.
    query = ("encoder", "layers_0", "self_attention", "query", "kernel")
    assert (
        float(jnp.max(jnp.abs(_flatten(merged)[query] - _flatten(params)[query]))) > 0
    )
    unmerged = unmerge_lora(merged, adapters, LORA)
    for path, leaf in _flatten(params).items():
        # float64: W + sAB - sAB rounds once each way, ~1e-16 relative.
        np.testing.assert_allclose(_flatten(unmerged)[path], leaf, atol=1e-13)
    merged_logits = forward(merged, source, target, config=CONFIG)
    # float64: merged kernels change summation order only.
    np.testing.assert_allclose(
        merged_logits, run(params, adapters, source, target), atol=1e-10
    )


def test_merge_rejects_nonfinite_adapter(params):
    adapters = init_lora(CONFIG, LORA, jax.random.key(7), jnp.float64)
    layer = adapters["decoder"]["layers_0"]["self_attention"]["value"]
    layer["lora_B"] = layer["lora_B"].at[0, 0].set(jnp.nan)
    with pytest.raises(LoraError, match="decoder/layers_0/self_attention/value/lora_B"):
        merge_lora(params, adapters, LORA)


def test_adapter_save_load_round_trip(tmp_path):
    adapters = _with_random_b(init_lora(CONFIG, LORA, jax.random.key(8), jnp.float64))
    save_adapter(tmp_path, adapters, LORA, CONFIG)
    assert (tmp_path / "adapter.safetensors").exists()
    loaded_config, loaded = load_adapter(tmp_path, CONFIG, jnp.float64)
    assert loaded_config == LORA
    for path, leaf in _flatten(adapters).items():
        np.testing.assert_array_equal(_flatten(loaded)[path], leaf)
