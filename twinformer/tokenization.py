"""Tokenizers built with the Hugging Face ``tokenizers`` library.

Two kinds, both saved as one ``tokenizer.json`` in the run directory:

- a word-level tokenizer over a fixed list of symbols, for the synthetic tasks
  (the text "3 1 4" is three tokens);
- a BPE subword tokenizer with a Metaspace pre-tokenizer and decoder, trained
  on the training split, for ``translate``. Source and target texts share it,
  so the model can share one embedding matrix between them.

Both reserve ids 0-3 for ``SPECIAL_TOKENS`` (pad, begin, end, unknown). A
symbol, or for BPE a character, that is not in the vocabulary encodes to
``UNK_ID``; ``Tokenizer.count_unknown`` counts them so the command line can
warn. ``encode`` never adds BOS or EOS: ``twinformer.data`` does that.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from twinformer.checkpoint import atomic_write_text
from twinformer.config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from twinformer.errors import CheckpointError, ConfigError

# Word pieces that BPE merges must occur this often in the training texts.
_MIN_PAIR_FREQUENCY = 2


class Tokenizer:
    """Text <-> token ids, with the special tokens of ``twinformer.config``."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        """Wrap a ``tokenizers.Tokenizer`` after checking its special tokens.

        Raises:
            ConfigError: ids 0-3 are not ``SPECIAL_TOKENS`` in that order.
        """
        for token_id, token in enumerate(SPECIAL_TOKENS):
            found = backend.id_to_token(token_id)
            if found != token:
                raise ConfigError(
                    f"tokenizer has {found!r} at id {token_id}, expected {token!r}; "
                    f"ids 0-3 must be {', '.join(SPECIAL_TOKENS)}"
                )
        self.backend = backend

    @classmethod
    def from_symbols(cls, symbols: Sequence[str]) -> Tokenizer:
        """Build a word-level tokenizer whose vocabulary is ``symbols``.

        Texts are split on whitespace; decoding joins tokens with spaces.
        """
        counts = Counter(symbols)
        duplicates = sorted(symbol for symbol, count in counts.items() if count > 1)
        clashes = sorted(set(symbols) & set(SPECIAL_TOKENS))
        if duplicates or clashes or not symbols:
            raise ConfigError(
                "symbols must be a non-empty list of distinct tokens that are not "
                f"special tokens; got duplicates {duplicates}, special {clashes}"
            )
        tokens = [*SPECIAL_TOKENS, *symbols]
        vocab = {token: token_id for token_id, token in enumerate(tokens)}
        backend = tokenizers.Tokenizer(
            models.WordLevel(vocab, unk_token=SPECIAL_TOKENS[UNK_ID])
        )
        backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return cls(backend)

    @classmethod
    def train_subword(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Train a BPE tokenizer (Metaspace pre-tokenizer, NFC) on ``texts``.

        The vocabulary contains at most ``vocab_size`` tokens, special tokens
        included. Small corpora give fewer.
        """
        if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
            raise ConfigError(
                "vocab_size (--vocab-size) must be an integer above "
                f"{len(SPECIAL_TOKENS)}, got {vocab_size!r}"
            )
        backend = tokenizers.Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[UNK_ID]))
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=_MIN_PAIR_FREQUENCY,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Encode one text to ids, without BOS or EOS."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (the library runs them in parallel)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids up to the first EOS; PAD and BOS are dropped.

        ``<unk>`` stays visible in the text, so an unknown input is not
        silently lost.
        """
        kept: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id == EOS_ID:
                break
            if token_id not in (PAD_ID, BOS_ID):
                kept.append(token_id)
        return self.backend.decode(kept, skip_special_tokens=False)

    def decode_batch(self, rows: Iterable[Iterable[int]]) -> list[str]:
        """Decode each row of ids with ``decode``."""
        return [self.decode(row) for row in rows]

    @staticmethod
    def count_unknown(ids: Iterable[int]) -> int:
        """Count the ``UNK_ID`` tokens in ``ids``."""
        return sum(1 for token_id in ids if token_id == UNK_ID)

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file, atomically."""
        atomic_write_text(path, self.backend.to_str(pretty=True))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a tokenizer written by ``save``.

        Raises:
            CheckpointError: the file is missing, not a tokenizer file, or has
                other special tokens at ids 0-3.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file {path} not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises a bare Exception
            raise CheckpointError(
                f"{path}: not a valid tokenizer file: {error}"
            ) from None
        try:
            return cls(backend)
        except ConfigError as error:
            raise CheckpointError(f"{path}: {error}") from None
