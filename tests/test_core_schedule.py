"""The warmup learning-rate schedule at chosen steps."""

import math

import pytest

from twinformer.errors import ConfigError
from twinformer.schedule import transformer_learning_rate


def test_schedule_warmup_is_linear():
    # model_dim 49, warmup 25: lr = 49^-0.5 * step * 25^-1.5 = step / 875.
    for step in (1, 7, 13):
        value = transformer_learning_rate(step, 49, 25, 1.0)
        # float64 arithmetic of a few operations: relative error ~1e-16.
        assert math.isclose(value, step / 875, rel_tol=1e-12)


def test_schedule_decay_after_warmup():
    # After warmup lr = lr_scale * 49^-0.5 / sqrt(step) = 2 / (7 * sqrt(step)).
    for step in (25, 36, 121):
        value = transformer_learning_rate(step, 49, 25, 2.0)
        assert math.isclose(value, 2 / (7 * math.sqrt(step)), rel_tol=1e-12)


def test_schedule_peaks_at_warmup():
    rates = [transformer_learning_rate(s, 64, 11, 1.0) for s in range(1, 40)]
    assert max(rates) == rates[10]


@pytest.mark.parametrize(
    "args", [(0, 64, 10, 1.0), (1, 0, 10, 1.0), (1, 64, 0, 1.0), (1, 64, 10, 0.0)]
)
def test_schedule_invalid_arguments(args):
    with pytest.raises(ConfigError):
        transformer_learning_rate(*args)
