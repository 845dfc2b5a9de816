"""Greedy and beam-search decoding as compiled loops with a key/value cache.

JAX twin of ``torch_impl/decode.py``. With ``use_cache`` the decoder reads one
new token per step: its self-attention keys and values are written into a
preallocated cache at the current position, and the cross-attention keys and
values are projected once from the memory (``jax_impl.model.init_cache``).
Without it, every step decodes the whole fixed-size prefix buffer again, and
the causal mask hides the positions not yet written; both give the same
tokens.

JAX difference: every array keeps a fixed shape, so the prefix is a (B, L + 1)
buffer written at step t and the loop is a ``lax.while_loop``. Each search is
compiled once per batch size, source length, ``max_new_tokens``, beam size and
config, and the loop stops early once every row has finished, as the torch
twin's loop does.

Shapes: B batch, S source length, N beam size, L ``max_new_tokens``,
V target vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_impl.model import check_token_ids, decode, encode, init_cache
from twinformer.config import BOS_ID, EOS_ID, PAD_ID, LoraConfig, ModelConfig
from twinformer.errors import ConfigError, DataError

Tree = dict[str, Any]


def check_decode_request(
    config: ModelConfig,
    source_ids: Any,
    max_new_tokens: int,
    beam_size: int = 1,
    num_return: int = 1,
) -> None:
    """Raise ConfigError or DataError for a request the decoder cannot serve.

    Runs on concrete values before anything is compiled.
    """
    limit = config.max_length - 1
    if not _is_int(max_new_tokens) or not 1 <= max_new_tokens <= limit:
        raise ConfigError(
            f"max_new_tokens must be an integer in [1, {limit}] (the model's "
            f"max_length minus one for BOS), got {max_new_tokens!r}"
        )
    if not _is_int(beam_size) or beam_size < 1:
        raise ConfigError(f"beam_size must be a positive integer, got {beam_size!r}")
    if not _is_int(num_return) or not 1 <= num_return <= beam_size:
        raise ConfigError(
            f"num_return must be an integer in [1, beam_size={beam_size}], "
            f"got {num_return!r}"
        )
    shape = np.shape(source_ids)
    if len(shape) != 2 or shape[0] == 0:
        raise DataError(
            f"source_ids must have shape (batch, length) with batch >= 1, got {shape}"
        )
    check_token_ids(
        source_ids, config.source_vocab_size, config.max_length, "source_ids"
    )


def _as_param_dtype(value: float, params: Tree) -> jax.Array:
    # A traced argument in the parameters' dtype: changing it does not
    # recompile, and float64 models keep a float64 penalty.
    return jnp.asarray(value, jax.tree_util.tree_leaves(params)[0].dtype)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def next_token_logits(
    params: Tree,
    prefix_ids: jax.Array,
    step: jax.Array,
    memory: jax.Array,
    source_ids: jax.Array,
    cache: Tree | None,
    *,
    config: ModelConfig,
    adapters: Tree | None,
    lora_config: LoraConfig | None,
) -> tuple[jax.Array, Tree | None]:
    """Return the logits (B, V) after prefix position ``step``, and the cache.

    JAX difference: ``prefix_ids`` is the whole (B, L + 1) buffer. With a cache
    only the id at ``step`` is fed; without one, the first L positions are
    decoded and position ``step`` is read, since later positions are causally
    masked.
    """
    options = dict(config=config, adapters=adapters, lora_config=lora_config)
    if cache is None:
        inputs = prefix_ids[:, :-1]
        logits, _ = decode(params, inputs, memory, source_ids, **options)
        return lax.dynamic_index_in_dim(logits, step, axis=1, keepdims=False), None
    token = lax.dynamic_slice_in_dim(prefix_ids, step, 1, axis=1)  # (B, 1)
    logits, cache = decode(params, token, memory, source_ids, cache=cache, **options)
    return logits[:, -1], cache


def reorder_cache(cache: Tree, indices: jax.Array) -> Tree:
    """Gather the cached rows ``indices`` after beams are reordered.

    Only self-attention entries change. The cross-attention keys and values
    are equal for all beams of one sequence, and beams never leave their
    sequence, so they need no reordering. JAX difference: returns a new cache.
    """
    layers = []
    for layer in cache["layers"]:
        entry = layer["self_attention"]
        self_attention = {name: entry[name][indices] for name in ("key", "value")}
        layers.append(dict(layer, self_attention=self_attention))
    return dict(cache, target_ids=cache["target_ids"][indices], layers=layers)


def greedy_search(
    params: Tree,
    source_ids: Any,
    max_new_tokens: int,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    use_cache: bool = True,
) -> jax.Array:
    """Decode by taking the most likely token at each step.

    Each row stops at its own EOS; the loop ends when every row has stopped or
    after ``max_new_tokens`` steps.

    Args:
        params: the base tree of ``jax_impl.model``.
        source_ids: (B, S) ids, PAD_ID after the end.
        max_new_tokens: at most this many tokens per row, EOS included.
        config: model shape.
        adapters: the LoRA tree, or None.
        lora_config: the adapters' scaling.
        use_cache: decode one token per step with a key/value cache.

    Returns:
        (B, L) int32 ids after BOS up to and including EOS, PAD_ID after it;
        L <= max_new_tokens is the number of steps taken.

    Raises:
        ConfigError: max_new_tokens outside [1, max_length - 1].
        DataError: source ids of the wrong shape, outside the vocabulary or
            too long.
    """
    check_decode_request(config, source_ids, max_new_tokens)
    prefix, steps = _greedy_loop(
        params,
        adapters,
        jnp.asarray(source_ids, jnp.int32),
        config=config,
        lora_config=lora_config,
        max_new_tokens=max_new_tokens,
        use_cache=use_cache,
    )
    return prefix[:, 1 : 1 + int(steps)]


@functools.partial(
    jax.jit, static_argnames=("config", "lora_config", "max_new_tokens", "use_cache")
)
def _greedy_loop(
    params: Tree,
    adapters: Tree | None,
    source_ids: jax.Array,
    *,
    config: ModelConfig,
    lora_config: LoraConfig | None,
    max_new_tokens: int,
    use_cache: bool,
) -> tuple[jax.Array, jax.Array]:
    options = dict(config=config, adapters=adapters, lora_config=lora_config)
    memory = encode(params, source_ids, **options)
    cache = init_cache(params, memory, max_new_tokens, **options) if use_cache else None
    batch = source_ids.shape[0]
    prefix = jnp.full((batch, max_new_tokens + 1), PAD_ID, jnp.int32)
    prefix = prefix.at[:, 0].set(BOS_ID)
    done = jnp.zeros(batch, bool)

    def running(state: tuple) -> jax.Array:
        step, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(state: tuple) -> tuple:
        step, prefix, done, cache = state
        logits, cache = next_token_logits(
            params, prefix, step, memory, source_ids, cache, **options
        )
        token = jnp.where(done, PAD_ID, jnp.argmax(logits, axis=-1).astype(jnp.int32))
        prefix = prefix.at[:, step + 1].set(token)
        return step + 1, prefix, done | (token == EOS_ID), cache

    state = (jnp.int32(0), prefix, done, cache)
    steps, prefix, _, _ = lax.while_loop(running, advance, state)
    return prefix, steps


def length_penalty_factor(length: Any, alpha: float) -> Any:
    """Return ((5 + length) / 6)^alpha, the length penalty of Wu et al. 2016."""
    return ((5.0 + length) / 6.0) ** alpha


def beam_search(
    params: Tree,
    source_ids: Any,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 0.6,
    num_return: int = 1,
    *,
    config: ModelConfig,
    adapters: Tree | None = None,
    lora_config: LoraConfig | None = None,
    use_cache: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Decode with a batched beam search.

    A hypothesis scores sum(log p) / ((5 + length) / 6)^length_penalty, with
    length the number of generated tokens, EOS included (Wu et al. 2016).
    Each step expands the N live beams of a sequence into 2N candidates. A
    candidate ending in EOS among the N best joins that sequence's finished
    hypotheses. The N best candidates not ending in EOS stay alive. A
    sequence stops when it has N finished hypotheses. Sequences still
    running after ``max_new_tokens`` steps add their live beams as
    hypotheses. With beam_size 1 this is greedy search.

    Args:
        params: the base tree of ``jax_impl.model``.
        source_ids: (B, S) ids, PAD_ID after the end.
        max_new_tokens: at most this many tokens per hypothesis, EOS included.
        beam_size: N, live hypotheses per sequence.
        length_penalty: alpha of the length penalty; 0 ranks by sum(log p).
        num_return: how many hypotheses to return per sequence, best first.
        config: model shape.
        adapters: the LoRA tree, or None.
        lora_config: the adapters' scaling.
        use_cache: decode one token per step with a key/value cache.

    Returns:
        ids (B, num_return, L), PAD_ID after each EOS, and their scores
        (B, num_return).

    Raises:
        ConfigError: beam_size < 1, num_return outside [1, beam_size], or
            max_new_tokens outside [1, max_length - 1].
        DataError: source ids of the wrong shape, outside the vocabulary or
            too long.
    """
    check_decode_request(config, source_ids, max_new_tokens, beam_size, num_return)
    ids, scores, lengths = _beam_loop(
        params,
        adapters,
        jnp.asarray(source_ids, jnp.int32),
        _as_param_dtype(length_penalty, params),
        config=config,
        lora_config=lora_config,
        max_new_tokens=max_new_tokens,
        beam_size=beam_size,
        use_cache=use_cache,
    )
    length = max(int(jnp.max(lengths[:, :num_return])), 1)
    return ids[:, :num_return, :length], scores[:, :num_return]


@functools.partial(
    jax.jit,
    static_argnames=(
        "config",
        "lora_config",
        "max_new_tokens",
        "beam_size",
        "use_cache",
    ),
)
def _beam_loop(
    params: Tree,
    adapters: Tree | None,
    source_ids: jax.Array,
    alpha: jax.Array,
    *,
    config: ModelConfig,
    lora_config: LoraConfig | None,
    max_new_tokens: int,
    beam_size: int,
    use_cache: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    options = dict(config=config, adapters=adapters, lora_config=lora_config)
    batch = source_ids.shape[0]

    # Row b * N + k of the flat batch is beam k of sequence b.
    flat_source = jnp.repeat(source_ids, beam_size, axis=0)  # (B*N, S)
    memory = jnp.repeat(encode(params, source_ids, **options), beam_size, axis=0)
    cache = init_cache(params, memory, max_new_tokens, **options) if use_cache else None
    beams = _initial_beams(batch, beam_size, max_new_tokens, memory.dtype)

    def running(state: tuple) -> jax.Array:
        step, beams, _ = state
        return (step < max_new_tokens) & ~jnp.all(beams["done"])

    def advance(state: tuple) -> tuple:
        step, beams, cache = state
        logits, cache = next_token_logits(
            params, beams["alive_ids"], step, memory, flat_source, cache, **options
        )
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, beam_size, -1)
        beams, parents = _advance(beams, log_probs, step, alpha)
        if cache is not None:
            cache = reorder_cache(cache, parents)
        return step + 1, beams, cache

    steps, beams, _ = lax.while_loop(running, advance, (jnp.int32(0), beams, cache))
    beams = _finish(beams, steps, alpha)
    return beams["finished_ids"], beams["finished_scores"], beams["finished_lengths"]


def _initial_beams(batch: int, beam_size: int, max_new_tokens: int, dtype: Any) -> Tree:
    # Live prefixes, BOS first, (B*N, L + 1), PAD_ID where not yet written.
    # Only beam 0 starts live, so the first step does not expand N copies of
    # the same prefix. Finished hypotheses, best first: ids (B, N, L) without
    # BOS, normalised scores (B, N), lengths (B, N); -inf marks empty slots.
    alive_ids = jnp.full((batch * beam_size, max_new_tokens + 1), PAD_ID, jnp.int32)
    alive_scores = jnp.full((batch, beam_size), -jnp.inf, dtype)
    return {
        "alive_ids": alive_ids.at[:, 0].set(BOS_ID),
        "alive_scores": alive_scores.at[:, 0].set(0.0),
        "finished_ids": jnp.full((batch, beam_size, max_new_tokens), PAD_ID, jnp.int32),
        "finished_scores": jnp.full((batch, beam_size), -jnp.inf, dtype),
        "finished_lengths": jnp.zeros((batch, beam_size), jnp.int32),
        "done": jnp.zeros(batch, bool),
    }


def _advance(
    beams: Tree, log_probs: jax.Array, step: jax.Array, alpha: jax.Array
) -> tuple[Tree, jax.Array]:
    # Extend the live beams by one token; return their parent rows (B*N,).
    batch, num_beams, vocab = log_probs.shape

    # The 2N best extensions per sequence, (B, 2N); 2N < N * V as V > 4.
    scores = (beams["alive_scores"][..., None] + log_probs).reshape(batch, -1)
    top_scores, top_index = lax.top_k(scores, 2 * num_beams)
    parent = top_index // vocab
    token = (top_index % vocab).astype(jnp.int32)

    # Candidate sequences, (B, 2N, L + 1), with the token written at step + 1.
    prefixes = beams["alive_ids"].reshape(batch, num_beams, -1)
    sequences = jnp.take_along_axis(prefixes, parent[..., None], axis=1)
    sequences = sequences.at[:, :, step + 1].set(token)
    is_eos = token == EOS_ID
    beams = _add_finished(beams, sequences, top_scores, is_eos, step, alpha)

    # The N best candidates that do not end in EOS stay alive.
    alive_scores, pick = lax.top_k(jnp.where(is_eos, -jnp.inf, top_scores), num_beams)
    alive_ids = jnp.take_along_axis(sequences, pick[..., None], axis=1)
    beams = dict(
        beams,
        alive_ids=alive_ids.reshape(batch * num_beams, -1),
        alive_scores=alive_scores,
    )
    offsets = jnp.arange(batch)[:, None] * num_beams
    parents = jnp.take_along_axis(parent, pick, axis=1) + offsets
    return beams, parents.reshape(-1)


def _add_finished(
    beams: Tree,
    sequences: jax.Array,
    scores: jax.Array,
    is_eos: jax.Array,
    step: jax.Array,
    alpha: jax.Array,
) -> Tree:
    # Only EOS candidates among the N best count, as in greedy search when
    # N = 1; sequences that are done keep their hypotheses unchanged.
    num_beams = beams["finished_scores"].shape[1]
    ranks = jnp.arange(scores.shape[1])
    eligible = is_eos & (ranks < num_beams) & ~beams["done"][:, None]
    penalty = length_penalty_factor((step + 1).astype(scores.dtype), alpha)
    normalised = jnp.where(eligible, scores / penalty, -jnp.inf)
    lengths = jnp.full(scores.shape, step + 1, jnp.int32)
    beams = _merge(beams, sequences[..., 1:], normalised, lengths)
    count = jnp.sum(jnp.isfinite(beams["finished_scores"]), axis=1)
    return dict(beams, done=beams["done"] | (count >= num_beams))


def _finish(beams: Tree, steps: jax.Array, alpha: jax.Array) -> Tree:
    # Add the live beams of unfinished sequences as hypotheses.
    batch, num_beams = beams["alive_scores"].shape
    penalty = length_penalty_factor(steps.astype(beams["alive_scores"].dtype), alpha)
    scores = beams["alive_scores"] / penalty
    scores = jnp.where(beams["done"][:, None], -jnp.inf, scores)
    ids = beams["alive_ids"].reshape(batch, num_beams, -1)[..., 1:]
    lengths = jnp.full(scores.shape, steps, jnp.int32)
    return _merge(beams, ids, scores, lengths)


def _merge(beams: Tree, ids: jax.Array, scores: jax.Array, lengths: jax.Array) -> Tree:
    # Keep the N best of the finished and the new hypotheses. JAX difference:
    # the ids already span all L positions, PAD_ID where not yet written.
    num_beams = beams["finished_scores"].shape[1]
    all_ids = jnp.concatenate([beams["finished_ids"], ids], axis=1)
    all_scores = jnp.concatenate([beams["finished_scores"], scores], axis=1)
    all_lengths = jnp.concatenate([beams["finished_lengths"], lengths], axis=1)
    finished_scores, keep = lax.top_k(all_scores, num_beams)
    return dict(
        beams,
        finished_scores=finished_scores,
        finished_lengths=jnp.take_along_axis(all_lengths, keep, axis=1),
        finished_ids=jnp.take_along_axis(all_ids, keep[..., None], axis=1),
    )
