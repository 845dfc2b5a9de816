"""Training speed: target tokens per second of full optimizer steps.

A step is forward, label-smoothed loss, backward and Adam update with the
warmup schedule, on one fixed random batch. Three candidates run side by side
in one process, taking turns repeat by repeat:

    torch twin       ``torch_impl.runner.Runner.train_step``, fused attention
    nn.Transformer   ``torch.nn.Transformer`` of the same sizes between the
                     twin's embeddings (shared, times sqrt(d_model), plus
                     sinusoidal positions) and the tied output projection,
                     with the twin's loss, Adam and schedule
    jax twin         ``jax_impl.runner.Runner.train_step``, the jitted step

Tokens are the non-padding labels of the batch. The JAX compile time is the
first step's time minus the median step time, and it is reported apart.

Run from the repository root: ``python -m benchmarks.train_speed --help``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    time_once,
    write_json,
)
from twinformer.config import PAD_ID, ModelConfig, TrainConfig
from twinformer.data import Batch
from twinformer.errors import TwinformerError
from twinformer.host_memory import keep_freed_memory

TWIN, REFERENCE, JAX = "torch twin", "nn.Transformer", "jax twin"


class ReferenceModel(nn.Module):
    """``torch.nn.Transformer`` between the twin's embeddings and tied output.

    Only the encoder and decoder stacks differ from the torch twin.
    ``nn.Transformer`` always adds a final LayerNorm to each stack, so it runs
    two LayerNorms more per step than the post-LN twin.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Imported here so that this module does not depend on the twin's
        # internals at import time; Embeddings is its public layer class.
        from torch_impl.layers import Embeddings

        self.embedding = Embeddings(config.target_vocab_size, config)
        nn.init.normal_(self.embedding.weight, std=config.model_dim**-0.5)
        self.transformer = nn.Transformer(
            d_model=config.model_dim,
            nhead=config.num_heads,
            num_encoder_layers=config.num_encoder_layers,
            num_decoder_layers=config.num_decoder_layers,
            dim_feedforward=config.ff_dim,
            dropout=config.dropout,
            layer_norm_eps=config.layer_norm_eps,
            batch_first=True,
            norm_first=config.norm_position == "pre",
        )

    def forward(self, source_ids: Tensor, target_input_ids: Tensor) -> Tensor:
        """Return logits (B, T, V) for (B, S) source and (B, T) decoder input ids."""
        # nn.Transformer masks are the opposite of the twins': True = masked.
        source_padding = source_ids == PAD_ID
        length = target_input_ids.shape[1]
        future = torch.ones(length, length, dtype=torch.bool).triu(1)  # (T, T)
        x = self.transformer(
            self.embedding(source_ids),
            self.embedding(target_input_ids),
            tgt_mask=future,
            src_key_padding_mask=source_padding,
            tgt_key_padding_mask=target_input_ids == PAD_ID,
            memory_key_padding_mask=source_padding,
        )
        return F.linear(x, self.embedding.weight)


def reference_step(
    config: ModelConfig, train_config: TrainConfig
) -> Callable[[Batch], float]:
    """Build a ``ReferenceModel`` train step that mirrors the twin Runner's."""
    from torch_impl.loss import label_smoothed_cross_entropy
    from torch_impl.optim import make_optimizer

    torch.manual_seed(train_config.seed)
    model = ReferenceModel(config)
    optimizer, scheduler = make_optimizer(
        model.parameters(), train_config, config.model_dim
    )

    def step(batch: Batch) -> float:
        model.train()
        source, target_input, labels = (
            torch.from_numpy(np.asarray(ids, dtype=np.int64))
            for ids in (
                batch.source_ids,
                batch.target_input_ids,
                batch.target_output_ids,
            )
        )
        logits = model(source, target_input)
        loss = label_smoothed_cross_entropy(
            logits, labels, train_config.label_smoothing
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss.item()

    return step


def build_steps(size: Size, seed: int) -> dict[str, Callable[[Batch], float]]:
    """Build the three candidates' train steps for one size, same seed."""
    from jax_impl.runner import Runner as JaxRunner
    from torch_impl.runner import Runner as TorchRunner

    config = size.model_config(attention="fused")
    train_config = TrainConfig(batch_size=size.batch_size, seed=seed)
    return {
        TWIN: TorchRunner(config, train_config).train_step,
        REFERENCE: reference_step(config, train_config),
        JAX: JaxRunner(config, train_config).train_step,
    }


def measure_size(size: Size, args: argparse.Namespace) -> dict[str, Any]:
    """Time every candidate on one size and return its record."""
    batch = random_batch(size, np.random.default_rng(args.seed))
    tokens = int(np.sum(batch.target_output_ids != PAD_ID))
    steps = build_steps(size, args.seed)

    # The first call of each step includes one-off work: JAX traces and
    # compiles, torch allocates. It is timed here and not part of the median.
    first = {
        name: time_once(lambda step=step: step(batch)) for name, step in steps.items()
    }

    def repeat(step: Callable[[Batch], float]) -> Callable[[], None]:
        return lambda: [step(batch) for _ in range(args.steps)]

    workloads = {name: repeat(step) for name, step in steps.items()}
    timings = time_interleaved(workloads, args.repeats, warmup=args.warmup)

    candidates = {}
    for name in steps:
        step_s = timings.median(name) / args.steps
        candidates[name] = {
            "median_step_s": step_s,
            "tokens_per_s": tokens / step_s,
            "repeat_tokens_per_s": [
                tokens * args.steps / s for s in timings.seconds[name]
            ],
            "first_step_s": first[name],
        }
    candidates[JAX]["compile_s"] = first[JAX] - candidates[JAX]["median_step_s"]
    ratios = {
        "twin_over_nn_transformer": candidates[TWIN]["tokens_per_s"]
        / candidates[REFERENCE]["tokens_per_s"],
        "jax_over_torch_twin": candidates[JAX]["tokens_per_s"]
        / candidates[TWIN]["tokens_per_s"],
    }
    return {
        "size": asdict(size),
        "tokens_per_step": tokens,
        "candidates": candidates,
        "ratios": ratios,
    }


def print_size(size: Size, record: dict[str, Any]) -> None:
    print(f"\n{size.describe()}; {record['tokens_per_step']} target tokens per step")
    print_candidates(record["candidates"], "median_step_s", "step ms")
    ratios = record["ratios"]
    print(
        f"ratios: twin/nn.Transformer {ratios['twin_over_nn_transformer']:.2f} "
        f"(target >= 1.0), jax/torch twin {ratios['jax_over_torch_twin']:.2f} "
        "(target >= 1.0)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_speed",
        description="Training tokens per second: torch twin, torch.nn.Transformer "
        "and the JAX twin, side by side.",
    )
    add_common_arguments(parser, repeats=5)
    parser.add_argument(
        "--steps", type=int, default=5, help="optimizer steps per timed repeat"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed repeats before timing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print its tables and return the record."""
    args = parse_args(argv)
    sizes = selected_sizes(args)
    threads = limit_cores(args.threads)
    # Before JAX creates its CPU backend, like limit_cores.
    freed_memory_kept = not args.default_malloc and keep_freed_memory()
    torch.set_num_threads(threads)
    info = machine_info(threads, "benchmarks.train_speed", freed_memory_kept)
    print_machine(info)
    print(
        f"timing: median of {args.repeats} repeats of {args.steps} steps each, "
        f"after {args.warmup} untimed"
    )

    results = []
    for size in sizes:
        record = measure_size(size, args)
        print_size(size, record)
        results.append(record)
    output = {
        "benchmark": "train_speed",
        "machine": info,
        "settings": {
            "steps": args.steps,
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
