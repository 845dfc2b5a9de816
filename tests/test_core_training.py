"""The training loop and decoding helpers, driven by a scripted fake Runner."""

import json

import numpy as np
import pytest

from twinformer.config import EOS_ID, ModelConfig, TrainConfig
from twinformer.data import Batch
from twinformer.training import (
    TrainingDiverged,
    decode_ids,
    fit,
    format_scores,
)


class ScriptedRunner:
    """Returns losses from a list and echoes sources as decoded ids."""

    def __init__(self, losses):
        self.model_config = ModelConfig(
            source_vocab_size=37, target_vocab_size=37, model_dim=14, num_heads=2,
            max_length=13,
        )  # fmt: skip
        self.losses = list(losses)
        self.steps = 0
        self.calls = []

    def train_step(self, batch):
        self.steps += 1
        return self.losses[self.steps - 1]

    @property
    def learning_rate(self):
        return 0.01 * self.steps

    def greedy_search(self, source_ids, max_new_tokens):
        self.calls.append(("greedy", max_new_tokens))
        return np.concatenate([source_ids, np.full((len(source_ids), 1), EOS_ID)], 1)

    def beam_search(self, source_ids, max_new_tokens, beam_size):
        self.calls.append(("beam", beam_size))
        ids = self.greedy_search(source_ids, max_new_tokens)[:, None, :]
        return ids, np.zeros((len(source_ids), 1))


def _batches():
    ids = np.ones((2, 3), np.int32)
    while True:
        yield Batch(ids, ids, ids)


def test_fit_evaluates_every_interval_and_last_step(tmp_path):
    runner = ScriptedRunner([float(n) for n in range(1, 8)])
    metrics = tmp_path / "metrics.jsonl"
    config = TrainConfig(steps=7, eval_every=3)
    summary = fit(runner, _batches(), lambda: {"valid_loss": 0.5}, config, metrics)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [record["step"] for record in records] == [3, 6, 7]
    # Training loss is the mean since the previous evaluation.
    assert [record["train_loss"] for record in records] == [2.0, 5.0, 7.0]
    assert records[-1]["learning_rate"] == pytest.approx(0.07)
    assert summary["step"] == 7
    assert summary["valid_loss"] == 0.5


def test_fit_stops_on_nan(tmp_path):
    runner = ScriptedRunner([1.0, float("nan"), 1.0])
    config = TrainConfig(steps=3, eval_every=1)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 2"):
        fit(runner, _batches(), lambda: {"valid_loss": 0.0}, config,
            tmp_path / "m.jsonl")  # fmt: skip


def test_decode_ids_limit_and_beam():
    runner = ScriptedRunner([])
    sources = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    decoded = decode_ids(runner, sources)
    assert decoded[1].tolist() == [8, 0, 0, EOS_ID]
    # 2 * 3 + 10 = 16 exceeds max_length - 1 = 12, so the cap applies.
    assert runner.calls == [("greedy", 12)]
    decode_ids(runner, sources, beam_size=3, max_new_tokens=5)
    assert runner.calls[1] == ("beam", 3)


def test_format_scores_order():
    text = format_scores({"bleu": 12.5, "exact_match": 0.25, "step": 7})
    assert text == "step=7 exact_match=0.2500 bleu=12.5000"
