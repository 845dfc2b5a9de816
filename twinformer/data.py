"""Encoding, padding and batching of sequence pairs (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    """A padded batch of sequence pairs, all int32, PAD_ID where unused.

    Shapes: source_ids (B, S); target_input_ids and target_output_ids (B, T).
    target_input_ids is [BOS] + target; target_output_ids is target + [EOS].
    """

    source_ids: np.ndarray
    target_input_ids: np.ndarray
    target_output_ids: np.ndarray
