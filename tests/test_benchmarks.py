"""Smoke tests of the benchmark scripts at tiny sizes; no timing assertions.

Each script runs once in-process with one repeat of one step, which checks
that it builds all candidates, runs them and returns every result field.
"""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# The benchmarks package sits at the repository root, outside the installed
# packages, so it is importable only with the root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import decode_speed, train_speed  # noqa: E402
from benchmarks.common import SIZES, random_batch  # noqa: E402
from twinformer.config import EOS_ID, PAD_ID  # noqa: E402
from twinformer.errors import ConfigError, TwinformerError  # noqa: E402

# 2 heads of 7, lengths 11 and 13, vocabulary 37: a swapped axis cannot pass.
# Dropout 0 leaves the random-bit ops out of the compiled JAX train step,
# which shortens its compile. --default-malloc keeps the malloc settings of
# twinformer.host_memory out of the test process.
TINY = [
    "--sizes", "small", "--model-dim", "14", "--num-heads", "2", "--ff-dim", "19",
    "--num-layers", "1", "--vocab-size", "37", "--batch-size", "3",
    "--source-length", "11", "--target-length", "13", "--repeats", "1",
    "--warmup", "0", "--dropout", "0", "--default-malloc",
]  # fmt: skip


@pytest.fixture(autouse=True)
def restore_threads():
    """Undo the torch thread count and core pinning that ``main`` sets."""
    import torch

    cores, threads = os.sched_getaffinity(0), torch.get_num_threads()
    yield
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def check_candidates(record: dict, names: list[str]) -> None:
    assert list(record["candidates"]) == names
    for name in names:
        rates = record["candidates"][name]["repeat_tokens_per_s"]
        assert len(rates) == 1, name
        assert math.isfinite(record["candidates"][name]["tokens_per_s"]), name
        assert record["candidates"][name]["tokens_per_s"] > 0, name


def test_train_speed_result_fields(tmp_path):
    path = tmp_path / "train.json"
    output = train_speed.main([*TINY, "--steps", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(output))
    (record,) = output["results"]
    assert record["size"]["model_dim"] == 14
    check_candidates(record, [train_speed.TWIN, train_speed.REFERENCE, train_speed.JAX])
    assert "compile_s" in record["candidates"][train_speed.JAX]
    assert set(record["ratios"]) == {"twin_over_nn_transformer", "jax_over_torch_twin"}
    assert output["machine"]["versions"]["torch"]


def test_decode_speed_result_fields(tmp_path):
    path = tmp_path / "decode.json"
    output = decode_speed.main([*TINY, "--new-tokens", "5", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(output))
    (record,) = output["results"]
    # 3 rows of 5 forced tokens per call.
    assert record["tokens_per_call"] == 15
    names = [
        f"{twin}, {mode}"
        for twin in (decode_speed.TORCH, decode_speed.JAX)
        for mode in ("cache", "no cache")
    ]
    check_candidates(record, names)
    assert "compile_s" in record["candidates"][f"{decode_speed.JAX}, cache"]
    assert set(record["ratios"]) == {
        "torch_cache_speedup",
        "jax_cache_speedup",
        "jax_over_torch_cache",
    }


def test_sizes_unknown_name_rejected():
    with pytest.raises(ConfigError, match="unknown --sizes"):
        train_speed.main(["--sizes", "huge"])


def test_full_length_check_rejects_eos():
    ids = np.full((3, 5), 7, dtype=np.int32)
    decode_speed.check_full_length("model", ids, 3, 5)
    ids[1, 2] = EOS_ID
    with pytest.raises(TwinformerError, match="stopped early"):
        decode_speed.check_full_length("model", ids, 3, 5)
    with pytest.raises(TwinformerError, match="stopped early"):
        decode_speed.check_full_length("model", ids[:, :4], 3, 4 + 1)


def test_random_batch_shape_and_padding():
    size = SIZES["small"]
    batch = random_batch(size, np.random.default_rng(0))
    shape = (size.batch_size, size.target_length)
    assert batch.source_ids.shape == (size.batch_size, size.source_length)
    assert batch.target_input_ids.shape == shape
    assert batch.target_output_ids.shape == shape
    # Some rows are shorter than the padded length, and every id fits the
    # vocabulary.
    assert np.any(batch.source_ids == PAD_ID)
    assert batch.source_ids.max() < size.vocab_size
    assert batch.target_output_ids.max() < size.vocab_size
