"""Training tasks as text pairs: synthetic sequence tasks and TSV translation.

Every task produces a ``Split`` of (source, target) string pairs. The synthetic
tasks write a sequence of symbols as space-separated numerals ("3 1 4") and ask
for it copied ("3 1 4"), reversed ("4 1 3") or sorted by value ("1 3 4"). Their
held-out pairs are drawn first and rejected from the training draw, so no
held-out source occurs in training.

``translate`` reads ``source<TAB>target[<TAB>anything]`` lines. A source may
have several targets, one line each. The split keeps all lines of one source
on the same side, so validation sources are unseen, and ``group_references``
collects every target of a source for BLEU and chrF.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from twinformer.errors import ConfigError, DataError

SYNTHETIC_TASKS = ("copy", "reverse", "sort")
TASKS = (*SYNTHETIC_TASKS, "translate")

# A (source, target) pair of texts.
Pair = tuple[str, str]


@dataclass(frozen=True)
class Split:
    """Training and held-out validation pairs of one task."""

    train: list[Pair]
    valid: list[Pair]


@dataclass(frozen=True)
class SyntheticSpec:
    """Size of a synthetic task: alphabet, sequence lengths and example counts.

    The defaults give 10^3 + ... + 10^9 possible sequences, so the held-out set
    is a vanishing fraction of them and the model has to learn the rule rather
    than memorise the training pairs.
    """

    # Symbols are the numerals "0" .. str(num_symbols - 1).
    num_symbols: int = 10
    # Sequence lengths in symbols, drawn uniformly from [min_length, max_length].
    min_length: int = 3
    max_length: int = 9
    # Training pairs, generated once and reshuffled every epoch.
    train_size: int = 50_000
    # Held-out pairs, disjoint from the training pairs.
    valid_size: int = 500

    def __post_init__(self) -> None:
        for name in ("num_symbols", "min_length", "max_length", "train_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < self.min_length:
            raise ConfigError(
                f"max_length ({self.max_length}) must be at least min_length "
                f"({self.min_length})"
            )
        if not isinstance(self.valid_size, int) or self.valid_size < 1:
            raise ConfigError(
                f"valid_size must be a positive integer, got {self.valid_size!r}"
            )

    def sequence_count(self) -> int:
        """Count the distinct symbol sequences the spec allows."""
        lengths = range(self.min_length, self.max_length + 1)
        return sum(self.num_symbols**length for length in lengths)


def apply_task(task: str, symbols: list[str]) -> list[str]:
    """Return the target sequence of a synthetic ``task`` for ``symbols``."""
    if task == "copy":
        return list(symbols)
    if task == "reverse":
        return symbols[::-1]
    if task == "sort":
        return sorted(symbols, key=int)
    raise ConfigError(
        f"unknown synthetic task {task!r}; choose one of {', '.join(SYNTHETIC_TASKS)}"
    )


def _draw_sequence(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[str, ...]:
    length = int(rng.integers(spec.min_length, spec.max_length + 1))
    values = rng.integers(0, spec.num_symbols, size=length)
    return tuple(str(value) for value in values)


def _draw_distinct(
    rng: np.random.Generator, spec: SyntheticSpec, count: int
) -> list[tuple[str, ...]]:
    drawn: dict[tuple[str, ...], None] = {}
    while len(drawn) < count:
        drawn[_draw_sequence(rng, spec)] = None
    return list(drawn)


def make_synthetic_split(
    task: str, seed: int, spec: SyntheticSpec | None = None
) -> Split:
    """Generate training and held-out pairs of a synthetic task.

    The held-out sequences are distinct from each other and never occur as a
    training source. Training sources may repeat among themselves.

    Args:
        task: "copy", "reverse" or "sort".
        seed: seed of the numpy generator; equal seeds give equal splits.
        spec: alphabet, lengths and sizes; ``SyntheticSpec()`` when omitted.

    Returns:
        The split, with texts of space-separated numerals.

    Raises:
        ConfigError: unknown task, or the spec allows too few distinct
            sequences to hold out ``valid_size`` of them and still train.
    """
    spec = spec or SyntheticSpec()
    apply_task(task, [])  # reject an unknown task before generating anything
    if spec.sequence_count() < 2 * spec.valid_size:
        raise ConfigError(
            f"the synthetic spec allows only {spec.sequence_count()} distinct "
            f"sequences, too few to hold out {spec.valid_size}; raise num_symbols "
            "or max_length"
        )
    rng = np.random.default_rng(seed)
    held_out = _draw_distinct(rng, spec, spec.valid_size)
    excluded = set(held_out)
    train: list[tuple[str, ...]] = []
    while len(train) < spec.train_size:
        sequence = _draw_sequence(rng, spec)
        if sequence not in excluded:
            train.append(sequence)
    return Split(
        train=[_synthetic_pair(task, sequence) for sequence in train],
        valid=[_synthetic_pair(task, sequence) for sequence in held_out],
    )


def _synthetic_pair(task: str, sequence: tuple[str, ...]) -> Pair:
    return " ".join(sequence), " ".join(apply_task(task, list(sequence)))


def synthetic_symbols(spec: SyntheticSpec | None = None) -> list[str]:
    """List the symbols of a synthetic task, the vocabulary of its tokenizer."""
    spec = spec or SyntheticSpec()
    return [str(value) for value in range(spec.num_symbols)]


def read_tsv(path: str | os.PathLike) -> list[Pair]:
    """Read ``source<TAB>target[<TAB>anything]`` lines from a UTF-8 file.

    Columns after the second (an attribution, for example) are ignored. Leading
    and trailing whitespace of each side is removed; a byte order mark at the
    start and Windows line endings are accepted.

    Raises:
        DataError: the file is missing, unreadable or empty, or a line (named
            by its number, counted from 1) is not valid UTF-8, is blank, has no
            tab, or has an empty source or target.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} not found") from None
    except OSError as error:
        raise DataError(f"cannot read data file {path}: {error.strerror}") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    pairs = [
        _parse_tsv_line(path, number, line)
        for number, line in enumerate(lines, start=1)
    ]
    if not pairs:
        raise DataError(f"data file {path} is empty; it needs source<TAB>target lines")
    return pairs


def _parse_tsv_line(path: Path, number: int, line: bytes) -> Pair:
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}, line {number}: invalid UTF-8 at byte {error.start}; "
            "convert the file to UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{path}, line {number}: blank line; remove it")
    if "\t" not in text:
        raise DataError(
            f"{path}, line {number}: no tab; each line must be source<TAB>target"
        )
    source, target = (side.strip() for side in text.split("\t")[:2])
    if not source or not target:
        side = "source" if not source else "target"
        raise DataError(
            f"{path}, line {number}: empty {side}; every line needs text on both "
            "sides of the tab, so fill it in or remove the line"
        )
    return source, target


def split_pairs(
    pairs: list[Pair],
    seed: int,
    valid_fraction: float = 0.05,
    max_valid_sources: int = 1000,
) -> Split:
    """Hold out a validation split of whole source sentences.

    The distinct sources are shuffled by a generator seeded with ``seed``.
    The first ``round(valid_fraction * sources)`` of them (at least 1, at most
    ``max_valid_sources``) go to validation with all their targets. Both sides
    keep the pairs in file order.

    Raises:
        DataError: fewer than 2 distinct sources, so one side would be empty.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must lie in (0, 1), got {valid_fraction!r}")
    sources = list(dict.fromkeys(source for source, _ in pairs))
    if len(sources) < 2:
        raise DataError(
            f"the data has {len(sources)} distinct source sentence(s); at least 2 "
            "are needed to hold out a validation split"
        )
    count = round(valid_fraction * len(sources))
    count = min(max(count, 1), max_valid_sources, len(sources) - 1)
    order = np.random.default_rng(seed).permutation(len(sources))
    held_out = {sources[index] for index in order[:count]}
    return Split(
        train=[pair for pair in pairs if pair[0] not in held_out],
        valid=[pair for pair in pairs if pair[0] in held_out],
    )


def group_references(pairs: Iterable[Pair]) -> list[tuple[str, list[str]]]:
    """Collect every target of each source, sources in first-seen order."""
    groups: dict[str, list[str]] = {}
    for source, target in pairs:
        groups.setdefault(source, []).append(target)
    return list(groups.items())


def load_split(
    task: str,
    seed: int,
    data_path: str | os.PathLike | None = None,
    spec: SyntheticSpec | None = None,
) -> Split:
    """Build the split of any task: generated, or read from ``data_path``.

    Raises:
        ConfigError: unknown task, ``translate`` without ``data_path``, or a
            synthetic task with one.
        DataError: from ``read_tsv`` and ``split_pairs``.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "translate":
        if data_path is None:
            raise ConfigError("task translate needs --data FILE (source<TAB>target)")
        return split_pairs(read_tsv(data_path), seed)
    if data_path is not None:
        raise ConfigError(
            f"task {task} generates its own data; --data applies to translate only"
        )
    return make_synthetic_split(task, seed, spec)
