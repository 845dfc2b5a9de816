"""Encoding, padding and batching of sequence pairs (numpy only).

Shapes: B batch, S source length, T target length (BOS or EOS included).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from twinformer.config import BOS_ID, EOS_ID, PAD_ID
from twinformer.errors import DataError

if TYPE_CHECKING:
    from twinformer.tokenization import Tokenizer


@dataclass(frozen=True)
class Batch:
    """A padded batch of sequence pairs, all int32, PAD_ID where unused.

    Shapes: source_ids (B, S); target_input_ids and target_output_ids (B, T).
    target_input_ids is [BOS] + target; target_output_ids is target + [EOS].
    """

    source_ids: np.ndarray
    target_input_ids: np.ndarray
    target_output_ids: np.ndarray


@dataclass(frozen=True)
class EncodedPairs:
    """Token ids of sequence pairs, without BOS or EOS, one int32 array each."""

    sources: list[np.ndarray]
    targets: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.sources)


def _too_long_message(
    index: int, source: str, source_length: int, target_length: int, max_length: int
) -> str:
    preview = source if len(source) <= 40 else source[:37] + "..."
    return (
        f"example {index} ({preview!r}) is too long: source {source_length} tokens, "
        f"target {target_length} tokens with EOS, but the model's max_length is "
        f"{max_length}; shorten it or train with a larger --max-length"
    )


def encode_pairs(
    pairs: Sequence[tuple[str, str]],
    tokenizer: Tokenizer,
    max_length: int,
    skip_long: bool = False,
) -> tuple[EncodedPairs, int]:
    """Tokenize pairs and check that each fits the model.

    A source fits with at most ``max_length`` tokens. A target fits with at
    most ``max_length - 1``, because the decoder reads it with BOS in front
    and predicts it with EOS after.

    Args:
        pairs: (source, target) texts.
        tokenizer: shared source and target tokenizer.
        max_length: the model's ``ModelConfig.max_length``.
        skip_long: drop pairs that do not fit instead of raising; used for
            training data read from a file.

    Returns:
        The encoded pairs that fit, and how many were skipped.

    Raises:
        DataError: a pair does not fit and ``skip_long`` is off; the message
            names the example (counted from 0) and both lengths.
    """
    source_ids = tokenizer.encode_batch([source for source, _ in pairs])
    target_ids = tokenizer.encode_batch([target for _, target in pairs])
    kept = EncodedPairs(sources=[], targets=[])
    skipped = 0
    for index, (source, target) in enumerate(zip(source_ids, target_ids, strict=True)):
        if len(source) > max_length or len(target) + 1 > max_length:
            if not skip_long:
                raise DataError(
                    _too_long_message(
                        index, pairs[index][0], len(source), len(target) + 1, max_length
                    )
                )
            skipped += 1
            continue
        kept.sources.append(np.asarray(source, dtype=np.int32))
        kept.targets.append(np.asarray(target, dtype=np.int32))
    return kept, skipped


def encode_sources(
    texts: Sequence[str], tokenizer: Tokenizer, max_length: int
) -> list[np.ndarray]:
    """Tokenize source texts for decoding.

    Raises:
        DataError: a text is empty or longer than ``max_length`` tokens; the
            message names the input (counted from 1).
    """
    encoded = []
    for index, ids in enumerate(tokenizer.encode_batch(list(texts)), start=1):
        if not ids:
            raise DataError(f"input {index} is empty; give a non-empty text")
        if len(ids) > max_length:
            raise DataError(
                f"input {index} has {len(ids)} tokens but the model's max_length "
                f"is {max_length}; shorten it"
            )
        encoded.append(np.asarray(ids, dtype=np.int32))
    return encoded


def pad_sequences(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """Stack sequences into one int32 array, right-padded with PAD_ID.

    Shape: (B, L) with L the longest sequence.
    """
    length = max(len(sequence) for sequence in sequences)
    padded = np.full((len(sequences), length), PAD_ID, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = sequence
    return padded


def make_batch(sources: Sequence[np.ndarray], targets: Sequence[np.ndarray]) -> Batch:
    """Pad pairs into a Batch: decoder input [BOS] + target, labels target + [EOS]."""
    bos = np.array([BOS_ID], dtype=np.int32)
    eos = np.array([EOS_ID], dtype=np.int32)
    return Batch(
        source_ids=pad_sequences(sources),
        target_input_ids=pad_sequences([np.concatenate([bos, t]) for t in targets]),
        target_output_ids=pad_sequences([np.concatenate([t, eos]) for t in targets]),
    )


def shuffled_batches(
    pairs: EncodedPairs, batch_size: int, seed: int
) -> Iterator[Batch]:
    """Yield training batches forever, reshuffling the pairs every epoch.

    Every batch contains ``batch_size`` pairs (or all of them, if fewer): a batch
    that would cross the end of an epoch continues into the next shuffle.
    Equal seeds give equal batch sequences.
    """
    if len(pairs) == 0:
        raise DataError("no training pairs to batch; the training split is empty")
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(pairs))
    pending = np.empty(0, dtype=np.int64)
    while True:
        while len(pending) < size:
            pending = np.concatenate([pending, rng.permutation(len(pairs))])
        chosen, pending = pending[:size], pending[size:]
        yield make_batch(
            [pairs.sources[i] for i in chosen], [pairs.targets[i] for i in chosen]
        )


def ordered_batches(pairs: EncodedPairs, batch_size: int) -> Iterator[Batch]:
    """Yield the pairs once, in order, in batches of at most ``batch_size``."""
    for start in range(0, len(pairs), batch_size):
        stop = start + batch_size
        yield make_batch(pairs.sources[start:stop], pairs.targets[start:stop])
