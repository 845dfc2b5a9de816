"""Loss curves of training runs, drawn with matplotlib's Agg backend."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

from twinformer import checkpoint
from twinformer.errors import CheckpointError, ConfigError


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read the ``metrics.jsonl`` records of a run directory.

    Raises:
        CheckpointError: the file is missing, empty, or a line is not JSON
            with ``step``, ``train_loss`` and ``valid_loss`` (named by number).
    """
    path = Path(run_dir) / checkpoint.METRICS_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; is {run_dir} a run directory?")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            _ = (record["step"], record["train_loss"], record["valid_loss"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CheckpointError(
                f"{path}, line {number}: not a metrics record with step, "
                "train_loss and valid_loss"
            ) from None
        records.append(record)
    if not records:
        raise CheckpointError(f"{path} is empty; the run has no evaluations")
    return records


def plot_runs(run_dirs: list[str | os.PathLike], out: str | os.PathLike) -> None:
    """Draw training (solid) and validation (dashed) loss against step.

    Each run gets one color and its directory name in the legend; the figure
    is written to ``out`` atomically, in the format its suffix names.

    Raises:
        ConfigError: no run directories, or ``out`` has no image suffix.
        CheckpointError: a run's ``metrics.jsonl`` is missing or invalid.
    """
    if not run_dirs:
        raise ConfigError("plot needs at least one run directory")
    out = Path(out)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"--out {out} must end in .png, .pdf or .svg")
    runs = [(Path(run_dir).name, read_metrics(run_dir)) for run_dir in run_dirs]

    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4.5))
    for index, (name, records) in enumerate(runs):
        color = f"C{index % 10}"
        steps = [record["step"] for record in records]
        train = [record["train_loss"] for record in records]
        valid = [record["valid_loss"] for record in records]
        axes.plot(steps, train, color=color, label=f"{name} train")
        axes.plot(steps, valid, color=color, linestyle="--", label=f"{name} valid")
    axes.set_xlabel("step")
    axes.set_ylabel("loss per token (label-smoothed)")
    axes.legend()
    axes.grid(alpha=0.3)

    buffer = io.BytesIO()
    figure.savefig(buffer, format=out.suffix.lower()[1:], bbox_inches="tight")
    pyplot.close(figure)
    checkpoint.atomic_write_bytes(out, buffer.getvalue())
