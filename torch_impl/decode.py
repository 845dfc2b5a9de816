"""Greedy and beam-search decoding with a key/value cache.

With ``use_cache`` the decoder reads one new token per step: its self-attention
keys and values are written into a preallocated cache at the current
position, and the cross-attention keys and values are computed once from the
memory (``Transformer.init_cache``). Without it, every step decodes the whole
prefix again; both give the same tokens.

Shapes: B batch, S source length, N beam size, L generated length,
V vocabulary.

Both functions leave the train/eval mode alone; call ``model.eval()`` first
so that dropout is off. They decode under ``torch.inference_mode`` and return
ordinary tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from torch_impl.model import DecodeCache, Transformer
from twinformer.config import BOS_ID, EOS_ID, PAD_ID
from twinformer.errors import ConfigError, DataError

Decoder = TypeVar("Decoder", bound=Callable[..., Any])


def _ordinary_outputs(decoder: Decoder) -> Decoder:
    """Run ``decoder`` under ``torch.inference_mode`` and copy its tensors out.

    Inference mode skips autograd's bookkeeping in the decoding loop, but the
    tensors made in it reject in-place edits later. Copies made outside it
    are ordinary tensors.
    """

    @functools.wraps(decoder)
    def decode(*args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            outputs = decoder(*args, **kwargs)
        if isinstance(outputs, Tensor):
            return outputs.clone()
        return tuple(output.clone() for output in outputs)

    return cast(Decoder, decode)


def check_decode_request(
    model: Transformer,
    source_ids: Tensor,
    max_new_tokens: int,
    beam_size: int = 1,
    num_return: int = 1,
) -> None:
    """Raise ConfigError or DataError for a request the decoder cannot serve."""
    limit = model.config.max_length - 1
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= limit:
        raise ConfigError(
            f"max_new_tokens must be an integer in [1, {limit}] (the model's "
            f"max_length minus one for BOS), got {max_new_tokens!r}"
        )
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ConfigError(f"beam_size must be a positive integer, got {beam_size!r}")
    if not isinstance(num_return, int) or not 1 <= num_return <= beam_size:
        raise ConfigError(
            f"num_return must be an integer in [1, beam_size={beam_size}], "
            f"got {num_return!r}"
        )
    if source_ids.dim() != 2 or source_ids.shape[0] == 0:
        raise DataError(
            f"source_ids must have shape (batch, length) with batch >= 1, got "
            f"{tuple(source_ids.shape)}"
        )


def next_token_logits(
    model: Transformer,
    prefix_ids: Tensor,
    memory: Tensor,
    source_ids: Tensor,
    cache: DecodeCache | None,
) -> Tensor:
    """Return the logits (B, V) after the (B, t) prefix, feeding one id if cached."""
    if cache is None:
        return model.decode(prefix_ids, memory, source_ids)[:, -1]
    return model.decode(prefix_ids[:, -1:], memory, source_ids, cache)[:, -1]


def reorder_cache(cache: DecodeCache, indices: Tensor) -> None:
    """Gather the cached rows ``indices`` in place after beams are reordered.

    Only self-attention entries change. The cross-attention keys and values
    are equal for all beams of one sequence, and beams never leave their
    sequence, so they need no reordering.
    """
    cache["target_ids"] = cache["target_ids"].index_select(0, indices)
    for layer in cache["layers"]:
        entry = layer["self_attention"]
        entry["key"] = entry["key"].index_select(0, indices)
        entry["value"] = entry["value"].index_select(0, indices)


@_ordinary_outputs
def greedy_search(
    model: Transformer,
    source_ids: Tensor,
    max_new_tokens: int,
    use_cache: bool = True,
) -> Tensor:
    """Decode by taking the most likely token at each step.

    Each row stops at its own EOS; the loop ends when every row has stopped or
    after ``max_new_tokens`` steps.

    Args:
        model: the Transformer, in eval mode.
        source_ids: (B, S) ids, PAD_ID after the end.
        max_new_tokens: at most this many tokens per row, EOS included.
        use_cache: decode one token per step with a key/value cache.

    Returns:
        (B, L) ids after BOS up to and including EOS, PAD_ID after it;
        L <= max_new_tokens.

    Raises:
        ConfigError: max_new_tokens outside [1, max_length - 1].
    """
    check_decode_request(model, source_ids, max_new_tokens)
    memory = model.encode(source_ids)
    cache = model.init_cache(memory, max_new_tokens) if use_cache else None
    batch = source_ids.shape[0]
    # BOS, then room for every new id: (B, 1 + max_new_tokens).
    ids = source_ids.new_full((batch, 1 + max_new_tokens), PAD_ID)
    ids[:, 0] = BOS_ID
    done = torch.zeros(batch, dtype=torch.bool, device=source_ids.device)

    for step in range(max_new_tokens):
        prefix = ids[:, : step + 1]
        logits = next_token_logits(model, prefix, memory, source_ids, cache)
        token = logits.argmax(dim=-1).masked_fill(done, PAD_ID)  # (B,)
        ids[:, step + 1] = token
        done = done | (token == EOS_ID)
        if bool(done.all()):
            break
    return ids[:, 1 : step + 2]


def length_penalty_factor(length: int | Tensor, alpha: float) -> float | Tensor:
    """Return ((5 + length) / 6)^alpha, the length penalty of Wu et al. 2016."""
    return ((5.0 + length) / 6.0) ** alpha


@_ordinary_outputs
def beam_search(
    model: Transformer,
    source_ids: Tensor,
    max_new_tokens: int,
    beam_size: int,
    length_penalty: float = 0.6,
    num_return: int = 1,
    use_cache: bool = True,
) -> tuple[Tensor, Tensor]:
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
        model: the Transformer, in eval mode.
        source_ids: (B, S) ids, PAD_ID after the end.
        max_new_tokens: at most this many tokens per hypothesis, EOS included.
        beam_size: N, live hypotheses per sequence.
        length_penalty: alpha of the length penalty; 0 ranks by sum(log p).
        num_return: how many hypotheses to return per sequence, best first.
        use_cache: decode one token per step with a key/value cache.

    Returns:
        ids (B, num_return, L), PAD_ID after each EOS, and their scores
        (B, num_return).

    Raises:
        ConfigError: beam_size < 1, num_return outside [1, beam_size], or
            max_new_tokens outside [1, max_length - 1].
    """
    check_decode_request(model, source_ids, max_new_tokens, beam_size, num_return)
    batch = source_ids.shape[0]

    # Row b * N + k of the flat batch is beam k of sequence b.
    flat_source = source_ids.repeat_interleave(beam_size, dim=0)  # (B*N, S)
    memory = model.encode(source_ids).repeat_interleave(beam_size, dim=0)
    cache = model.init_cache(memory, max_new_tokens) if use_cache else None
    beams = _Beams(batch, beam_size, max_new_tokens, memory.dtype, memory.device)

    for step in range(max_new_tokens):
        logits = next_token_logits(model, beams.alive_ids, memory, flat_source, cache)
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, beam_size, -1)
        parents = beams.advance(log_probs, step, length_penalty)
        if cache is not None:
            reorder_cache(cache, parents)
        if bool(beams.done.all()):
            break
    beams.finish(step + 1, length_penalty)
    return beams.best(num_return)


class _Beams:
    """Live and finished hypotheses of a batched beam search."""

    def __init__(
        self,
        batch: int,
        beam_size: int,
        max_new_tokens: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.beam_size = beam_size
        self.max_new_tokens = max_new_tokens
        # Live prefixes, BOS first, (B*N, t + 1). Only beam 0 starts live, so
        # the first step does not expand N copies of the same prefix.
        self.alive_ids = torch.full(
            (batch * beam_size, 1), BOS_ID, dtype=torch.long, device=device
        )
        self.alive_scores = torch.full((batch, beam_size), -torch.inf, dtype=dtype)
        self.alive_scores[:, 0] = 0.0
        self.alive_scores = self.alive_scores.to(device)
        # Finished hypotheses, best first: ids (B, N, max_new_tokens) without
        # BOS, normalised scores (B, N), lengths (B, N); -inf marks empty slots.
        self.finished_ids = torch.full(
            (batch, beam_size, max_new_tokens), PAD_ID, dtype=torch.long, device=device
        )
        self.finished_scores = torch.full_like(self.alive_scores, -torch.inf)
        self.finished_lengths = torch.zeros_like(self.finished_ids[..., 0])
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)

    def advance(self, log_probs: Tensor, step: int, alpha: float) -> Tensor:
        """Extend the live beams by one token; return their parent rows (B*N,)."""
        batch, beams, vocab = log_probs.shape

        # The 2N best extensions per sequence, (B, 2N); 2N < N * V as V > 4.
        scores = (self.alive_scores[..., None] + log_probs).view(batch, -1)
        top_scores, top_index = scores.topk(2 * beams, dim=1)
        parent = top_index // vocab
        token = top_index % vocab

        # Candidate sequences, (B, 2N, t + 2).
        prefixes = self.alive_ids.view(batch, beams, -1)
        index = parent[..., None].expand(-1, -1, prefixes.shape[-1])
        sequences = torch.cat([prefixes.gather(1, index), token[..., None]], dim=-1)
        is_eos = token == EOS_ID
        self._add_finished(sequences, top_scores, is_eos, step, alpha)

        # The N best candidates that do not end in EOS stay alive.
        alive_scores, pick = top_scores.masked_fill(is_eos, -torch.inf).topk(beams)
        index = pick[..., None].expand(-1, -1, sequences.shape[-1])
        self.alive_ids = sequences.gather(1, index).view(batch * beams, -1)
        self.alive_scores = alive_scores
        offsets = torch.arange(batch, device=parent.device)[:, None] * beams
        return (parent.gather(1, pick) + offsets).view(-1)

    def finish(self, steps: int, alpha: float) -> None:
        """Add the live beams of unfinished sequences as hypotheses."""
        batch, beams = self.alive_scores.shape
        scores = self.alive_scores / length_penalty_factor(steps, alpha)
        scores = scores.masked_fill(self.done[:, None], -torch.inf)
        ids = self.alive_ids.view(batch, beams, -1)[..., 1:]
        lengths = torch.full_like(self.finished_lengths, steps)
        self._merge(ids, scores, lengths)

    def best(self, num_return: int) -> tuple[Tensor, Tensor]:
        """Return ids (B, num_return, L) and scores (B, num_return)."""
        scores = self.finished_scores[:, :num_return]
        length = max(int(self.finished_lengths[:, :num_return].max()), 1)
        return self.finished_ids[:, :num_return, :length], scores

    def _add_finished(
        self, sequences: Tensor, scores: Tensor, is_eos: Tensor, step: int, alpha: float
    ) -> None:
        # Only EOS candidates among the N best count, as in greedy search when
        # N = 1; sequences that are done keep their hypotheses unchanged.
        ranks = torch.arange(scores.shape[1], device=scores.device)
        eligible = is_eos & (ranks < self.beam_size) & ~self.done[:, None]
        normalised = scores / length_penalty_factor(step + 1, alpha)
        normalised = normalised.masked_fill(~eligible, -torch.inf)
        lengths = torch.full_like(ranks, step + 1).expand_as(scores)
        self._merge(sequences[..., 1:], normalised, lengths)
        count = torch.isfinite(self.finished_scores).sum(dim=1)
        self.done = self.done | (count >= self.beam_size)

    def _merge(self, ids: Tensor, scores: Tensor, lengths: Tensor) -> None:
        # Keep the N best of the finished and the new hypotheses.
        padding = self.max_new_tokens - ids.shape[-1]
        ids = torch.nn.functional.pad(ids, (0, padding), value=PAD_ID)
        all_ids = torch.cat([self.finished_ids, ids], dim=1)
        all_scores = torch.cat([self.finished_scores, scores], dim=1)
        all_lengths = torch.cat([self.finished_lengths, lengths], dim=1)
        self.finished_scores, keep = all_scores.topk(self.beam_size, dim=1)
        self.finished_lengths = all_lengths.gather(1, keep)
        index = keep[..., None].expand(-1, -1, all_ids.shape[-1])
        self.finished_ids = all_ids.gather(1, index)
