"""Decoding of the JAX twin: cache, greedy, beam search, request checks.

Sizes are prime-like (5 heads of 7, source length 11, vocabulary 37).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import decode as decoding
from jax_impl.lora import init_lora, merge_lora
from jax_impl.model import decode, encode, init_cache, init_params
from twinformer.config import EOS_ID, PAD_ID, LoraConfig, ModelConfig
from twinformer.errors import ConfigError, DataError

CONFIG = ModelConfig(
    37,
    37,
    model_dim=35,
    num_heads=5,
    ff_dim=17,
    num_encoder_layers=1,
    num_decoder_layers=1,
    max_length=13,
)
LORA = LoraConfig(rank=3, alpha=5.0, targets=("value", "cross_attention.key"))
STEPS = 9


@pytest.fixture(scope="module")
def params():
    params = init_params(CONFIG, jax.random.key(0), jnp.float64)
    # This untrained model repeats token 13 for most sources; an EOS embedding
    # close to token 13's makes those rows stop early while others go on.
    embedding = params["target_embedding"]["embedding"]
    params["target_embedding"]["embedding"] = embedding.at[EOS_ID].set(
        1.3 * embedding[13]
    )
    return params


@pytest.fixture(scope="module")
def source():
    ids = np.random.default_rng(1).integers(4, 37, (4, 11)).astype(np.int32)
    ids[1, 6:] = PAD_ID
    ids[3, 2:] = PAD_ID
    return ids


def _memory(params, source):
    return jax.jit(lambda p, s: encode(p, s, config=CONFIG))(params, source)


def test_cache_logits_match_full_decode(params, source):
    memory = _memory(params, source)
    prefix = np.random.default_rng(2).integers(4, 37, (4, 7)).astype(np.int32)
    full, _ = jax.jit(lambda ids: decode(params, ids, memory, source, config=CONFIG))(
        prefix
    )
    cache = init_cache(params, memory, 7, config=CONFIG)
    step = jax.jit(
        lambda ids, cache: decode(
            params, ids, memory, source, config=CONFIG, cache=cache
        )
    )
    for t in range(7):
        logits, cache = step(prefix[:, t : t + 1], cache)
        # float64, except that jax.nn.dot_product_attention runs its softmax in
        # float32 (jax 0.10.2): rounding near 6e-8 on weights of O(1) logits.
        np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert int(cache["position"]) == 7


def test_greedy_cached_matches_uncached(params, source):
    cached = decoding.greedy_search(params, source, STEPS, config=CONFIG)
    uncached = decoding.greedy_search(
        params, source, STEPS, config=CONFIG, use_cache=False
    )
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(uncached))
    assert cached.dtype == jnp.int32
    assert 1 <= cached.shape[1] <= STEPS


def test_greedy_rows_stop_at_own_eos(params, source):
    ids = np.asarray(decoding.greedy_search(params, source, STEPS, config=CONFIG))
    assert (ids == EOS_ID).any(), "the fixture should make some row end"
    for row in ids:
        ends = np.flatnonzero(row == EOS_ID)
        if ends.size:
            assert (row[ends[0] + 1 :] == PAD_ID).all()
            assert (row[: ends[0]] != PAD_ID).all()


def test_greedy_merged_lora_matches_unmerged(params, source):
    adapters = init_lora(CONFIG, LORA, jax.random.key(3), jnp.float64)
    adapters = jax.tree_util.tree_map(lambda leaf: leaf + 0.05, adapters)
    unmerged = decoding.greedy_search(
        params, source, STEPS, config=CONFIG, adapters=adapters, lora_config=LORA
    )
    merged = decoding.greedy_search(
        merge_lora(params, adapters, LORA), source, STEPS, config=CONFIG
    )
    np.testing.assert_array_equal(np.asarray(merged), np.asarray(unmerged))


def test_beam_size_one_matches_greedy(params, source):
    greedy = np.asarray(decoding.greedy_search(params, source, STEPS, config=CONFIG))
    ids, scores = decoding.beam_search(params, source, STEPS, 1, config=CONFIG)
    assert ids.shape == (4, 1, greedy.shape[1])
    np.testing.assert_array_equal(np.asarray(ids[:, 0]), greedy)
    assert scores.shape == (4, 1)


def test_beam_search_cached_matches_uncached(params, source):
    cached = decoding.beam_search(params, source, STEPS, 3, num_return=2, config=CONFIG)
    uncached = decoding.beam_search(
        params, source, STEPS, 3, num_return=2, config=CONFIG, use_cache=False
    )
    np.testing.assert_array_equal(np.asarray(cached[0]), np.asarray(uncached[0]))
    # Same float32-softmax rounding as the logits test, summed over <= 9 steps.
    np.testing.assert_allclose(cached[1], uncached[1], atol=1e-5)
    scores = np.asarray(cached[1])
    assert (scores[:, 0] >= scores[:, 1]).all()


def test_beam_scores_use_length_penalty(params, source):
    ids, scores = decoding.beam_search(
        params, source, STEPS, 3, length_penalty=1.0, num_return=2, config=CONFIG
    )
    memory = _memory(params, source)
    row = np.asarray(ids[0, 0])
    length = (np.flatnonzero(row == EOS_ID)[:1] + 1).tolist() or [STEPS]
    tokens = row[: length[0]]
    prefix = np.concatenate([[1], tokens[:-1]])[None].astype(np.int32)
    logits, _ = decode(params, prefix, memory[:1], source[:1], config=CONFIG)
    log_probs = jax.nn.log_softmax(logits[0], axis=-1)
    total = float(sum(log_probs[i, t] for i, t in enumerate(tokens)))
    expected = total / ((5 + length[0]) / 6) ** 1.0
    # float32 softmax inside fused attention (see above), over <= 9 tokens.
    assert abs(float(scores[0, 0]) - expected) < 1e-5


@pytest.mark.parametrize(
    ("request_args", "message"),
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=13), "max_new_tokens"),
        (dict(beam_size=0), "beam_size"),
        (dict(num_return=4), "num_return"),
    ],
)
def test_beam_search_rejects_bad_request(
    params, source, monkeypatch, request_args, message
):
    def fail(*args, **kwargs):
        raise AssertionError("compiled loop reached")

    monkeypatch.setattr(decoding, "_beam_loop", fail)
    arguments = dict(max_new_tokens=STEPS, beam_size=3, num_return=1)
    arguments.update(request_args)
    with pytest.raises(ConfigError, match=message):
        decoding.beam_search(params, source, config=CONFIG, **arguments)


def test_greedy_rejects_bad_source(params):
    with pytest.raises(DataError, match="token id 40"):
        decoding.greedy_search(params, np.full((2, 5), 40, np.int32), 3, config=CONFIG)
    with pytest.raises(DataError, match="shape"):
        decoding.greedy_search(params, np.ones(5, np.int32), 3, config=CONFIG)
