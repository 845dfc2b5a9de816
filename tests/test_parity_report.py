"""The parity report: table, exit status, options, and a patched twin."""

from __future__ import annotations

import json
import os

import pytest

import torch_impl.attention
from parity import report
from parity.ladder import CHECKS, Fixture, run_check
from twinformer.errors import LoraError

use_fast_compilation = report.use_fast_compilation


@pytest.fixture(autouse=True)
def _keep_xla_flags(monkeypatch):
    # main() adds a compile flag to XLA_FLAGS, and JAX would apply it to the
    # rest of the test session if it started after this test.
    monkeypatch.setattr(report, "use_fast_compilation", lambda: None)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (None, report.FAST_COMPILE_FLAG),
        ("--xla_dump_to=dumps", "--xla_dump_to=dumps " + report.FAST_COMPILE_FLAG),
        # A level chosen by the user is kept.
        (
            "--xla_backend_optimization_level=3",
            "--xla_backend_optimization_level=3",
        ),
    ],
)
def test_fast_compilation_flag(monkeypatch, before, after):
    monkeypatch.setattr(report, "_jax_backends_started", lambda: False)
    if before is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", before)
    use_fast_compilation()
    assert os.environ["XLA_FLAGS"] == after


def test_fast_compilation_flag_after_start(monkeypatch):
    # XLA has read its flags once JAX's backends run, so a late flag is left out.
    monkeypatch.setattr(report, "_jax_backends_started", lambda: True)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    use_fast_compilation()
    assert "XLA_FLAGS" not in os.environ


def test_report_rung_passes(capsys, tmp_path):
    out = tmp_path / "parity.json"
    status = report.main(["--dtype", "float32", "--rung", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    assert status == 0
    assert printed.splitlines()[0].split()[:3] == ["rung", "check", "max"]
    assert "layer norm [float32]" in printed
    assert printed.rstrip().endswith("parity: 6 passed, 0 failed")
    record = json.loads(out.read_text())
    assert record["failed"] == 0
    assert {result["rung"] for result in record["results"]} == {1}


def test_report_lora_rank_zero_skips(capsys):
    status = report.main(["--dtype", "float32", "--rung", "9", "--lora-rank", "0"])
    printed = capsys.readouterr().out
    assert status == 0
    assert "LoRA merge [float32]" in printed
    assert "skipped" in printed
    assert printed.rstrip().endswith("parity: 0 passed, 0 failed")


def test_report_negative_rank_rejected(capsys):
    with pytest.raises(SystemExit) as raised:
        report.main(["--lora-rank", "-1"])
    assert raised.value.code == 2
    assert "0 skips the LoRA checks" in capsys.readouterr().err


def test_report_rank_above_layer_limit_rejected():
    # ff_dim is 23, so the feed-forward layers take a rank of at most 23.
    with pytest.raises(LoraError, match="rank 24"):
        report.main(["--dtype", "float32", "--lora-rank", "24", "--rung", "9"])


def _scaled_query(attend):
    # Multiplies the query by 1.01, as a wrong 1/sqrt(d_k) would.
    def wrapper(query, *args, **kwargs):
        return attend(query * 1.01, *args, **kwargs)

    return wrapper


def test_patched_attention_scale_fails_rung_2(monkeypatch, capsys):
    for name in ("attend_manual", "attend_fused"):
        original = getattr(torch_impl.attention, name)
        monkeypatch.setattr(torch_impl.attention, name, _scaled_query(original))

    check = next(c for c in CHECKS if c.rung == 2 and c.name == "multi-head attention")
    results = run_check(check, Fixture("float32", lora_rank=0))
    assert not any(result.passed for result in results)

    status = report.main(["--dtype", "float32", "--rung", "1", "--rung", "2"])
    printed = capsys.readouterr().out
    assert status == 1
    # Check rows start with the rung; rows of failed tensors start with FAILED.
    rows = [line.split() for line in printed.splitlines()]
    failed_rungs = {row[0] for row in rows if row[0].isdigit() and row[-1] == "FAIL"}
    assert failed_rungs == {"2"}
    summary = printed.splitlines()[-1]
    assert summary.startswith("parity: ")
    assert not summary.endswith(" 0 failed")
