"""Decoding speed: greedy tokens per second with and without the key/value cache.

Both twins decode the same random source batch with ``greedy_search``, once
with ``use_cache=True`` and once with ``use_cache=False``. The four candidates
run side by side in one process, taking turns repeat by repeat.

Every row must run the full ``--new-tokens`` steps, but greedy search stops
once every row has produced EOS. The models are freshly initialised, and
their EOS embedding row is set to zero. With tied output weights the EOS
logit is then exactly 0, while the largest of the other V - 1 logits is
positive for all but a vanishing fraction of decoder states. The script
checks that every row produced ``--new-tokens`` ids without EOS and raises
otherwise, so the figures are always for fixed-length decoding.

The JAX loop's compile time is the first call's time minus the median call
time, reported apart. Tokens per second count B * new tokens per call.

Run from the repository root: ``python -m benchmarks.decode_speed --help``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    Size,
    add_common_arguments,
    limit_cores,
    machine_info,
    print_candidates,
    print_machine,
    random_batch,
    selected_sizes,
    time_interleaved,
    write_json,
)
from twinformer.config import EOS_ID, ModelConfig
from twinformer.errors import TwinformerError
from twinformer.host_memory import keep_freed_memory

TORCH, JAX = "torch twin", "jax twin"


def torch_decoders(
    config: ModelConfig, source_ids: np.ndarray, new_tokens: int, seed: int
) -> dict[str, Callable[[], np.ndarray]]:
    """Build the torch twin's greedy search with and without the cache."""
    from torch_impl.decode import greedy_search
    from torch_impl.model import Transformer

    model = Transformer(config, generator=torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        model.target_embedding.weight[EOS_ID] = 0.0
    source = torch.from_numpy(source_ids.astype(np.int64))

    def decoder(use_cache: bool) -> Callable[[], np.ndarray]:
        return lambda: greedy_search(model, source, new_tokens, use_cache).numpy()

    return {f"{TORCH}, cache": decoder(True), f"{TORCH}, no cache": decoder(False)}


def jax_decoders(
    config: ModelConfig, source_ids: np.ndarray, new_tokens: int, seed: int
) -> dict[str, Callable[[], np.ndarray]]:
    """Build the JAX twin's compiled greedy search with and without the cache."""
    import jax

    from jax_impl.decode import greedy_search
    from jax_impl.model import init_params

    params = init_params(config, jax.random.key(seed))
    embedding = params["target_embedding"]["embedding"]
    params["target_embedding"]["embedding"] = embedding.at[EOS_ID].set(0.0)

    def decoder(use_cache: bool) -> Callable[[], np.ndarray]:
        return lambda: np.asarray(
            greedy_search(
                params, source_ids, new_tokens, config=config, use_cache=use_cache
            )
        )

    return {f"{JAX}, cache": decoder(True), f"{JAX}, no cache": decoder(False)}


def check_full_length(name: str, ids: np.ndarray, batch: int, new_tokens: int) -> None:
    """Raise TwinformerError unless ``ids`` is (batch, new_tokens) without EOS."""
    if ids.shape != (batch, new_tokens) or np.any(ids == EOS_ID):
        raise TwinformerError(
            f"{name} stopped early: output shape {ids.shape}, expected "
            f"{(batch, new_tokens)} with no EOS; the random model produced EOS, "
            "so rerun with another --seed"
        )


def measure_size(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """Time the four decoders on one size and return its record."""
    config = size.model_config(max_length=args.new_tokens + 1)
    source_ids = random_batch(size, np.random.default_rng(args.seed)).source_ids
    decoders = {
        **torch_decoders(config, source_ids, args.new_tokens, args.seed),
        **jax_decoders(config, source_ids, args.new_tokens, args.seed),
    }

    # The first call includes JAX's trace and compile; it also checks length.
    first = {}
    for name, decoder in decoders.items():
        start = time.perf_counter()
        ids = decoder()
        first[name] = time.perf_counter() - start
        check_full_length(name, ids, size.batch_size, args.new_tokens)
    timings = time_interleaved(decoders, args.repeats, warmup=args.warmup)

    tokens = size.batch_size * args.new_tokens
    candidates = {}
    for name in decoders:
        call_s = timings.median(name)
        candidates[name] = {
            "median_call_s": call_s,
            "tokens_per_s": tokens / call_s,
            "repeat_tokens_per_s": [tokens / s for s in timings.seconds[name]],
            "first_call_s": first[name],
        }
    for name in (f"{JAX}, cache", f"{JAX}, no cache"):
        result = candidates[name]
        result["compile_s"] = result["first_call_s"] - result["median_call_s"]
    return {
        "size": asdict(size),
        "new_tokens": args.new_tokens,
        "tokens_per_call": tokens,
        "candidates": candidates,
        "ratios": _ratios(candidates),
    }


def _ratios(candidates: dict[str, dict[str, Any]]) -> dict[str, float]:
    def rate(name: str) -> float:
        return candidates[name]["tokens_per_s"]

    return {
        "torch_cache_speedup": rate(f"{TORCH}, cache") / rate(f"{TORCH}, no cache"),
        "jax_cache_speedup": rate(f"{JAX}, cache") / rate(f"{JAX}, no cache"),
        "jax_over_torch_cache": rate(f"{JAX}, cache") / rate(f"{TORCH}, cache"),
    }


def print_size(size: Size, record: dict[str, Any]) -> None:
    print(
        f"\n{size.describe()}; {record['new_tokens']} new tokens per row, "
        f"{record['tokens_per_call']} per call"
    )
    print_candidates(record["candidates"], "median_call_s", "call ms")
    ratios = record["ratios"]
    print(
        f"ratios: cache/no cache torch {ratios['torch_cache_speedup']:.2f}, "
        f"jax {ratios['jax_cache_speedup']:.2f} (target >= 4.0); "
        f"jax/torch with cache {ratios['jax_over_torch_cache']:.2f}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.decode_speed",
        description="Greedy decoding tokens per second with and without the "
        "key/value cache, in both twins, side by side.",
    )
    add_common_arguments(parser, repeats=5)
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=64,
        help="tokens generated per row, every call (default 64)",
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed calls before timing"
    )
    args = parser.parse_args(argv)
    if args.new_tokens < 1:
        parser.error(f"--new-tokens must be positive, got {args.new_tokens}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the record."""
    args = parse_args(argv)
    # Decoding uses 16 rows unless --batch-size sets another count.
    sizes = [
        size if args.batch_size else replace(size, batch_size=16)
        for size in selected_sizes(args)
    ]
    threads = limit_cores(args.threads)
    # Before JAX creates its CPU backend, like limit_cores.
    freed_memory_kept = not args.default_malloc and keep_freed_memory()
    torch.set_num_threads(threads)
    info = machine_info(threads, "benchmarks.decode_speed", freed_memory_kept)
    print_machine(info)
    print(f"timing: median of {args.repeats} calls after {args.warmup} untimed")

    results = []
    for size in sizes:
        record = measure_size(size, args)
        print_size(size, record)
        results.append(record)
    output = {
        "benchmark": "decode_speed",
        "machine": info,
        "settings": {
            "new_tokens": args.new_tokens,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
        },
        "results": results,
    }
    if args.json:
        write_json(args.json, output)
    return output


if __name__ == "__main__":
    try:
        main()
    except TwinformerError as error:
        raise SystemExit(f"error: {error}") from None
