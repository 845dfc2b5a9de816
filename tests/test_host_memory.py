"""keep_freed_memory: a JAX call's temporary buffer is reused, not remapped.

The page-fault test runs in fresh processes, because the malloc settings
must be made before JAX starts its CPU backend and they last for the life
of the process.
"""

import platform
import subprocess
import sys

import numpy as np
import pytest

from twinformer import host_memory, training
from twinformer.config import PRESETS, ModelConfig, TrainConfig
from twinformer.data import Batch, EncodedPairs

# A compiled function whose temporary buffer is 128 MB: the (8192, 4096)
# float32 product must exist whole before the second product reads it. The
# script prints the median of the minor page faults of calls 21 to 40. In the
# first calls the heap grows (a buffer may be freed only after the next call
# has started), and later calls reuse it.
SCRIPT = """
import resource, statistics, sys
from twinformer.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((8192, 8), jnp.float32)
w = jnp.ones((8, 4096), jnp.float32)
f = jax.jit(lambda x, w: (x @ w).T @ x)
faults = []
for _ in range(40):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x, w).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[20:]))
"""
# 128 MB is 32,768 pages of 4 KiB.
BUFFER_PAGES = 32768

needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="keep_freed_memory sets glibc malloc options",
)


def _faults_per_call(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


@needs_glibc
def test_temporary_buffer_pages_are_reused():
    default = _faults_per_call("default")
    if default < BUFFER_PAGES / 2:
        pytest.skip(
            f"{default:.0f} page faults per call with glibc's default settings: "
            "this system already reuses the buffer, so the test cannot tell"
        )
    # With the settings the buffer's pages are mapped in the first calls only.
    # The bound allows 2% of the buffer for other allocations that grow.
    assert _faults_per_call("keep") < BUFFER_PAGES / 50


def test_no_glibc_changes_nothing(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))

    def no_libc(*args):
        raise AssertionError("the C library must not be opened")

    monkeypatch.setattr(host_memory.ctypes, "CDLL", no_libc)
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize(
    ("size", "expected_calls"),
    [
        # The default small model and batch on a synthetic task: 16 MB.
        (dict(vocab=14, dim=64, layers=2, batch=64, longest=9), 0),
        # d_model 256, 4+4 layers, batch 32, 31 + 1 positions: 212 MB.
        (dict(vocab=1000, dim=256, layers=4, batch=32, longest=31), 1),
    ],
)
def test_jax_training_keeps_memory_when_large(monkeypatch, size, expected_calls):
    calls = []
    monkeypatch.setattr(training, "keep_freed_memory", lambda: calls.append(1))
    config = ModelConfig(
        size["vocab"],
        size["vocab"],
        model_dim=size["dim"],
        ff_dim=4 * size["dim"],
        num_encoder_layers=size["layers"],
        num_decoder_layers=size["layers"],
    )
    encoded = EncodedPairs(sources=[[5] * size["longest"]], targets=[[6] * 3])
    train_config = TrainConfig(batch_size=size["batch"])
    training._keep_freed_memory_if_large(config, train_config, encoded)
    assert len(calls) == expected_calls


def test_buffer_estimate_near_xla_figure():
    # The default small model with its default batch of 64 and 10 positions.
    # The command line only needs the estimate to tell buffers far below
    # 32 MiB from those far above, so a factor of 2 either way is the bound.
    import jax

    from jax_impl.runner import Runner

    config = ModelConfig(14, 14, **PRESETS["small"])
    runner = Runner(config, TrainConfig(batch_size=64))
    ids = np.full((64, 10), 5, np.int32)
    arrays = runner._check_batch(Batch(ids, ids, ids))
    compiled = runner._train_step.lower(
        runner.params, None, runner._opt_state, arrays, jax.random.key(0)
    ).compile()
    actual = compiled.memory_analysis().temp_size_in_bytes
    estimate = host_memory.training_buffer_estimate(config, 64, 10)
    assert 0.5 < actual / estimate < 2.0
