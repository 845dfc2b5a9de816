"""The interface each twin's ``Runner`` implements for the command line.

``torch_impl.runner.Runner`` and ``jax_impl.runner.Runner`` hold a model's
parameters (and, while training, the optimizer state) and expose the same
methods, so the training loop, evaluation and translation in ``twinformer``
never touch a framework. Arrays cross this boundary as numpy arrays in the
checkpoint layout of ``twinformer.param_map``.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from twinformer.config import LoraConfig, ModelConfig, TrainConfig
from twinformer.data import Batch


class Runner(Protocol):
    """A model in one framework, ready to train, score and decode."""

    model_config: ModelConfig
    lora_config: LoraConfig | None

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        lora_config: LoraConfig | None = None,
        base_tensors: dict[str, np.ndarray] | None = None,
        adapter_tensors: dict[str, np.ndarray] | None = None,
        dtype: str = "float32",
    ) -> None:
        """Build the model.

        Args:
            base_tensors: checkpoint-layout weights to start from; ``None``
                initialises fresh weights from ``train_config.seed``.
            lora_config: when given, the base is frozen and only adapters train.
            adapter_tensors: adapter weights to start from; ``None`` initialises
                A Kaiming-uniform and B zero.
            dtype: "float32" or "float64" for parameters and computation.
        """

    def train_step(self, batch: Batch) -> float:
        """Take one optimizer step; return the mean label-smoothed loss per token."""

    @property
    def learning_rate(self) -> float:
        """Learning rate applied at the last ``train_step`` (0 before the first)."""

    def evaluate_loss(self, batch: Batch) -> tuple[float, int]:
        """Return (summed loss over non-padding tokens, token count), dropout off."""

    def greedy_search(self, source_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Decode greedily; (B, S) source ids -> (B, L) ids, L <= max_new_tokens.

        Rows hold the generated tokens after BOS up to and including the first
        EOS, padded with PAD_ID after it.
        """

    def beam_search(
        self,
        source_ids: np.ndarray,
        max_new_tokens: int,
        beam_size: int,
        length_penalty: float = 0.6,
        num_return: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode with beam search; return ids (B, n, L) and scores (B, n).

        n is ``num_return``; scores are length-penalised log-probabilities.
        """

    def base_tensors(self) -> dict[str, np.ndarray]:
        """Return the base weights, checkpoint names, unmerged."""

    def adapter_tensors(self) -> dict[str, np.ndarray] | None:
        """Return the LoRA tensors (``None`` without LoRA)."""

    def merged_base_tensors(self) -> dict[str, np.ndarray]:
        """Return base weights with the adapters merged in (W + s B A)."""

    def parameter_counts(self) -> tuple[int, int]:
        """Return (trainable, total) parameter counts; tied tensors count once."""
