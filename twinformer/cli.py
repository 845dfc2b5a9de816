"""The ``twinformer`` command: train, evaluate, translate, merge, plot, parity.

Each subcommand imports a framework only when it runs one, so ``--help`` and
every ``--framework torch`` command run without importing JAX. Errors meant for
the user (``TwinformerError``) print ``error: <message>`` to stderr and exit
with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twinformer.config import PRESETS, LoraConfig, TrainConfig
from twinformer.errors import ConfigError, TwinformerError
from twinformer.tasks import TASKS

logger = logging.getLogger("twinformer")

FRAMEWORKS = ("torch", "jax")
# Defaults of `twinformer train`, chosen so that the small preset learns the
# reverse task to exact match >= 0.95 within minutes on a CPU. Measured with
# the torch twin on a 2-core Xeon: at 1500 steps seed 0 reached 0.977 with two
# threads but 0.938 with one, because the summation order differs. At 2000
# steps one thread reached 0.988 (seed 0, 99 s) and 0.996 (seed 1, 109 s).
# The JAX twin reached 0.992 at 1500 steps.
TRAIN_DEFAULTS: dict[str, Any] = dict(
    steps=2000,
    batch_size=64,
    warmup_steps=400,
    lr_scale=1.0,
    label_smoothing=0.1,
    clip_grad_norm=1.0,
    eval_every=250,
    eval_examples=256,
    seed=0,
)
EXIT_USER_ERROR = 2
# The shell's status for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--framework", choices=FRAMEWORKS, required=True, help="twin to train with")
    add("--task", choices=TASKS, required=True, help="what the model learns")
    add(
        "--data",
        type=Path,
        metavar="FILE",
        help="source<TAB>target file (translate only)",
    )
    add("--out", type=Path, required=True, metavar="DIR", help="run directory to write")
    add("--overwrite", action="store_true", help="replace a non-empty --out")
    add(
        "--init-from",
        type=Path,
        metavar="RUN_DIR",
        help="start from this run's weights, model config and tokenizer",
    )
    _add_loop_options(parser)
    _add_optimizer_options(parser)
    _add_model_options(parser)
    _add_lora_options(parser)


def _add_loop_options(parser: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    add = parser.add_argument
    add(
        "--steps",
        type=int,
        default=d["steps"],
        help=f"optimizer steps (default {d['steps']})",
    )
    add(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        help=f"sentence pairs per step (default {d['batch_size']})",
    )
    add(
        "--seed",
        type=int,
        default=d["seed"],
        help="seed of data generation, split, initialisation and dropout",
    )
    add(
        "--eval-every",
        type=int,
        default=d["eval_every"],
        help=f"steps between evaluations (default {d['eval_every']})",
    )
    add(
        "--eval-examples",
        type=int,
        default=d["eval_examples"],
        help="held-out sources decoded at each evaluation "
        f"(default {d['eval_examples']})",
    )
    add(
        "--vocab-size",
        type=int,
        default=8000,
        help="subword vocabulary size of translate, special tokens included "
        "(default 8000)",
    )


def _add_optimizer_options(parser: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    add = parser.add_argument
    add(
        "--warmup-steps",
        type=int,
        default=d["warmup_steps"],
        help=f"steps of linear learning-rate warmup (default {d['warmup_steps']})",
    )
    add(
        "--lr-scale",
        type=float,
        default=d["lr_scale"],
        help="factor on lr = model_dim^-0.5 * min(step^-0.5, step * warmup^-1.5) "
        f"(default {d['lr_scale']})",
    )
    add(
        "--label-smoothing",
        type=float,
        default=d["label_smoothing"],
        help="probability mass spread over the vocabulary "
        f"(default {d['label_smoothing']})",
    )
    add(
        "--clip-grad-norm",
        type=float,
        default=d["clip_grad_norm"],
        help="maximum global L2 norm of the gradients, 0 disables "
        f"(default {d['clip_grad_norm']})",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--preset",
        choices=sorted(PRESETS),
        help="model size (default small: 2+2 layers of width 64)",
    )
    add("--model-dim", type=int, help="width d_model of the residual stream")
    add("--num-layers", type=int, help="layers in the encoder and in the decoder")
    add("--num-heads", type=int, help="attention heads; must divide --model-dim")
    add("--ff-dim", type=int, help="inner width d_ff of the feed-forward network")
    add(
        "--dropout",
        type=float,
        help="dropout probability on sub-layer outputs and embeddings",
    )
    add(
        "--max-length",
        type=int,
        help="maximum sequence length in tokens, BOS or EOS included (default 256)",
    )
    add(
        "--attention",
        choices=("manual", "fused"),
        help="attention code path (default fused)",
    )
    add(
        "--norm-position",
        choices=("post", "pre"),
        help="LayerNorm after (post, as in the paper) or before each sub-layer",
    )


def _add_lora_options(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--lora-rank",
        type=int,
        help="train LoRA adapters of this rank r; the base weights stay frozen",
    )
    add(
        "--lora-alpha",
        type=float,
        help="adapter update scale alpha; the update is (alpha / r) B A x (default 16)",
    )
    add(
        "--lora-targets",
        help="comma-separated linear layers to adapt, or 'all' (default query,value)",
    )
    add(
        "--lora-dropout",
        type=float,
        help="dropout probability on the adapter input (default 0)",
    )
    add(
        "--rslora",
        action="store_true",
        help="scale the update by alpha / sqrt(r) instead of alpha / r",
    )


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    """Collect ModelConfig fields: the preset, then explicit options over it.

    With --init-from and no --preset only the explicit options are returned,
    so that the base run's config fills the rest.
    """
    preset = args.preset or (None if args.init_from else "small")
    options: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    explicit = {
        "model_dim": args.model_dim,
        "num_encoder_layers": args.num_layers,
        "num_decoder_layers": args.num_layers,
        "num_heads": args.num_heads,
        "ff_dim": args.ff_dim,
        "dropout": args.dropout,
        "embedding_dropout": args.dropout,
        "max_length": args.max_length,
        "attention": args.attention,
        "norm_position": args.norm_position,
    }
    options.update({k: v for k, v in explicit.items() if v is not None})
    return options


def _lora_config(args: argparse.Namespace) -> LoraConfig | None:
    if args.lora_rank is None:
        given = [
            option
            for option, value in (
                ("--lora-alpha", args.lora_alpha),
                ("--lora-targets", args.lora_targets),
                ("--lora-dropout", args.lora_dropout),
                ("--rslora", args.rslora or None),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{', '.join(given)} given without --lora-rank; add --lora-rank R "
                "to train LoRA adapters, or drop these options to train every "
                "parameter"
            )
        return None
    if args.lora_rank < 1:
        raise ConfigError(
            f"--lora-rank must be a positive integer, got {args.lora_rank}"
        )
    defaults = LoraConfig()
    targets = args.lora_targets
    if targets is None:
        targets = ",".join(defaults.targets)
    if not targets.strip(" ,"):
        raise ConfigError(
            "--lora-targets is empty; give comma-separated names such as "
            "query,value, or 'all'"
        )
    return LoraConfig(
        rank=args.lora_rank,
        alpha=defaults.alpha if args.lora_alpha is None else args.lora_alpha,
        targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        dropout=defaults.dropout if args.lora_dropout is None else args.lora_dropout,
        use_rslora=args.rslora,
    )


def _command_train(args: argparse.Namespace) -> None:
    from twinformer.training import TrainRequest, format_scores, train_run

    train_config = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        lr_scale=args.lr_scale,
        label_smoothing=args.label_smoothing,
        clip_grad_norm=args.clip_grad_norm,
        eval_every=args.eval_every,
        eval_examples=args.eval_examples,
        seed=args.seed,
    )
    request = TrainRequest(
        framework=args.framework,
        task=args.task,
        out=args.out,
        train_config=train_config,
        model_options=_model_options(args),
        lora_config=_lora_config(args),
        data_path=args.data,
        init_from=args.init_from,
        overwrite=args.overwrite,
        vocab_size=args.vocab_size,
    )
    summary = train_run(request)
    print(format_scores(summary))


def _check_output_file(path: Path | None, option: str) -> None:
    """Fail before any work when ``path`` cannot be written as a file."""
    if path is None:
        return
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise ConfigError(
            f"{option} {path}: folder {path.parent} does not exist; create it first"
        )


def _command_evaluate(args: argparse.Namespace) -> None:
    _check_output_file(args.json and Path(args.json), "--json")
    from twinformer.checkpoint import atomic_write_text
    from twinformer.tasks import read_tsv
    from twinformer.training import (
        evaluate_pairs,
        format_scores,
        load_model,
        read_pairs_tsv,
    )

    model = load_model(args.run_dir, args.framework)
    if args.data is not None:
        pairs = read_tsv(args.data)
    else:
        pairs = read_pairs_tsv(model.run.valid_path)
    _check_beam_size(args.beam_size)
    scores = evaluate_pairs(
        model.runner, model.tokenizer, pairs, model.task, beam_size=args.beam_size
    )
    print(format_scores(scores))
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(scores, indent=2) + "\n")


def _check_beam_size(beam_size: int) -> None:
    if beam_size < 1:
        raise ConfigError(f"--beam-size must be at least 1, got {beam_size}")


def _read_inputs(texts: list[str]) -> list[str]:
    if texts == ["-"]:
        texts = [line.rstrip("\r\n") for line in sys.stdin]
    elif "-" in texts:
        raise ConfigError(
            "- (read standard input) must be the only TEXT argument; give either "
            "texts or -"
        )
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise ConfigError(
                f"input {number} is empty; give a non-empty text to translate"
            )
    if not texts:
        raise ConfigError("no input to translate; give TEXT arguments or - for stdin")
    return texts


def _command_translate(args: argparse.Namespace) -> None:
    from twinformer.data import encode_sources
    from twinformer.training import decode_ids, load_model

    texts = _read_inputs(args.text)
    _check_beam_size(args.beam_size)
    model = load_model(args.run_dir, args.framework)
    limit = model.runner.model_config.max_length - 1
    if args.max_length is not None and not 1 <= args.max_length <= limit:
        raise ConfigError(
            f"--max-length must lie in [1, {limit}] for this model, "
            f"got {args.max_length}"
        )
    max_length = model.runner.model_config.max_length
    sources = encode_sources(texts, model.tokenizer, max_length)
    for number, ids in enumerate(sources, start=1):
        if model.tokenizer.count_unknown(ids):
            logger.warning(
                "input %d has text outside the tokenizer's vocabulary; it encodes "
                "to <unk>",
                number,
            )
    decoded = decode_ids(model.runner, sources, args.beam_size, args.max_length)
    for text in model.tokenizer.decode_batch(decoded):
        print(text)


def _command_merge(args: argparse.Namespace) -> None:
    from twinformer.training import merge_run

    merge_run(args.run_dir, args.out, args.framework, args.overwrite)


def _command_plot(args: argparse.Namespace) -> None:
    _check_output_file(Path(args.out), "--out")
    from twinformer.plotting import plot_runs

    plot_runs(args.run_dirs, args.out)
    logger.info("wrote %s", args.out)


def _command_parity(args: argparse.Namespace) -> int | None:
    from parity.report import main as parity_main

    passed = list(args.parity_args)
    if passed[:1] == ["--"]:
        passed = passed[1:]  # the separator that main inserts
    return parity_main(passed)


def _add_run_commands(commands: Any) -> None:
    framework_help = "twin to run (default: the one that trained the run)"
    evaluate = commands.add_parser(
        "evaluate", help="score a run on its held-out split or on a TSV file"
    )
    evaluate.add_argument("run_dir", type=Path, help="run directory")
    evaluate.add_argument(
        "--data", type=Path, metavar="FILE", help="source<TAB>target file"
    )
    evaluate.add_argument("--json", type=Path, help="also write the scores here")
    evaluate.add_argument("--framework", choices=FRAMEWORKS, help=framework_help)
    evaluate.add_argument(
        "--beam-size", type=int, default=1, help="beams; 1 decodes greedily"
    )
    evaluate.set_defaults(handler=_command_evaluate)

    translate = commands.add_parser("translate", help="decode texts with a run")
    translate.add_argument("run_dir", type=Path, help="run directory")
    translate.add_argument("text", nargs="+", help="texts to translate; - for stdin")
    translate.add_argument("--framework", choices=FRAMEWORKS, help=framework_help)
    translate.add_argument(
        "--beam-size", type=int, default=1, help="beams; 1 decodes greedily"
    )
    translate.add_argument(
        "--max-length",
        type=int,
        help="maximum tokens to generate per text, EOS included "
        "(default: twice the input plus 10)",
    )
    translate.set_defaults(handler=_command_translate)

    merge = commands.add_parser(
        "merge", help="write a copy of a LoRA run with the adapter merged in"
    )
    merge.add_argument("run_dir", type=Path, help="LoRA run directory")
    merge.add_argument("--out", type=Path, required=True, help="directory to write")
    merge.add_argument("--overwrite", action="store_true", help="replace --out")
    merge.add_argument("--framework", choices=FRAMEWORKS, help=framework_help)
    merge.set_defaults(handler=_command_merge)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``twinformer`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="twinformer",
        description="The Transformer and LoRA in PyTorch and JAX, one model twice.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a model into a run directory")
    _add_train_options(train)
    train.set_defaults(handler=_command_train)
    _add_run_commands(commands)

    plot = commands.add_parser("plot", help="draw the loss curves of runs")
    plot.add_argument("run_dirs", nargs="+", type=Path, help="run directories")
    plot.add_argument("--out", type=Path, required=True, help="image file (.png)")
    plot.set_defaults(handler=_command_plot)

    parity = commands.add_parser(
        "parity",
        help="compare the twins (options: --dtype float64|float32|all, "
        "--lora-rank R, --json FILE)",
        add_help=False,
    )
    parity.add_argument("parity_args", nargs=argparse.REMAINDER)
    parity.set_defaults(handler=_command_parity)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``twinformer`` command; return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["parity"]:
        # Passed through untouched: argparse would reject parity's own options.
        argv = ["parity", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    # Other libraries (JAX logs its backend search at INFO) stay at WARNING.
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr
    )
    logger.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        status = args.handler(args)
    except TwinformerError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        # A path the user gave cannot be written or read (a missing folder,
        # a file where a folder is expected, no permission).
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {where}{error.strerror or error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; no unfinished output was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
