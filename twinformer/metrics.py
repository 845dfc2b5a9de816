"""Scores of decoded outputs against references.

- token accuracy: the share of reference positions, EOS included, where the
  hypothesis has the same token id at the same position;
- exact match: the share of hypotheses whose text equals a reference;
- BLEU and chrF: corpus scores from sacrebleu (its default settings: BLEU-4
  with the 13a tokenizer, chrF with character 6-grams and beta 2), 0 to 100.

A hypothesis may have several references (a sentence with several
translations). Exact match accepts any of them, BLEU and chrF use all of them
as sacrebleu reference streams, and token accuracy scores the hypothesis
against the reference it matches best.
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu

from twinformer.config import EOS_ID
from twinformer.errors import DataError


def _check_lengths(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise DataError(
            f"got {len(hypotheses)} hypotheses but {len(references)} references; "
            "score one hypothesis per reference set"
        )
    if not hypotheses:
        raise DataError("nothing to score: the list of hypotheses is empty")
    if any(len(options) == 0 for options in references):
        raise DataError("every hypothesis needs at least one reference")


def _matching_positions(hypothesis: Sequence[int], reference: list[int]) -> int:
    # Unequal lengths are expected: positions beyond the shorter one never match.
    pairs = zip(hypothesis, reference, strict=False)
    return sum(1 for hyp, ref in pairs if int(hyp) == ref)


def token_accuracy(
    hypotheses: Sequence[Sequence[int]],
    references: Sequence[Sequence[Sequence[int]]],
) -> float:
    """Return the share of reference token positions predicted exactly.

    Each reference is compared with EOS appended, position by position; a
    hypothesis that is too short misses the remaining positions. The total is
    summed over all positions of the corpus, so longer sequences weigh more.

    Args:
        hypotheses: decoded ids per example, as ``Runner.greedy_search`` returns
            them (up to and including EOS, PAD after it is ignored because the
            reference ends at its EOS).
        references: for each example, one or more reference id lists without
            EOS; the one with the most matching positions is scored.

    Returns:
        A fraction in [0, 1].
    """
    _check_lengths(hypotheses, references)
    correct = 0
    total = 0
    for hypothesis, options in zip(hypotheses, references, strict=True):
        scored = []
        for reference in options:
            with_eos = [int(token) for token in reference] + [EOS_ID]
            matches = _matching_positions(hypothesis, with_eos)
            scored.append((matches / len(with_eos), matches, len(with_eos)))
        _, matches, length = max(scored, key=lambda entry: entry[0])
        correct += matches
        total += length
    return correct / total


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> float:
    """Return the share of hypotheses equal to one of their references.

    Texts are compared after collapsing runs of whitespace to one space and
    removing it at both ends; case and punctuation count.
    """
    _check_lengths(hypotheses, references)
    hits = sum(
        1
        for hypothesis, options in zip(hypotheses, references, strict=True)
        if _normalize(hypothesis) in {_normalize(option) for option in options}
    )
    return hits / len(hypotheses)


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    # sacrebleu takes one stream per reference rank; None fills the streams of
    # examples with fewer references.
    depth = max(len(options) for options in references)
    return [
        [options[rank] if rank < len(options) else None for options in references]
        for rank in range(depth)
    ]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Return corpus BLEU (0-100) of sacrebleu with every reference of each example."""
    _check_lengths(hypotheses, references)
    streams = _reference_streams(references)
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Return corpus chrF (0-100) of sacrebleu with every reference of each example."""
    _check_lengths(hypotheses, references)
    streams = _reference_streams(references)
    return float(sacrebleu.corpus_chrf(list(hypotheses), streams).score)
