"""The parity ladder under pytest: every check of parity.ladder, per dtype.

Tolerances live in ``parity.ladder.TOLERANCES`` with the reason for each; a
failure lists the rung, check, tensor, worst index and both values.
"""

from __future__ import annotations

import numpy as np
import pytest

from parity.ladder import (
    CHECKS,
    DTYPES,
    Fixture,
    TensorPair,
    assert_passed,
    compare,
    run_check,
)

_FIXTURES: dict[str, Fixture] = {}


def _fixture(dtype: str) -> Fixture:
    # One fixture per dtype for the whole session, so models are built once.
    if dtype not in _FIXTURES:
        _FIXTURES[dtype] = Fixture(dtype)
    return _FIXTURES[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "check", CHECKS, ids=[f"rung{c.rung}-{c.name.replace(' ', '_')}" for c in CHECKS]
)
def test_ladder_check(check, dtype):
    results = run_check(check, _fixture(dtype))
    assert results, "the check produced no tensor pairs"
    assert_passed(results)


def test_compare_reports_worst_element():
    reference = np.array([[1.0, 2.0], [3.0, 4.0]])
    candidate = reference.copy()
    candidate[1, 0] += 1e-3
    pair = TensorPair("t", reference, candidate)
    result = compare(pair, rung=4, check="logits", dtype="float64", kind="forward")
    assert not result.passed
    assert result.max_abs == pytest.approx(1e-3)
    # Relative error divides by max |reference| = 4.
    assert result.max_rel == pytest.approx(2.5e-4)
    assert "(1, 0)" in result.detail
    assert "rung 4 logits" in result.describe()


def test_compare_within_tolerance_passes():
    reference = np.linspace(-1.0, 1.0, 7, dtype=np.float32)
    candidate = reference * np.float32(1 + 2e-6)
    pair = TensorPair("t", reference, candidate)
    result = compare(pair, rung=1, check="c", dtype="float32", kind="forward")
    assert result.passed


def test_compare_shape_mismatch_fails():
    pair = TensorPair("t", np.zeros((3, 5)), np.zeros((5, 3)))
    result = compare(pair, rung=2, check="c", dtype="float64", kind="forward")
    assert not result.passed
    assert "shapes differ" in result.detail


def test_compare_nan_fails():
    candidate = np.array([1.0, np.nan])
    pair = TensorPair("t", np.array([1.0, 2.0]), candidate)
    result = compare(pair, rung=2, check="c", dtype="float64", kind="forward")
    assert not result.passed
    assert "non-finite" in result.detail


def test_compare_exact_kind_rejects_any_difference():
    pair = TensorPair("ids", np.array([4, 5, 6]), np.array([4, 5, 7]))
    result = compare(pair, rung=10, check="c", dtype="float32", kind="exact")
    assert not result.passed


def test_compare_scale_override_divides_noise():
    # A tensor that is zero in exact arithmetic: noise against a scale of 1.
    pair = TensorPair("b", np.array([1e-18, -2e-18]), np.array([3e-18, 0.0]), scale=1.0)
    result = compare(pair, rung=6, check="c", dtype="float64", kind="gradient")
    assert result.passed
    assert result.max_rel == pytest.approx(2e-18)


def test_fixture_rejects_unknown_dtype():
    from twinformer.errors import ConfigError

    with pytest.raises(ConfigError, match="float16"):
        Fixture("float16")


def test_fixture_batch_has_padding():
    batch = _fixture("float32").batch
    assert batch.source_ids.shape == (3, 11)
    assert batch.target_input_ids.shape == (3, 13)
    assert (batch.source_ids[1:] == 0).any()
    assert (batch.source_ids[0] != 0).all()
