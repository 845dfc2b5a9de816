"""The training loop and evaluation, driving a twin's ``Runner``.

Nothing here imports a framework at module level: ``load_runner_class`` imports
``torch_impl`` or ``jax_impl`` when a run requests it. The loop takes one
optimizer step per batch, and every ``eval_every`` steps (and after the last
step) it measures the validation loss, decodes ``eval_examples`` held-out
sources greedily, scores them with ``twinformer.metrics``, appends one line to
``metrics.jsonl`` and logs one line.

A run is built in ``<out>.incomplete`` through ``twinformer.checkpoint`` and
renamed to ``<out>`` at the end; after a failure the staging directory is
removed, so ``<out>`` is either absent, the old run, or the complete new run.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from twinformer import checkpoint
from twinformer.config import PRESETS, LoraConfig, ModelConfig, TrainConfig
from twinformer.data import (
    EncodedPairs,
    encode_pairs,
    encode_sources,
    ordered_batches,
    pad_sequences,
    shuffled_batches,
)
from twinformer.errors import CheckpointError, ConfigError, DataError
from twinformer.host_memory import (
    REUSED_BY_DEFAULT,
    keep_freed_memory,
    training_buffer_estimate,
)
from twinformer.metrics import bleu, chrf, exact_match, token_accuracy
from twinformer.runner import Runner
from twinformer.tasks import (
    SYNTHETIC_TASKS,
    Pair,
    Split,
    group_references,
    load_split,
    read_tsv,
    synthetic_symbols,
)
from twinformer.tokenization import Tokenizer

logger = logging.getLogger(__name__)

FRAMEWORKS = ("torch", "jax")
# Model fields that change the shape of a weight: a run started from another
# run's weights must keep them.
SIZE_FIELDS = (
    "model_dim",
    "num_heads",
    "ff_dim",
    "num_encoder_layers",
    "num_decoder_layers",
    "max_length",
    "norm_position",
    "share_embeddings",
    "tie_output",
    "source_vocab_size",
    "target_vocab_size",
)
# Subword vocabulary of ``translate``, special tokens included.
DEFAULT_VOCAB_SIZE = 8000
# Sentences per batch when scoring and decoding held-out data.
EVAL_BATCH_SIZE = 64


def load_runner_class(framework: str) -> type[Runner]:
    """Import the ``Runner`` of one twin; only that framework gets imported.

    Raises:
        ConfigError: ``framework`` is not "torch" or "jax".
    """
    if framework == "torch":
        from torch_impl.runner import Runner as TorchRunner

        return TorchRunner
    if framework == "jax":
        from jax_impl.runner import Runner as JaxRunner

        return JaxRunner
    raise ConfigError(
        f"unknown framework {framework!r}; choose one of {', '.join(FRAMEWORKS)}"
    )


# --- Decoding and scoring ---------------------------------------------------


def _max_new_tokens(source_length: int, max_length: int) -> int:
    # NOTE: a heuristic bound, twice the source plus 10 tokens, keeps an
    # untrained model that never emits EOS from decoding max_length tokens at
    # every evaluation. A reference longer than that bound cannot be matched.
    return max(1, min(max_length - 1, 2 * source_length + 10))


def decode_ids(
    runner: Runner,
    sources: Sequence[np.ndarray],
    beam_size: int = 1,
    max_new_tokens: int | None = None,
) -> list[np.ndarray]:
    """Decode source id sequences in batches, greedily or with beam search.

    Args:
        runner: the model.
        sources: token ids per source, without BOS or EOS.
        beam_size: 1 for greedy search, more for beam search (best hypothesis).
        max_new_tokens: decoding limit per sequence; by default twice the
            longest source of the batch plus 10, at most ``max_length - 1``.

    Returns:
        Decoded ids per source, up to and including EOS, PAD after it.
    """
    if beam_size < 1:
        raise ConfigError(f"beam size must be at least 1, got {beam_size}")
    max_length = runner.model_config.max_length
    decoded: list[np.ndarray] = []
    for start in range(0, len(sources), EVAL_BATCH_SIZE):
        source_ids = pad_sequences(sources[start : start + EVAL_BATCH_SIZE])
        limit = max_new_tokens or _max_new_tokens(source_ids.shape[1], max_length)
        if beam_size == 1:
            ids = runner.greedy_search(source_ids, limit)
        else:
            ids = runner.beam_search(source_ids, limit, beam_size)[0][:, 0, :]
        decoded.extend(np.asarray(ids))
    return decoded


def validation_loss(runner: Runner, pairs: EncodedPairs) -> float:
    """Return the mean per-token loss of ``pairs``, without dropout."""
    total, count = 0.0, 0
    for batch in ordered_batches(pairs, EVAL_BATCH_SIZE):
        batch_total, batch_count = runner.evaluate_loss(batch)
        total += batch_total
        count += batch_count
    return total / max(count, 1)


def score_decoding(
    runner: Runner,
    tokenizer: Tokenizer,
    groups: Sequence[tuple[str, list[str]]],
    translation: bool,
    beam_size: int = 1,
) -> dict[str, float]:
    """Decode each source of ``groups`` and score it against its references.

    Returns:
        token_accuracy and exact_match, plus bleu and chrf when
        ``translation`` is set.
    """
    max_length = runner.model_config.max_length
    sources = encode_sources([source for source, _ in groups], tokenizer, max_length)
    decoded = decode_ids(runner, sources, beam_size)
    hypotheses = tokenizer.decode_batch(decoded)
    references = [targets for _, targets in groups]
    reference_ids = [tokenizer.encode_batch(targets) for targets in references]
    scores = {
        "token_accuracy": token_accuracy(decoded, reference_ids),
        "exact_match": exact_match(hypotheses, references),
    }
    if translation:
        scores["bleu"] = bleu(hypotheses, references)
        scores["chrf"] = chrf(hypotheses, references)
    return scores


def evaluate_pairs(
    runner: Runner,
    tokenizer: Tokenizer,
    pairs: Sequence[Pair],
    task: str,
    max_examples: int | None = None,
    beam_size: int = 1,
) -> dict[str, float]:
    """Measure validation loss and decoding scores on held-out pairs.

    Args:
        pairs: (source, target) texts; lines with the same source are several
            references of one example.
        task: the run's task; ``translate`` adds BLEU and chrF.
        max_examples: decode only the first this many distinct sources; the
            loss always covers every pair.
        beam_size: 1 for greedy decoding.

    Returns:
        valid_loss, token_accuracy, exact_match (and bleu, chrf).

    Raises:
        DataError: a pair is longer than the model's max_length.
    """
    max_length = runner.model_config.max_length
    encoded, _ = encode_pairs(pairs, tokenizer, max_length)
    groups = group_references(pairs)[:max_examples]
    scores = {"valid_loss": validation_loss(runner, encoded)}
    scores.update(
        score_decoding(runner, tokenizer, groups, task == "translate", beam_size)
    )
    return scores


def format_scores(scores: dict[str, float]) -> str:
    """Format scores as ``name=value`` pairs, in a fixed order, on one line."""
    order = ("step", "train_loss", "valid_loss", "token_accuracy", "exact_match")
    names = [name for name in order if name in scores]
    names += sorted(name for name in scores if name not in order)
    parts = []
    for name in names:
        value = scores[name]
        text = str(value) if isinstance(value, int) else f"{value:.4f}"
        parts.append(f"{name}={text}")
    return " ".join(parts)


# --- The training loop ------------------------------------------------------


class TrainingDiverged(ConfigError):
    """The training loss became NaN or infinite."""


def fit(
    runner: Runner,
    batches: Iterator,
    evaluate: Any,
    train_config: TrainConfig,
    metrics_path: Path,
) -> dict[str, Any]:
    """Train for ``train_config.steps`` steps, evaluating every ``eval_every``.

    Args:
        runner: the model and its optimizer.
        batches: an endless iterator of training ``Batch`` objects.
        evaluate: a function of no arguments returning a dict of scores with
            ``valid_loss``; called at every evaluation.
        train_config: steps and evaluation interval.
        metrics_path: ``metrics.jsonl``, one line appended per evaluation.

    Returns:
        The last evaluation: step, train_loss, learning_rate and the scores.

    Raises:
        TrainingDiverged: a training loss is NaN or infinite.
    """
    steps = train_config.steps
    losses: list[float] = []
    last: dict[str, Any] = {}
    progress = tqdm(
        total=steps, unit="step", file=sys.stderr, disable=not sys.stderr.isatty()
    )
    with progress:
        for step in range(1, steps + 1):
            loss = runner.train_step(next(batches))
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"training loss is {loss} at step {step}; lower --lr-scale or "
                    "set --clip-grad-norm"
                )
            losses.append(loss)
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.3f}", refresh=False)
            if step % train_config.eval_every == 0 or step == steps:
                last = _record_evaluation(runner, step, losses, evaluate, metrics_path)
                losses = []
    return last


def _record_evaluation(
    runner: Runner,
    step: int,
    losses: list[float],
    evaluate: Any,
    metrics_path: Path,
) -> dict[str, Any]:
    scores = dict(evaluate())
    train_loss = float(np.mean(losses))
    valid_loss = scores.pop("valid_loss")
    checkpoint.append_jsonl(
        metrics_path,
        {
            "step": step,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "learning_rate": runner.learning_rate,
            "metrics": scores,
        },
    )
    summary = {
        "step": step,
        "train_loss": train_loss,
        "valid_loss": valid_loss,
        **scores,
    }
    logger.info("%s lr=%.3g", format_scores(summary), runner.learning_rate)
    return summary


# --- A whole run ------------------------------------------------------------


@dataclass(frozen=True)
class TrainRequest:
    """Everything ``train_run`` needs, as the command line collects it."""

    framework: str
    task: str
    out: Path
    train_config: TrainConfig
    # ModelConfig fields (a preset merged with explicit options), vocabulary
    # sizes excluded; with ``init_from`` only the given ones, checked against
    # the base run.
    model_options: dict[str, Any] = field(default_factory=lambda: PRESETS["small"])
    lora_config: LoraConfig | None = None
    data_path: Path | None = None
    init_from: Path | None = None
    overwrite: bool = False
    # Subword vocabulary of translate; ignored by the synthetic tasks.
    vocab_size: int = DEFAULT_VOCAB_SIZE


def build_tokenizer(task: str, split: Split, vocab_size: int) -> Tokenizer:
    """Return the symbol tokenizer of a synthetic task, or train BPE on ``split``."""
    if task in SYNTHETIC_TASKS:
        return Tokenizer.from_symbols(synthetic_symbols())
    texts = [text for pair in split.train for text in pair]
    return Tokenizer.train_subword(texts, vocab_size)


def _model_config_from_base(
    base: ModelConfig, options: dict[str, Any], init_from: Path
) -> ModelConfig:
    conflicts = [
        f"{name}={options[name]!r} (base run has {getattr(base, name)!r})"
        for name in SIZE_FIELDS
        if name in options and options[name] != getattr(base, name)
    ]
    if conflicts:
        raise ConfigError(
            f"--init-from {init_from} fixes the model size; drop the conflicting "
            f"options: {', '.join(conflicts)}"
        )
    return base.replace(**{k: v for k, v in options.items() if k not in SIZE_FIELDS})


@dataclass
class _Start:
    model_config: ModelConfig
    tokenizer: Tokenizer
    base_tensors: dict[str, np.ndarray] | None = None
    base_model_file: Path | None = None


def _resolve_start(request: TrainRequest, split: Split) -> _Start:
    if request.init_from is None:
        tokenizer = build_tokenizer(request.task, split, request.vocab_size)
        vocab = tokenizer.vocab_size
        model_config = ModelConfig(
            source_vocab_size=vocab, target_vocab_size=vocab, **request.model_options
        )
        return _Start(model_config, tokenizer)
    base = checkpoint.load_run(request.init_from)
    if base.lora_config is not None:
        raise CheckpointError(
            f"--init-from {request.init_from} is a LoRA run; merge its adapter "
            "first with `twinformer merge` and start from the merged run"
        )
    model_config = _model_config_from_base(
        base.model_config, request.model_options, request.init_from
    )
    tokenizer = Tokenizer.load(base.tokenizer_path)
    model_file = base.directory / checkpoint.MODEL_FILE
    return _Start(model_config, tokenizer, base.base_tensors, model_file)


def _fitting_pairs(
    pairs: list[Pair], tokenizer: Tokenizer, max_length: int, name: str
) -> list[Pair]:
    sources = tokenizer.encode_batch([source for source, _ in pairs])
    targets = tokenizer.encode_batch([target for _, target in pairs])
    # A target needs room for BOS in the decoder input and EOS in the labels.
    kept = [
        pair
        for pair, source, target in zip(pairs, sources, targets, strict=True)
        if len(source) <= max_length and len(target) + 1 <= max_length
    ]
    if len(kept) < len(pairs):
        logger.warning(
            "skipped %d of %d %s pairs longer than max_length %d tokens",
            len(pairs) - len(kept),
            len(pairs),
            name,
            max_length,
        )
    if not kept:
        raise DataError(
            f"no {name} pair fits max_length {max_length}; raise --max-length"
        )
    return kept


def _warn_unknown(tokenizer: Tokenizer, pairs: EncodedPairs) -> None:
    unknown = sum(
        tokenizer.count_unknown(ids) for ids in (*pairs.sources, *pairs.targets)
    )
    if unknown:
        logger.warning(
            "%d training tokens map to <unk>: the tokenizer has no entry for them",
            unknown,
        )


def write_pairs_tsv(path: Path, pairs: Sequence[Pair]) -> None:
    """Write pairs as ``source<TAB>target`` lines, atomically."""
    checkpoint.atomic_write_text(path, "".join(f"{s}\t{t}\n" for s, t in pairs))


def read_pairs_tsv(path: Path) -> list[Pair]:
    """Read a run directory's ``valid.tsv``; a missing file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the run directory is incomplete")
    return read_tsv(path)


def _write_run_files(
    staging: Path, request: TrainRequest, start: _Start, valid: list[Pair]
) -> None:
    start.tokenizer.save(staging / checkpoint.TOKENIZER_FILE)
    write_pairs_tsv(staging / checkpoint.VALID_FILE, valid)
    lora = request.lora_config
    checkpoint.write_run_config(
        staging,
        {
            "framework": request.framework,
            "task": request.task,
            "model": start.model_config.to_dict(),
            "train": request.train_config.to_dict(),
            "lora": lora.to_dict() if lora else None,
            "init_from": str(request.init_from) if request.init_from else None,
        },
    )


def _write_weights(staging: Path, runner: Runner, start: _Start, lora: Any) -> None:
    model_file = staging / checkpoint.MODEL_FILE
    if lora is not None and start.base_model_file is not None:
        # The base is frozen: keep its file byte for byte.
        checkpoint.atomic_write_bytes(model_file, start.base_model_file.read_bytes())
    else:
        checkpoint.write_tensors(model_file, runner.base_tensors())
    if lora is not None:
        checkpoint.write_adapter(
            staging, runner.adapter_tensors(), lora, start.model_config
        )


def _train_into(staging: Path, request: TrainRequest) -> dict[str, Any]:
    runner_class = load_runner_class(request.framework)
    config = request.train_config
    split = load_split(request.task, config.seed, request.data_path)
    start = _resolve_start(request, split)
    max_length = start.model_config.max_length
    translation = request.task == "translate"
    train = split.train
    if translation:
        train = _fitting_pairs(train, start.tokenizer, max_length, "training")
    valid = _fitting_pairs(split.valid, start.tokenizer, max_length, "validation")
    encoded_train, _ = encode_pairs(train, start.tokenizer, max_length)
    _warn_unknown(start.tokenizer, encoded_train)
    _write_run_files(staging, request, start, valid)

    if request.framework == "jax":
        _keep_freed_memory_if_large(start.model_config, config, encoded_train)
    runner = runner_class(
        start.model_config, config, request.lora_config, start.base_tensors
    )
    trainable, total = runner.parameter_counts()
    logger.info(
        "%s %s: %d training pairs, %d held out, vocabulary %d, parameters "
        "%d trainable of %d",
        request.framework,
        request.task,
        len(encoded_train),
        len(valid),
        start.tokenizer.vocab_size,
        trainable,
        total,
    )

    def evaluate() -> dict[str, float]:
        return evaluate_pairs(
            runner, start.tokenizer, valid, request.task, config.eval_examples
        )

    batches = shuffled_batches(encoded_train, config.batch_size, config.seed)
    metrics_path = staging / checkpoint.METRICS_FILE
    summary = fit(runner, batches, evaluate, config, metrics_path)
    _write_weights(staging, runner, start, request.lora_config)
    return summary


def _keep_freed_memory_if_large(
    model_config: ModelConfig, config: TrainConfig, encoded: EncodedPairs
) -> None:
    # Runs before the Runner starts JAX's CPU backend; see twinformer.host_memory.
    # The decoder reads a target with BOS in front, hence the + 1.
    max_tokens = max(len(ids) for ids in [*encoded.sources, *encoded.targets]) + 1
    estimate = training_buffer_estimate(model_config, config.batch_size, max_tokens)
    if estimate > REUSED_BY_DEFAULT and keep_freed_memory():
        logger.info(
            "keeping freed memory for reuse: a training step needs about %d MB",
            estimate // 2**20,
        )


def train_run(request: TrainRequest) -> dict[str, Any]:
    """Train a model and write its run directory to ``request.out``.

    The data split, tokenizer and model config come from the task, or from the
    run named by ``init_from``. With ``init_from`` and LoRA the base stays
    frozen and the new run's ``model.safetensors`` is a byte copy of the base
    run's. For ``translate``, training and held-out pairs longer than the
    model's ``max_length`` are skipped and their count logged. A synthetic pair
    that does not fit raises DataError.

    Returns:
        The final evaluation (step, train_loss, valid_loss, token_accuracy,
        exact_match, and bleu and chrf for translate).

    Raises:
        CheckpointError: ``out`` exists and is not empty without ``overwrite``,
            or the ``init_from`` run is missing or invalid.
        ConfigError, DataError: invalid options or data; nothing is left behind.
    """
    staging = checkpoint.start_run_directory(request.out, request.overwrite)
    try:
        summary = _train_into(staging, request)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint.finish_run_directory(staging, request.out)
    logger.info("wrote run directory %s", os.fspath(request.out))
    return summary


# --- Trained runs -----------------------------------------------------------


@dataclass(frozen=True)
class TrainedModel:
    """A run directory loaded into a Runner, ready to decode."""

    run: checkpoint.RunFiles
    runner: Runner
    tokenizer: Tokenizer
    task: str


def load_model(run_dir: Path, framework: str | None = None) -> TrainedModel:
    """Load a run directory's weights, adapter and tokenizer into a Runner.

    Args:
        run_dir: a directory written by ``train_run`` or ``merge_run``.
        framework: "torch" or "jax"; by default the one that wrote the run.

    Raises:
        CheckpointError: a file of the run is missing or does not match.
    """
    run = checkpoint.load_run(run_dir)
    framework = framework or run.config.get("framework", "torch")
    runner_class = load_runner_class(framework)
    train_config = TrainConfig.from_dict(run.config.get("train") or {})
    runner = runner_class(
        run.model_config,
        train_config,
        run.lora_config,
        run.base_tensors,
        run.adapter_tensors,
    )
    tokenizer = Tokenizer.load(run.tokenizer_path)
    if tokenizer.vocab_size != run.model_config.target_vocab_size:
        raise CheckpointError(
            f"{run.tokenizer_path} has {tokenizer.vocab_size} tokens but the "
            f"model's vocabulary has {run.model_config.target_vocab_size}; the "
            "tokenizer belongs to another run"
        )
    return TrainedModel(run, runner, tokenizer, run.config.get("task", "translate"))


def merge_run(
    run_dir: Path, out: Path, framework: str | None = None, overwrite: bool = False
) -> None:
    """Write a plain run directory with the LoRA adapter merged into the base.

    The copy keeps the tokenizer, held-out split and metrics; its config has
    no LoRA entry and names ``run_dir`` as ``init_from``.

    Raises:
        CheckpointError: ``run_dir`` has no adapter, or ``out`` is not empty
            and ``overwrite`` is off.
    """
    model = load_model(run_dir, framework)
    if model.run.lora_config is None:
        raise CheckpointError(
            f"{run_dir} has no LoRA adapter to merge; it already is a plain run"
        )
    staging = checkpoint.start_run_directory(out, overwrite)
    try:
        checkpoint.write_tensors(
            staging / checkpoint.MODEL_FILE, model.runner.merged_base_tensors()
        )
        for name in (
            checkpoint.TOKENIZER_FILE,
            checkpoint.VALID_FILE,
            checkpoint.METRICS_FILE,
        ):
            source = model.run.directory / name
            if source.is_file():
                checkpoint.atomic_write_bytes(staging / name, source.read_bytes())
        config = {k: v for k, v in model.run.config.items() if k != "format_version"}
        config.update(lora=None, init_from=str(run_dir))
        checkpoint.write_run_config(staging, config)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    checkpoint.finish_run_directory(staging, out)
    logger.info("wrote merged run directory %s", os.fspath(out))
