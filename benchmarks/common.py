"""Sizes, random batches, timing loop and reporting shared by the benchmarks.

Every benchmark runs its candidates in one process, interleaved repeat by
repeat, so that load from other processes on the machine falls on all of them
alike. The ratios of medians measured this way are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

import numpy as np

from twinformer.config import PRESETS, ModelConfig
from twinformer.data import Batch, make_batch
from twinformer.errors import ConfigError


@dataclass(frozen=True)
class Size:
    """One benchmark size: model shape, vocabulary, batch and sequence lengths."""

    name: str
    model_dim: int
    num_heads: int
    ff_dim: int
    num_layers: int
    vocab_size: int
    batch_size: int
    # Padded lengths: source ids, and decoder input ids ([BOS] + target).
    source_length: int
    target_length: int
    dropout: float = 0.1

    def model_config(
        self, attention: str = "fused", max_length: int = 256
    ) -> ModelConfig:
        """Build the twins' config: shared embeddings, tied output, post-LN."""
        return ModelConfig(
            source_vocab_size=self.vocab_size,
            target_vocab_size=self.vocab_size,
            model_dim=self.model_dim,
            num_heads=self.num_heads,
            ff_dim=self.ff_dim,
            num_encoder_layers=self.num_layers,
            num_decoder_layers=self.num_layers,
            max_length=max(max_length, self.source_length, self.target_length),
            dropout=self.dropout,
            embedding_dropout=self.dropout,
            attention=attention,
        )

    def describe(self) -> str:
        return (
            f"{self.name}: D={self.model_dim} H={self.num_heads} F={self.ff_dim} "
            f"layers={self.num_layers}+{self.num_layers} V={self.vocab_size} "
            f"B={self.batch_size} S={self.source_length} T={self.target_length} "
            f"dropout={self.dropout}"
        )


_SMALL = PRESETS["small"]
# "small" is the command line's default model on the synthetic tasks: 10
# symbols plus 4 special tokens, sequences of up to 9 symbols plus BOS or EOS,
# and the command line's default batch of 64 pairs.
SIZES: dict[str, Size] = {
    "small": Size(
        name="small",
        model_dim=_SMALL["model_dim"],
        num_heads=_SMALL["num_heads"],
        ff_dim=_SMALL["ff_dim"],
        num_layers=_SMALL["num_encoder_layers"],
        vocab_size=14,
        batch_size=64,
        source_length=10,
        target_length=10,
        dropout=_SMALL["dropout"],
    ),
    "mid": Size(
        name="mid",
        model_dim=256,
        num_heads=4,
        ff_dim=1024,
        num_layers=4,
        vocab_size=1000,
        batch_size=32,
        source_length=32,
        target_length=32,
    ),
}

# Options that replace one field of every selected size.
SIZE_OPTIONS = (
    ("model_dim", int, "d_model"),
    ("num_heads", int, "attention heads"),
    ("ff_dim", int, "feed-forward inner width"),
    ("num_layers", int, "layers in each of the encoder and decoder"),
    ("vocab_size", int, "shared source and target vocabulary, 4 special ids included"),
    ("batch_size", int, "sequence pairs per batch"),
    ("source_length", int, "padded source length in tokens"),
    ("target_length", int, "padded decoder input length in tokens, BOS included"),
    ("dropout", float, "dropout on sub-layer outputs and embeddings"),
)


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """Add the size, repeat, thread and output options both scripts share."""
    parser.add_argument(
        "--sizes",
        default="small,mid",
        help=f"comma-separated sizes among {', '.join(SIZES)} (default small,mid)",
    )
    for name, kind, meaning in SIZE_OPTIONS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=kind,
            default=None,
            help=f"override the {meaning} of every selected size",
        )
    parser.add_argument(
        "--repeats",
        type=int,
        default=repeats,
        help=f"timed repeats per candidate; the median is reported (default {repeats})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU cores for torch and JAX alike; the process is pinned to the "
        "first THREADS cores it may use (default: all of them)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc settings alone; by default the script first "
        "calls twinformer.host_memory.keep_freed_memory, as the command line "
        "does before a JAX training run with a large step",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--json", default=None, help="also write the record to FILE")


def selected_sizes(args: argparse.Namespace) -> list[Size]:
    """Return the sizes named by ``--sizes`` with the override options applied.

    Raises:
        ConfigError: an unknown size name or a non-positive override.
    """
    names = [name for name in args.sizes.split(",") if name]
    unknown = [name for name in names if name not in SIZES]
    if unknown or not names:
        raise ConfigError(
            f"unknown --sizes {unknown or args.sizes!r}; choose from {sorted(SIZES)}"
        )
    overrides = {}
    for name, _, _ in SIZE_OPTIONS:
        value = getattr(args, name)
        if value is None:
            continue
        if value <= 0 and name != "dropout":
            raise ConfigError(
                f"--{name.replace('_', '-')} must be positive, got {value}"
            )
        overrides[name] = value
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1, got {args.repeats}")
    return [replace(SIZES[name], **overrides) for name in names]


def limit_cores(threads: int | None) -> int:
    """Pin this process to its first ``threads`` allowed cores; return the count.

    Call before JAX creates its CPU backend, because the backend sizes its
    thread pool once, when it is created. The scripts set torch to the same
    count with ``torch.set_num_threads``.

    NOTE: that XLA's CPU thread pool follows the process's core affinity is
    assumed here, not checked.

    Raises:
        ConfigError: ``threads`` below 1 or above the allowed cores.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if threads is None:
        return len(allowed)
    if not 1 <= threads <= len(allowed):
        raise ConfigError(
            f"--threads must lie in [1, {len(allowed)}] (the cores this process "
            f"may use), got {threads}"
        )
    os.sched_setaffinity(0, allowed[:threads])
    return threads


def random_batch(size: Size, rng: np.random.Generator) -> Batch:
    """Draw a padded batch of random pairs, ids in [4, V).

    Row lengths are uniform in [3/4 of the padded length, the padded length],
    and row 0 has the full length, so the batch always has shape (B, S) and
    (B, T) and about an eighth of it is padding.
    """
    sources, targets = [], []
    for row in range(size.batch_size):
        source_length = _row_length(rng, size.source_length, row)
        target_length = _row_length(rng, size.target_length, row) - 1
        sources.append(rng.integers(4, size.vocab_size, source_length))
        targets.append(rng.integers(4, size.vocab_size, target_length))
    return make_batch(sources, targets)


def _row_length(rng: np.random.Generator, padded: int, row: int) -> int:
    if row == 0:
        return padded
    return int(rng.integers(math.ceil(0.75 * padded), padded + 1))


@dataclass
class Timings:
    """Seconds of each timed repeat, per candidate, in the order run."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def time_once(work: Callable[[], Any]) -> float:
    """Return the wall-clock seconds of one call of ``work``."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def time_interleaved(
    workloads: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> Timings:
    """Time each workload ``repeats`` times, candidates taking turns.

    Each workload first runs ``warmup`` times untimed. Repeat r runs every
    candidate once before repeat r + 1 starts, so a burst of load from other
    processes lands on neighbouring measurements of all candidates.
    """
    for work in workloads.values():
        for _ in range(warmup):
            work()
    timings = Timings({name: [] for name in workloads})
    for _ in range(repeats):
        for name, work in workloads.items():
            timings.seconds[name].append(time_once(work))
    return timings


def machine_info(threads: int, module: str, freed_memory_kept: bool) -> dict[str, Any]:
    """Describe the CPU, the library versions and the command line of ``module``."""
    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "threads": threads,
        "keep_freed_memory": freed_memory_kept,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in ("torch", "jax", "numpy")},
        "command": " ".join(["python -m", module, *sys.argv[1:]]),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def print_machine(info: dict[str, Any]) -> None:
    versions = " ".join(f"{k} {v}" for k, v in info["versions"].items())
    print(f"machine: {info['cpu']}, {info['logical_cores']} logical cores")
    print(f"threads: {info['threads']} for torch and JAX; load {info['load_average']}")
    print(f"malloc: keep_freed_memory {'on' if info['keep_freed_memory'] else 'off'}")
    print(f"versions: python {info['python']} {versions}")
    print(f"command: {info['command']}")


def print_candidates(
    candidates: dict[str, Any], time_key: str, time_label: str
) -> None:
    """Print one row per candidate: median time in ms, tokens/s, spread, compile s."""
    rows = []
    for name, result in candidates.items():
        spread = result["repeat_tokens_per_s"]
        compile_s = result.get("compile_s")
        rows.append(
            (
                name,
                result[time_key] * 1e3,
                result["tokens_per_s"],
                f"{min(spread):,.0f}-{max(spread):,.0f}",
                "-" if compile_s is None else f"{compile_s:.2f}",
            )
        )
    headers = ("candidate", time_label, "tokens/s", "repeat range", "compile s")
    print_table(headers, rows)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print rows as left-aligned text columns under a header line."""
    cells = [[str(c) for c in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_json(path: str, record: dict[str, Any]) -> None:
    """Write the record as indented JSON to ``path``."""
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
        handle.write("\n")
