"""The parity ladder: the PyTorch and JAX twins compared rung by rung.

Each rung compares one more of the model than the one before, so the first
rung that fails points at the component that differs:

    1  embeddings with position encoding, LayerNorm, feed-forward
    2  attention, manual and fused in each framework, with padding masks, the
       causal mask and a query row whose keys are all masked
    3  one encoder layer and one decoder layer, post-LN and pre-LN
    4  full-model logits, tied and untied embeddings
    5  the label-smoothed loss with padding
    6  gradients of every base parameter and every adapter parameter
    7  one optimizer step (parameters and both Adam moments), the schedule
    8  a 50-step training run on a toy task
    9  LoRA: merged against unmerged, adapters trained in one twin loaded in
       the other
    10 greedy and beam-search token ids

The ladder is data. A ``Check`` is a function from a ``Fixture`` (dtype,
shared inputs, converted weights) to named ``TensorPair``s; ``run_check``
compares each pair under the tolerance of its kind and dtype, and the same
checks run under pytest and in ``parity.report``. In every pair the
reference comes first: the PyTorch twin, or an external library when a rung
checks a twin against one.

Both tiers pin matmuls to full precision, so float32 means float32 on every
backend (TF32 on GPUs would otherwise round inputs to 10 mantissa bits).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import warnings
import zlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F

import jax_impl.attention
import jax_impl.decode
import jax_impl.layers
import jax_impl.lora
import jax_impl.loss
import jax_impl.model
import jax_impl.optim
import torch_impl.attention
import torch_impl.decode
import torch_impl.layers
import torch_impl.lora
import torch_impl.loss
import torch_impl.model
import torch_impl.optim
from parity.convert import jax_to_torch, tensors_to_tree, torch_to_jax, tree_to_tensors
from twinformer.config import (
    ALL_LINEAR,
    PAD_ID,
    SPECIAL_TOKENS,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from twinformer.data import Batch, make_batch
from twinformer.errors import ConfigError
from twinformer.param_map import base_tensor_specs
from twinformer.schedule import transformer_learning_rate

T = TypeVar("T")

DTYPES = ("float64", "float32")

# Relative tolerance (max |diff| / max |reference|) per dtype and kind of
# check. Reasons:
# - forward, float64: both twins evaluate the same formulas in a different
#   order (einsum vs matmul, fused softmax); each op adds ~1e-16, and a few
#   layers of sums over D=35 and V=37 keep the total far below 1e-12.
# - forward, float32: the same reordering at eps=6e-8 grows to ~1e-6 through
#   layers and softmax; 1e-5 leaves a margin of ten.
# - gradient (also optimizer state), float64: backward passes sum over batch
#   and length in framework-chosen orders, and Adam divides by sqrt(v) + eps,
#   which magnifies relative error where v is tiny; 1e-10 bounds that.
# - gradient, float32: the same, at float32 rounding; 1e-4.
# - training, float64: 50 Adam steps compound the per-step error; at
#   ~1e-14 per step with modest growth, 1e-9 is reached only by a real bug.
# - training, float32: float32 rounding compounded over 50 steps, where
#   Adam's normalisation amplifies tiny gradients; 1e-3.
# - exact: token ids and other integers must be equal.
# - fused softmax: jax.nn.dot_product_attention computes its softmax in
#   float32 even for float64 inputs (jax 0.10.2, _dot_product_attention_core),
#   so the JAX fused path is held to float32 accuracy (measured 9e-8) in the
#   float64 tier, and to the forward tolerance in the float32 tier.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {
        "forward": 1e-12,
        "gradient": 1e-10,
        "training": 1e-9,
        "exact": 0.0,
        "fused softmax": 1e-6,
    },
    "float32": {
        "forward": 1e-5,
        "gradient": 1e-4,
        "training": 1e-3,
        "exact": 0.0,
        "fused softmax": 1e-5,
    },
}


@dataclass(frozen=True)
class TensorPair:
    """Two values that must agree: the reference and the twin under test."""

    name: str
    reference: np.ndarray
    candidate: np.ndarray
    # Overrides the check's kind for this pair (e.g. "exact" for a step count).
    kind: str | None = None
    # Divides max |diff| in place of max |reference|, for a tensor that is
    # zero in exact arithmetic, where both sides hold only rounding noise.
    scale: float | None = None


@dataclass(frozen=True)
class Check:
    """One comparison on a rung of the ladder."""

    rung: int
    name: str
    # Key into TOLERANCES[dtype]: "forward", "gradient", "training" or "exact".
    kind: str
    compute: Callable[[Fixture], list[TensorPair]] = field(repr=False)
    # Checks that need adapters are skipped when the fixture has no LoRA rank.
    uses_lora: bool = False


@dataclass(frozen=True)
class Result:
    """The outcome of comparing one tensor pair."""

    rung: int
    check: str
    tensor: str
    dtype: str
    max_abs: float
    max_rel: float
    tolerance: float
    passed: bool
    # Index of the worst element and both values there, or an error message.
    detail: str

    def describe(self) -> str:
        """Format the result as one line for a failure message."""
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"rung {self.rung} {self.check} [{self.dtype}] {self.tensor}: "
            f"{verdict}, max abs {self.max_abs:.3e}, max rel {self.max_rel:.3e}, "
            f"tolerance {self.tolerance:.0e}; {self.detail}"
        )


def compare(
    pair: TensorPair, *, rung: int, check: str, dtype: str, kind: str
) -> Result:
    """Compare one pair: max relative error = max |diff| / max |reference|.

    A shape mismatch, a NaN or an infinity fails outright. Failures name the
    worst element's index and both values there.
    """
    kind = pair.kind or kind
    tolerance = TOLERANCES[dtype][kind]
    reference = np.asarray(pair.reference)
    candidate = np.asarray(pair.candidate)

    def result(max_abs: float, max_rel: float, passed: bool, detail: str) -> Result:
        return Result(
            rung, check, pair.name, dtype, max_abs, max_rel, tolerance, passed, detail
        )

    if reference.shape != candidate.shape:
        detail = f"shapes differ: reference {reference.shape}, twin {candidate.shape}"
        return result(np.inf, np.inf, False, detail)
    if reference.size == 0:
        return result(0.0, 0.0, True, "empty")

    ref64 = reference.astype(np.float64)
    cand64 = candidate.astype(np.float64)
    if not (np.all(np.isfinite(ref64)) and np.all(np.isfinite(cand64))):
        index = _first_nonfinite(ref64, cand64)
        detail = (
            f"non-finite value at {index}: reference {ref64[index]!r}, "
            f"twin {cand64[index]!r}"
        )
        return result(np.nan, np.nan, False, detail)

    diff = np.abs(ref64 - cand64)
    index = np.unravel_index(int(np.argmax(diff)), diff.shape)
    max_abs = float(diff[index])
    scale = float(np.max(np.abs(ref64))) if pair.scale is None else pair.scale
    if scale > 0:
        max_rel = max_abs / scale
    else:
        max_rel = 0.0 if max_abs == 0 else np.inf
    passed = max_abs == 0 if kind == "exact" else max_rel <= tolerance
    detail = (
        f"worst at index {tuple(int(i) for i in index)}: reference "
        f"{ref64[index]!r}, twin {cand64[index]!r}"
    )
    return result(max_abs, max_rel, passed, detail)


def _first_nonfinite(a: np.ndarray, b: np.ndarray) -> tuple[int, ...]:
    bad = ~(np.isfinite(a) & np.isfinite(b))
    return tuple(int(i) for i in np.argwhere(bad)[0])


@contextlib.contextmanager
def ladder_settings() -> Iterator[None]:
    """Pin float32 matmuls to full precision and torch to one thread.

    The ladder's tensors are tiny, so torch's intra-op threads cannot help,
    and while other processes load the cores they spin and slow each step
    of the training rung from 15 ms to 0.5 s (measured on 2 shared cores).
    Both settings are restored on exit.
    """
    previous_precision = torch.get_float32_matmul_precision()
    previous_threads = torch.get_num_threads()
    torch.set_float32_matmul_precision("highest")
    torch.set_num_threads(1)
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        torch.set_num_threads(previous_threads)


def run_check(check: Check, fixture: Fixture, *, catch: bool = False) -> list[Result]:
    """Run one check on a fixture and compare every pair it produces.

    Args:
        check: the check to run.
        fixture: dtype, inputs and weights to run it on.
        catch: turn an exception into one failed result (for the report)
            instead of raising it (for pytest, which shows the traceback).

    Returns:
        One ``Result`` per tensor pair.
    """
    try:
        with ladder_settings():
            pairs = check.compute(fixture)
    except Exception as error:
        if not catch:
            raise
        tolerance = TOLERANCES[fixture.dtype][check.kind]
        detail = f"raised {type(error).__name__}: {error}"
        failed = Result(
            check.rung, check.name, "-", fixture.dtype, np.nan, np.nan,
            tolerance, False, detail,
        )  # fmt: skip
        return [failed]
    return [
        compare(
            pair,
            rung=check.rung,
            check=check.name,
            dtype=fixture.dtype,
            kind=check.kind,
        )  # fmt: skip
        for pair in pairs
    ]


def assert_passed(results: list[Result]) -> None:
    """Raise AssertionError listing every failed result."""
    failed = [result.describe() for result in results if not result.passed]
    if failed:
        raise AssertionError("parity check failed:\n" + "\n".join(failed))


# Prime-like sizes, so that a swapped axis changes a shape and fails loudly.
VOCAB_SIZE = 37
MODEL_DIM = 35  # 5 heads of 7
NUM_HEADS = 5
FF_DIM = 23
MAX_LENGTH = 32
# Source and target lengths per row of the batch of 3: rows 1 and 2 are padded.
# With BOS and EOS the padded batch has S = 11 and T = 13.
SOURCE_LENGTHS = (11, 8, 5)
TARGET_LENGTHS = (12, 9, 4)
LABEL_SMOOTHING = 0.1
LORA_ALPHA = 8.0
# Float64 models use the manual attention path in both twins, because the JAX
# fused path is only float32-accurate there (see TOLERANCES). Rung 2 still
# checks the fused paths in float64, and the float32 tier runs models fused.
FLOAT64_MODEL_CHANGES = {"attention": "manual"}
# LoRA models have untied embeddings, so the LoRA rungs also cover the
# source embedding and output projection that the tied base model lacks.
LORA_MODEL_CHANGES = {"share_embeddings": False, "tie_output": False}


def ladder_model_config(**changes: object) -> ModelConfig:
    """Return the ladder's model (2 + 2 layers, dropout off) with ``changes``."""
    config = ModelConfig(
        source_vocab_size=VOCAB_SIZE,
        target_vocab_size=VOCAB_SIZE,
        model_dim=MODEL_DIM,
        num_heads=NUM_HEADS,
        ff_dim=FF_DIM,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_length=MAX_LENGTH,
        dropout=0.0,
        embedding_dropout=0.0,
        attention_dropout=0.0,
    )
    return config.replace(**changes)


def random_batch(
    rng: np.random.Generator,
    source_lengths: tuple[int, ...],
    target_lengths: tuple[int, ...],
) -> Batch:
    """Draw a padded batch of random non-special tokens with the given lengths."""
    low = len(SPECIAL_TOKENS)
    sources = [rng.integers(low, VOCAB_SIZE, n, dtype=np.int32) for n in source_lengths]
    targets = [rng.integers(low, VOCAB_SIZE, n, dtype=np.int32) for n in target_lengths]
    return make_batch(sources, targets)


class Fixture:
    """Inputs and weights shared by every check of one dtype.

    Weights are initialised once per model variant by the torch twin, in
    float64, and rounded to the fixture's dtype; the JAX twin receives the same
    values through ``parity.convert``. Biases and LayerNorm parameters start at
    0 and 1, which would hide a swapped or missing parameter, so they are
    redrawn at random, and LoRA B (zero at initialisation) is drawn at random
    so that the adapters change the output. Models with LoRA have untied
    embeddings (``LORA_MODEL_CHANGES``), and float64 models use manual
    attention (``FLOAT64_MODEL_CHANGES``).
    """

    def __init__(self, dtype: str, lora_rank: int = 4, seed: int = 0) -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if lora_rank < 0:
            raise ConfigError(f"lora rank must be >= 0 (0 skips LoRA), got {lora_rank}")
        self.dtype = dtype
        self.lora_rank = lora_rank
        self.seed = seed
        self.batch = random_batch(self.rng("batch"), SOURCE_LENGTHS, TARGET_LENGTHS)
        self._models: dict[tuple, Any] = {}
        self._memo: dict[Hashable, Any] = {}

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def rng(self, name: str) -> np.random.Generator:
        """Return a generator seeded by the fixture seed and ``name``."""
        return np.random.default_rng([self.seed, zlib.crc32(name.encode())])

    def normal(
        self, name: str, shape: tuple[int, ...], scale: float = 1.0
    ) -> np.ndarray:
        """Draw a standard normal array times ``scale`` in the fixture's dtype."""
        values = self.rng(name).standard_normal(shape) * scale
        return values.astype(self.dtype)

    def lora_config(self) -> LoraConfig:
        """Return adapters of the fixture's rank on every linear layer."""
        if self.lora_rank == 0:
            raise ConfigError("this check needs LoRA, but the fixture has rank 0")
        return LoraConfig(rank=self.lora_rank, alpha=LORA_ALPHA, targets=(ALL_LINEAR,))

    def torch_model(self, lora: bool = False, **changes: object) -> Any:
        """Return a fresh copy of the torch model variant, in eval mode."""
        key = (lora, tuple(sorted(changes.items())))
        if key not in self._models:
            self._models[key] = self._build_torch_model(lora, changes)
        return copy.deepcopy(self._models[key]).eval()

    def memo(self, key: Hashable, compute: Callable[[], T]) -> T:
        """Return ``compute()``, computed once per key for this fixture.

        For results that several checks compare and none modifies.
        """
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def jax_model(self, lora: bool = False, **changes: object) -> tuple[Any, Any]:
        """Return (params, adapters or None) converted from ``torch_model``."""
        return torch_to_jax(self.torch_model(lora, **changes))

    def _build_torch_model(self, lora: bool, changes: dict) -> Any:
        if lora:
            changes = {**LORA_MODEL_CHANGES, **changes}
        if self.dtype == "float64":
            changes = {**FLOAT64_MODEL_CHANGES, **changes}
        config = ladder_model_config(**changes)
        generator = torch.Generator().manual_seed(self.seed)
        model = torch_impl.model.Transformer(config, torch.float64, generator)
        if lora:
            torch_impl.lora.inject_lora(model, self.lora_config(), generator)
        rng = self.rng("model parameters")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if parameter.dim() == 1 or name.endswith("lora_B"):
                    noise = rng.standard_normal(tuple(parameter.shape)) * 0.1
                    parameter.add_(torch.from_numpy(noise))
        return model.to(self.torch_dtype)


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _tensor(array: np.ndarray) -> torch.Tensor:
    # A copy: torch.from_numpy shares memory, and in-place updates such as
    # gradient clipping would otherwise reach the JAX twin's inputs.
    return torch.from_numpy(np.array(array, copy=True))


def _ids(array: np.ndarray) -> torch.Tensor:
    # torch embeddings and gather want int64; the JAX twin takes the int32 ids.
    return torch.from_numpy(array.astype(np.int64))


def _to_torch_layout(x: Any) -> np.ndarray:
    # JAX attention (B, Q, H, E) -> torch (B, H, Q, E).
    return np.swapaxes(_numpy(x), 1, 2)


# Rung 1: embeddings with position encoding, LayerNorm, feed-forward.


def _embedding_pairs(fx: Fixture) -> list[TensorPair]:
    model = fx.torch_model()
    params, _ = fx.jax_model()
    config = model.config
    torch_table = torch_impl.layers.sinusoidal_position_encoding(
        MAX_LENGTH, MODEL_DIM, fx.torch_dtype
    )
    jax_table = jax_impl.layers.sinusoidal_position_encoding(
        MAX_LENGTH, MODEL_DIM, fx.dtype
    )
    pairs = [TensorPair("position encoding", _numpy(torch_table), _numpy(jax_table))]
    for name in ("source_ids", "target_input_ids"):
        ids = getattr(fx.batch, name)
        reference = model.target_embedding(_ids(ids))
        candidate = jax_impl.layers.embed(
            params["target_embedding"], jnp.asarray(ids), config=config
        )
        pairs.append(TensorPair(f"embed {name}", _numpy(reference), _numpy(candidate)))
    return pairs


def _layer_norm_pairs(fx: Fixture) -> list[TensorPair]:
    model = fx.torch_model()
    params, _ = fx.jax_model()
    norm = model.encoder.layers[0].self_attention_norm
    norm_params = params["encoder"]["layers_0"]["self_attention_norm"]
    shape = (3, 11, MODEL_DIM)
    # With mean 30 and std 1, E[x^2] - E[x]^2 (Flax's fast variance) is off
    # by ~1e-4 in float32 while the two-pass formula of both twins stays near
    # 1e-6, so this input distinguishes the two formulas. A larger mean/std ratio
    # makes x - mean itself lose digits in float32, for any formula.
    inputs = {
        "layer norm": fx.normal("layer norm", shape, 3.0) + 2.0,
        "layer norm, mean 30": fx.normal("offset", shape) + 30.0,
    }
    pairs = []
    for name, x in inputs.items():
        reference = norm(_tensor(x))
        candidate = jax_impl.layers.layer_norm(
            norm_params, jnp.asarray(x), model.config.layer_norm_eps
        )
        pairs.append(TensorPair(name, _numpy(reference), _numpy(candidate)))
    return pairs


def _feed_forward_pairs(fx: Fixture) -> list[TensorPair]:
    model = fx.torch_model()
    params, _ = fx.jax_model()
    x = fx.normal("feed forward", (3, 11, MODEL_DIM))
    reference = model.encoder.layers[0].feed_forward(_tensor(x))
    candidate = jax_impl.layers.feed_forward(
        params["encoder"]["layers_0"]["feed_forward"],
        jnp.asarray(x),
        config=model.config,
    )
    return [TensorPair("feed forward", _numpy(reference), _numpy(candidate))]


# Rung 2: attention, four paths, three kinds of mask.


def _attention_masks(fx: Fixture) -> dict[str, tuple[np.ndarray, int]]:
    # name -> (mask broadcastable to (B, H, Q, K), key length K); True = attend.
    source_mask = (fx.batch.source_ids != PAD_ID)[:, None, None, :]
    target_ids = fx.batch.target_input_ids
    length = target_ids.shape[1]
    causal = np.tril(np.ones((length, length), dtype=bool))[None, None]
    self_mask = causal & (target_ids != PAD_ID)[:, None, None, :]
    no_keys = np.broadcast_to(source_mask, (3, 1, length, source_mask.shape[-1]))
    no_keys = no_keys.copy()
    no_keys[1, :, 4, :] = False  # query 4 of row 1 may attend to nothing
    no_keys[2, :, 0, :] = False
    return {
        "source padding": (source_mask, source_mask.shape[-1]),
        "causal and target padding": (self_mask, length),
        "query row with every key masked": (no_keys, no_keys.shape[-1]),
    }


def _attend_pairs(fx: Fixture) -> list[TensorPair]:
    pairs = []
    queries = fx.normal("query", (3, NUM_HEADS, 13, 7))
    for name, (mask, key_length) in _attention_masks(fx).items():
        key = fx.normal(f"key {key_length}", (3, NUM_HEADS, key_length, 7))
        value = fx.normal(f"value {key_length}", (3, NUM_HEADS, key_length, 7))
        torch_args = (_tensor(queries), _tensor(key), _tensor(value), _tensor(mask))
        jax_args = [jnp.asarray(np.swapaxes(a, 1, 2)) for a in (queries, key, value)]
        jax_args.append(jnp.asarray(mask))
        reference = _numpy(torch_impl.attention.attend_manual(*torch_args))
        candidates = {
            "torch fused": _numpy(torch_impl.attention.attend_fused(*torch_args)),
            "JAX manual": _to_torch_layout(jax_impl.attention.attend_manual(*jax_args)),
            "JAX fused": _to_torch_layout(jax_impl.attention.attend_fused(*jax_args)),
        }
        for path, candidate in candidates.items():
            kind = "fused softmax" if path == "JAX fused" else None
            pairs.append(TensorPair(f"{name}: {path}", reference, candidate, kind))
    return pairs


def _multi_head_pairs(fx: Fixture) -> list[TensorPair]:
    pairs = []
    model = fx.torch_model()
    params, _ = fx.jax_model()
    masks = _attention_masks(fx)
    x = fx.normal("attention input", (3, 13, MODEL_DIM))
    memory = fx.normal("memory", (3, 11, MODEL_DIM))
    layer = model.decoder.layers[0]
    layer_params = params["decoder"]["layers_0"]
    cases = {
        "self-attention, causal": (
            "self_attention",
            x,
            masks["causal and target padding"][0],
        ),
        "cross-attention, padding": (
            "cross_attention",
            memory,
            masks["source padding"][0],
        ),
    }
    for name, (module, key_value, mask) in cases.items():
        for path in ("manual", "fused"):
            reference = getattr(layer, module)(
                _tensor(x), _tensor(key_value), _tensor(mask), attention=path
            )
            candidate, _ = jax_impl.attention.multi_head_attention(
                layer_params[module],
                jnp.asarray(x),
                jnp.asarray(key_value),
                jnp.asarray(mask),
                config=model.config.replace(attention=path),
            )
            kind = "fused softmax" if path == "fused" else None
            pair = TensorPair(
                f"{name}, {path}", _numpy(reference), _numpy(candidate), kind
            )
            pairs.append(pair)
    return pairs


def _torch_reference_attention_pairs(fx: Fixture) -> list[TensorPair]:
    # torch.nn.MultiheadAttention against the torch twin. Its masks mean the
    # opposite of ours (True = may not attend), and a fully masked row gives
    # NaN there, so only the two masks without such a row are compared.
    model = fx.torch_model()
    masks = _attention_masks(fx)
    x = fx.normal("attention input", (3, 13, MODEL_DIM))
    memory = fx.normal("memory", (3, 11, MODEL_DIM))
    layer = model.decoder.layers[0]
    cases = {
        "self-attention, causal": (
            "self_attention",
            x,
            masks["causal and target padding"][0],
        ),
        "cross-attention, padding": (
            "cross_attention",
            memory,
            masks["source padding"][0],
        ),
    }
    pairs = []
    for name, (module, key_value, mask) in cases.items():
        twin = getattr(layer, module)
        reference_module = _torch_multihead_attention(twin, fx.torch_dtype)
        blocked = np.broadcast_to(~mask, (3, NUM_HEADS, 13, key_value.shape[1]))
        blocked = _tensor(blocked.reshape(3 * NUM_HEADS, 13, key_value.shape[1]))
        reference, _ = reference_module(
            _tensor(x), _tensor(key_value), _tensor(key_value),
            attn_mask=blocked, need_weights=False,
        )  # fmt: skip
        candidate = twin(_tensor(x), _tensor(key_value), _tensor(mask))
        pairs.append(TensorPair(name, _numpy(reference), _numpy(candidate)))
    return pairs


def _torch_multihead_attention(twin: Any, dtype: torch.dtype) -> torch.nn.Module:
    reference = torch.nn.MultiheadAttention(
        MODEL_DIM, NUM_HEADS, batch_first=True, dtype=dtype
    )
    projections = [twin.query, twin.key, twin.value]
    with torch.no_grad():
        reference.in_proj_weight.copy_(torch.cat([p.weight for p in projections]))
        reference.in_proj_bias.copy_(torch.cat([p.bias for p in projections]))
        reference.out_proj.weight.copy_(twin.output.weight)
        reference.out_proj.bias.copy_(twin.output.bias)
    return reference.eval()


def _flax_reference_attention_pairs(fx: Fixture) -> list[TensorPair]:
    # flax.linen.MultiHeadDotProductAttention against the JAX twin. Flax
    # averages the values of a fully masked row instead of returning zeros,
    # so only the two masks without such a row are compared.
    model = fx.torch_model()
    model_config = model.config  # manual attention in float64, fused in float32
    params, _ = fx.jax_model()
    masks = _attention_masks(fx)
    x = jnp.asarray(fx.normal("attention input", (3, 13, MODEL_DIM)))
    memory = jnp.asarray(fx.normal("memory", (3, 11, MODEL_DIM)))
    layer = params["decoder"]["layers_0"]
    cases = {
        "self-attention, causal": (
            "self_attention",
            x,
            masks["causal and target padding"][0],
        ),
        "cross-attention, padding": (
            "cross_attention",
            memory,
            masks["source padding"][0],
        ),
    }
    module = flax.linen.MultiHeadDotProductAttention(
        num_heads=NUM_HEADS, qkv_features=MODEL_DIM, out_features=MODEL_DIM,
        dtype=fx.dtype, param_dtype=fx.dtype, deterministic=True,
    )  # fmt: skip
    pairs = []
    for name, (path, key_value, mask) in cases.items():
        flax_params = _flax_attention_params(layer[path])
        reference = module.apply(
            {"params": flax_params}, x, key_value, key_value, mask=jnp.asarray(mask)
        )
        candidate, _ = jax_impl.attention.multi_head_attention(
            layer[path], x, key_value, jnp.asarray(mask), config=model_config
        )
        pairs.append(TensorPair(name, _numpy(reference), _numpy(candidate)))
    return pairs


def _flax_attention_params(params: dict) -> dict:
    # Flax keeps heads as their own axes: query/key/value kernel (D, H, E) and
    # bias (H, E); the output kernel (H, E, D).
    heads = (NUM_HEADS, MODEL_DIM // NUM_HEADS)
    converted = {
        name: {
            "kernel": params[name]["kernel"].reshape((MODEL_DIM, *heads)),
            "bias": params[name]["bias"].reshape(heads),
        }
        for name in ("query", "key", "value")
    }
    converted["out"] = {
        "kernel": params["output"]["kernel"].reshape((*heads, MODEL_DIM)),
        "bias": params["output"]["bias"],
    }
    return converted


# Rung 3: one encoder layer and one decoder layer, post-LN and pre-LN.


def _layer_pairs(fx: Fixture) -> list[TensorPair]:
    masks = _attention_masks(fx)
    source_mask = masks["source padding"][0]
    self_mask = masks["causal and target padding"][0]
    x_source = fx.normal("encoder layer input", (3, 11, MODEL_DIM))
    x_target = fx.normal("decoder layer input", (3, 13, MODEL_DIM))
    memory = fx.normal("memory", (3, 11, MODEL_DIM))
    pairs = []
    for norm_position in ("post", "pre"):
        model = fx.torch_model(norm_position=norm_position)
        params, _ = fx.jax_model(norm_position=norm_position)
        config = model.config
        reference = model.encoder.layers[1](_tensor(x_source), _tensor(source_mask))
        candidate = jax_impl.layers.encoder_layer(
            params["encoder"]["layers_1"],
            jnp.asarray(x_source),
            jnp.asarray(source_mask),
            config=config,
        )
        name = f"encoder layer, {norm_position}-LN"
        pairs.append(TensorPair(name, _numpy(reference), _numpy(candidate)))
        reference = model.decoder.layers[1](
            _tensor(x_target), _tensor(memory), _tensor(self_mask), _tensor(source_mask)
        )
        candidate, _ = jax_impl.layers.decoder_layer(
            params["decoder"]["layers_1"],
            jnp.asarray(x_target),
            jnp.asarray(memory),
            jnp.asarray(self_mask),
            jnp.asarray(source_mask),
            config=config,
        )
        name = f"decoder layer, {norm_position}-LN"
        pairs.append(TensorPair(name, _numpy(reference), _numpy(candidate)))
    return pairs


# Rung 4: full-model logits.

# Model variants of the full-model rungs: name -> ModelConfig changes.
MODEL_VARIANTS: dict[str, dict[str, object]] = {
    "tied embeddings": {},
    "untied embeddings": {"share_embeddings": False, "tie_output": False},
    "pre-LN, manual attention": {"norm_position": "pre", "attention": "manual"},
}


def _logits_pairs(fx: Fixture) -> list[TensorPair]:
    pairs = []
    for name, changes in MODEL_VARIANTS.items():
        model = fx.torch_model(**changes)
        params, _ = fx.jax_model(**changes)
        pairs.append(TensorPair(name, *_both_logits(fx, model, params, None)))
    return pairs


def _both_logits(
    fx: Fixture, model: Any, params: Any, adapters: Any
) -> tuple[np.ndarray, np.ndarray]:
    # (torch logits, JAX logits) for the fixture batch, (B, T, V) each.
    batch = fx.batch
    reference = model(_ids(batch.source_ids), _ids(batch.target_input_ids))
    candidate = jax_impl.model.forward(
        params,
        jnp.asarray(batch.source_ids),
        jnp.asarray(batch.target_input_ids),
        config=model.config,
        adapters=adapters,
        lora_config=getattr(model, "lora_config", None),
    )
    return _numpy(reference), _numpy(candidate)


# Rung 5: the label-smoothed loss with padding.


def _loss_pairs(fx: Fixture) -> list[TensorPair]:
    logits = fx.normal("logits", (3, 13, VOCAB_SIZE), 3.0)
    labels = fx.batch.target_output_ids
    pairs = []
    for reduction in ("mean", "sum"):
        reference = torch_impl.loss.label_smoothed_cross_entropy(
            _tensor(logits), _ids(labels), LABEL_SMOOTHING, reduction=reduction
        )
        candidate = jax_impl.loss.label_smoothed_cross_entropy(
            jnp.asarray(logits),
            jnp.asarray(labels),
            smoothing=LABEL_SMOOTHING,
            reduction=reduction,
        )
        name = f"{reduction} over non-padding tokens"
        pairs.append(TensorPair(name, _numpy(reference), _numpy(candidate)))
    model = fx.torch_model()
    params, _ = fx.jax_model()
    reference = _torch_loss(model, fx.batch)
    candidate, _ = _jax_base_value_and_grad(
        params, None, _jax_batch(fx.batch), config=model.config, lora_config=None
    )
    pairs.append(TensorPair("full model", _numpy(reference), _numpy(candidate)))
    return pairs


def _torch_reference_loss_pairs(fx: Fixture) -> list[TensorPair]:
    # F.cross_entropy smooths over all V classes too; ignore_index replaces
    # its default of -100 with our padding id.
    logits = _tensor(fx.normal("logits", (3, 13, VOCAB_SIZE), 3.0))
    labels = _ids(fx.batch.target_output_ids)
    reference = F.cross_entropy(
        logits.reshape(-1, VOCAB_SIZE),
        labels.reshape(-1),
        ignore_index=PAD_ID,
        label_smoothing=LABEL_SMOOTHING,
    )
    candidate = torch_impl.loss.label_smoothed_cross_entropy(
        logits, labels, LABEL_SMOOTHING
    )
    return [TensorPair("F.cross_entropy, mean", _numpy(reference), _numpy(candidate))]


def _torch_loss(model: Any, batch: Batch) -> torch.Tensor:
    logits = model(_ids(batch.source_ids), _ids(batch.target_input_ids))
    return torch_impl.loss.label_smoothed_cross_entropy(
        logits, _ids(batch.target_output_ids), LABEL_SMOOTHING
    )


def _jax_loss(
    params: Any,
    adapters: Any,
    batch: tuple[jax.Array, jax.Array, jax.Array],
    config: ModelConfig,
    lora_config: LoraConfig | None,
) -> jax.Array:
    # batch: source ids, target input ids, labels.
    source_ids, target_input_ids, labels = batch
    logits = jax_impl.model.forward(
        params,
        source_ids,
        target_input_ids,
        config=config,
        adapters=adapters,
        lora_config=lora_config,
    )
    return jax_impl.loss.label_smoothed_cross_entropy(
        logits, labels, smoothing=LABEL_SMOOTHING
    )


# Compiled once per config, dtype and batch shape, and shared by the loss,
# gradient, training and LoRA rungs. Eager autodiff of the whole model is far
# slower on a CPU.
_STATIC = ("config", "lora_config")
_jax_base_value_and_grad = jax.jit(
    jax.value_and_grad(_jax_loss), static_argnames=_STATIC
)
_jax_lora_value_and_grad = jax.jit(
    jax.value_and_grad(_jax_loss, argnums=(0, 1)), static_argnames=_STATIC
)


def _jax_batch(batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        jnp.asarray(batch.source_ids),
        jnp.asarray(batch.target_input_ids),
        jnp.asarray(batch.target_output_ids),
    )


# Rung 6: gradients.


def _base_gradient_pairs(fx: Fixture) -> list[TensorPair]:
    # Tied embeddings: target_embedding's gradient sums three uses (source and
    # target lookups, output projection). The LoRA check covers untied ones.
    model = fx.torch_model()
    params, _ = fx.jax_model()
    _torch_loss(model, fx.batch).backward()
    reference = {name: p.grad for name, p in model.named_parameters()}
    _, grads = _jax_base_value_and_grad(
        params, None, _jax_batch(fx.batch), config=model.config, lora_config=None
    )
    candidate, _ = tree_to_tensors(grads, None, model.config)
    return _gradient_pairs("", reference, candidate)


def _lora_gradient_pairs(fx: Fixture) -> list[TensorPair]:
    # Gradients of every base and adapter tensor of the untied LoRA model.
    # Training freezes the base; here torch computes its gradients too.
    model = fx.torch_model(lora=True)
    params, adapters = fx.jax_model(lora=True)
    lora_config = fx.lora_config()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    _torch_loss(model, fx.batch).backward()
    reference = {name: p.grad for name, p in model.named_parameters()}
    _, (base_grads, adapter_grads) = _jax_lora_value_and_grad(
        params,
        adapters,
        _jax_batch(fx.batch),
        config=model.config,
        lora_config=lora_config,
    )
    base, adapter = tree_to_tensors(
        base_grads, adapter_grads, model.config, lora_config
    )
    return _gradient_pairs("", reference, {**base, **adapter})


def _gradient_pairs(
    prefix: str, reference: dict[str, Any], candidate: dict[str, Any]
) -> list[TensorPair]:
    """Pair gradients by checkpoint name; a name missing in JAX raises KeyError.

    The gradient of a key bias is zero in exact arithmetic: it adds the same
    q . b_k to every score of a query row, which softmax ignores. Both twins
    return rounding noise there, so that noise is measured against the largest
    gradient of the same layer's key weight.
    """
    pairs = []
    for name, value in reference.items():
        scale = None
        if name.endswith("key.bias"):
            weight = reference[name.removesuffix("bias") + "weight"]
            scale = float(np.max(np.abs(_numpy(weight))))
        pair = TensorPair(prefix + name, _numpy(value), _numpy(candidate[name]))
        pairs.append(dataclasses.replace(pair, scale=scale))
    return pairs


# Rung 7: optimizer steps and the learning-rate schedule.

# Warmup of 4 steps gives step 1 a learning rate of 0.02, so the update is
# large against the rounding of the parameters themselves.
OPTIMIZER_CONFIG = TrainConfig(warmup_steps=4)
# Random gradients of norm ~1.4 (0.01 x sqrt(~20k parameters)) are clipped to 0.5.
CLIPPED_CONFIG = TrainConfig(warmup_steps=4, clip_grad_norm=0.5)
SCHEDULE_STEPS = (1, 2, 3, 4, 5, 8, 50, 1000)


def _optimizer_pairs(fx: Fixture) -> list[TensorPair]:
    pairs = []
    for name, train_config in (("", OPTIMIZER_CONFIG), ("clipped, ", CLIPPED_CONFIG)):
        snapshots = _optimizer_snapshots(fx, train_config)
        for step in (1, 3):
            torch_state, jax_state = snapshots[step]
            for key in ("parameters", "exp_avg", "exp_avg_sq"):
                prefix = f"{name}step {step}, {key}: "
                pairs += _named_pairs(prefix, torch_state[key], jax_state[key])
    return pairs


def _random_gradients(fx: Fixture, model: Any, step: int) -> dict[str, np.ndarray]:
    return {
        name: fx.normal(f"gradient {step} {name}", tuple(p.shape), 0.01)
        for name, p in model.named_parameters()
    }


def _optimizer_snapshots(
    fx: Fixture, train_config: TrainConfig
) -> dict[int, tuple[dict, dict]]:
    # Two checks compare the same three steps, so they run once per fixture.
    key = ("optimizer snapshots", train_config)
    return fx.memo(key, lambda: _run_optimizers(fx, train_config))


def _run_optimizers(
    fx: Fixture, train_config: TrainConfig, steps: int = 3
) -> dict[int, tuple[dict, dict]]:
    """Step both twins' optimizers on the same random gradients.

    Returns:
        step -> (torch state, JAX state), each {"parameters", "exp_avg",
        "exp_avg_sq"} -> {checkpoint name: array}.
    """
    model = fx.torch_model()
    params, _ = fx.jax_model()
    parameters = dict(model.named_parameters())
    optimizer, scheduler = torch_impl.optim.make_optimizer(
        parameters.values(), train_config, MODEL_DIM
    )
    opt_state = jax_impl.optim.make_optimizer(train_config, MODEL_DIM).init(params)
    specs = base_tensor_specs(model.config)
    snapshots = {}
    for step in range(1, steps + 1):
        gradients = _random_gradients(fx, model, step)
        for name, parameter in parameters.items():
            parameter.grad = _tensor(gradients[name])
        torch_impl.optim.clip_gradients(
            parameters.values(), train_config.clip_grad_norm
        )
        optimizer.step()
        scheduler.step()
        tree = tensors_to_tree(gradients, specs, source="gradients")
        params, opt_state = _jax_optimizer_step(
            params, opt_state, tree, train_config=train_config
        )
        snapshots[step] = (
            _torch_optimizer_state(parameters, optimizer),
            _jax_optimizer_state(params, opt_state, model.config),
        )
    return snapshots


@functools.partial(jax.jit, static_argnames=("train_config",))
def _jax_optimizer_step(
    params: Any, opt_state: Any, grads: Any, *, train_config: TrainConfig
) -> tuple[Any, Any]:
    transform = jax_impl.optim.make_optimizer(train_config, MODEL_DIM)
    updates, opt_state = transform.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _torch_optimizer_state(
    parameters: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> dict[str, dict[str, np.ndarray]]:
    # Copies, because the optimizer updates its tensors in place.
    state = {"parameters": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, parameter in parameters.items():
        state["parameters"][name] = _numpy(parameter).copy()
        for key in ("exp_avg", "exp_avg_sq"):
            state[key][name] = _numpy(optimizer.state[parameter][key]).copy()
    return state


def _jax_optimizer_state(
    params: Any, opt_state: Any, config: ModelConfig
) -> dict[str, dict[str, np.ndarray]]:
    return {
        "parameters": tree_to_tensors(params, None, config)[0],
        "exp_avg": tree_to_tensors(_adam_moment(opt_state, "mu"), None, config)[0],
        "exp_avg_sq": tree_to_tensors(_adam_moment(opt_state, "nu"), None, config)[0],
    }


def _adam_moment(opt_state: Any, name: str) -> Any:
    # The single ScaleByAdamState inside the optax chain contains mu and nu.
    return optax.tree_utils.tree_get(opt_state, name)


def _reference_optimizer_pairs(fx: Fixture) -> list[TensorPair]:
    # torch.optim.Adam and optax.adam, given the schedule's rate at each step,
    # against each twin's optimizer after three steps.
    train_config = OPTIMIZER_CONFIG
    model = fx.torch_model()
    params, _ = fx.jax_model()
    parameters = dict(model.named_parameters())
    plain = torch.optim.Adam(
        parameters.values(), lr=1.0, betas=(0.9, 0.98), eps=train_config.adam_eps
    )
    # The rate is a hyperparameter set before each step, so the step compiles
    # once. optax.adam itself runs unchanged.
    transform = optax.inject_hyperparams(optax.adam)(
        learning_rate=0.0, b1=0.9, b2=0.98, eps=train_config.adam_eps
    )
    opt_state = transform.init(params)
    specs = base_tensor_specs(model.config)
    for step in range(1, 4):
        gradients = _random_gradients(fx, model, step)
        for name, parameter in parameters.items():
            parameter.grad = _tensor(gradients[name])
        rate = _schedule(step, train_config)
        for group in plain.param_groups:
            group["lr"] = rate
        plain.step()
        tree = tensors_to_tree(gradients, specs, source="gradients")
        opt_state.hyperparams["learning_rate"] = jnp.asarray(rate, fx.dtype)
        params, opt_state = _optax_adam_step(transform, params, opt_state, tree)
    torch_twin, jax_twin = _optimizer_snapshots(fx, train_config)[3]
    reference = {name: p.detach() for name, p in parameters.items()}
    optax_params = tree_to_tensors(params, None, model.config)[0]
    return _named_pairs(
        "torch.optim.Adam vs torch twin: ", reference, torch_twin["parameters"]
    ) + _named_pairs("optax.adam vs JAX twin: ", optax_params, jax_twin["parameters"])


@functools.partial(jax.jit, static_argnums=0)
def _optax_adam_step(
    transform: optax.GradientTransformation, params: Any, opt_state: Any, grads: Any
) -> tuple[Any, Any]:
    updates, opt_state = transform.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def _schedule(step: int, train_config: TrainConfig) -> float:
    return transformer_learning_rate(
        step, MODEL_DIM, train_config.warmup_steps, train_config.lr_scale
    )


def _schedule_pairs(fx: Fixture) -> list[TensorPair]:
    # The shared schedule function is the reference for both twins.
    train_config = OPTIMIZER_CONFIG
    reference = np.array([_schedule(s, train_config) for s in SCHEDULE_STEPS])
    dummy = torch.nn.Parameter(torch.zeros(1, dtype=fx.torch_dtype))
    optimizer, scheduler = torch_impl.optim.make_optimizer(
        [dummy], train_config, MODEL_DIM
    )
    torch_rates = []
    for step in range(1, max(SCHEDULE_STEPS) + 1):
        if step in SCHEDULE_STEPS:
            torch_rates.append(optimizer.param_groups[0]["lr"])
        # Only the rate is read here, so no optimizer step precedes this.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()
    schedule = jax_impl.optim.learning_rate_schedule(train_config, MODEL_DIM)
    jax_rates = [schedule(jnp.asarray(step - 1)) for step in SCHEDULE_STEPS]
    return [
        TensorPair("torch twin", reference, np.array(torch_rates)),
        TensorPair("JAX twin", reference, np.array([_numpy(r) for r in jax_rates])),
    ]


# Rung 8: a 50-step training run on a toy task.

TRAINING_STEPS = 50
# Peak learning rate 0.1 * 35^-0.5 * 10^-0.5 = 5e-3 at step 10, with clipping.
# At lr_scale 1 (peak 0.05) this tiny model trains chaotically and float32
# rounding grows to 2e-3 in the loss by step 50.
TRAINING_CONFIG = TrainConfig(
    warmup_steps=10, lr_scale=0.1, clip_grad_norm=1.0, batch_size=8
)


def _reverse_task_batches(fx: Fixture) -> list[Batch]:
    # Reverse 3 random sequences of 3 to 9 tokens per step, padded to the
    # fixture batch's shape (S = 11, T = 13) so that the compiled gradient of
    # rung 6 serves here too.
    rng = fx.rng("reverse task")
    batches = []
    for _ in range(TRAINING_STEPS):
        lengths = tuple(int(n) for n in rng.integers(3, 10, 3))
        sources = list(random_batch(rng, lengths, lengths).source_ids)
        sources = [row[row != PAD_ID] for row in sources]
        batch = make_batch(sources, [row[::-1] for row in sources])
        batches.append(_pad_batch(batch, fx.batch))
    return batches


def _pad_batch(batch: Batch, like: Batch) -> Batch:
    # Right-pad every array of ``batch`` with PAD_ID to the shape in ``like``.
    arrays = {}
    for field_ in dataclasses.fields(Batch):
        value = getattr(batch, field_.name)
        width = getattr(like, field_.name).shape[1] - value.shape[1]
        arrays[field_.name] = np.pad(value, ((0, 0), (0, width)))
    return Batch(**arrays)


def _training_pairs(fx: Fixture) -> list[TensorPair]:
    model = fx.torch_model()
    params, _ = fx.jax_model()
    model.train()  # dropout is 0 in the ladder config; train() is the real path
    optimizer, scheduler = torch_impl.optim.make_optimizer(
        model.parameters(), TRAINING_CONFIG, MODEL_DIM
    )
    opt_state = jax_impl.optim.make_optimizer(TRAINING_CONFIG, MODEL_DIM).init(params)
    torch_losses, jax_losses = [], []
    for batch in _reverse_task_batches(fx):
        optimizer.zero_grad()
        loss = _torch_loss(model, batch)
        loss.backward()
        torch_impl.optim.clip_gradients(
            model.parameters(), TRAINING_CONFIG.clip_grad_norm
        )
        optimizer.step()
        scheduler.step()
        torch_losses.append(loss.item())

        jax_loss, grads = _jax_base_value_and_grad(
            params, None, _jax_batch(batch), config=model.config, lora_config=None
        )
        params, opt_state = _jax_optimizer_step(
            params, opt_state, grads, train_config=TRAINING_CONFIG
        )
        jax_losses.append(float(jax_loss))
    return _training_results(fx, model, params, torch_losses, jax_losses)


def _training_results(
    fx: Fixture,
    model: Any,
    params: Any,
    torch_losses: list[float],
    jax_losses: list[float],
) -> list[TensorPair]:
    # Key biases are left out: their gradient is rounding noise (see
    # _gradient_pairs), and Adam scales noise up to steps of the learning
    # rate, so each twin moves them differently. The loss does not depend on
    # them, which the final logits confirm.
    reference = {
        name: p.detach()
        for name, p in model.named_parameters()
        if not name.endswith("key.bias")
    }
    candidate, _ = tree_to_tensors(params, None, model.config)
    pairs = [
        TensorPair("loss at every step", np.array(torch_losses), np.array(jax_losses)),
        TensorPair("final logits", *_both_logits(fx, model.eval(), params, None)),
    ]
    return pairs + _named_pairs("final ", reference, candidate)


# Rung 9: LoRA merged and unmerged, adapters moved between the twins.


def _lora_merge_pairs(fx: Fixture) -> list[TensorPair]:
    model = fx.torch_model(lora=True)
    params, adapters = fx.jax_model(lora=True)
    lora_config = fx.lora_config()
    torch_unmerged, jax_unmerged = _both_logits(fx, model, params, adapters)
    torch_impl.lora.merge_lora(model)
    merged_params = jax_impl.lora.merge_lora(params, adapters, lora_config)
    torch_merged, jax_merged = _both_logits(fx, model, merged_params, None)
    merged_weights = {
        spec.name: model.state_dict()[spec.name]
        for spec in base_tensor_specs(model.config)
    }
    jax_weights, _ = tree_to_tensors(merged_params, None, model.config)
    return [
        TensorPair("torch, merged vs unmerged logits", torch_unmerged, torch_merged),
        TensorPair("JAX, merged vs unmerged logits", jax_unmerged, jax_merged),
        TensorPair("unmerged logits", torch_unmerged, jax_unmerged),
        TensorPair("merged logits", torch_merged, jax_merged),
    ] + _named_pairs("merged ", merged_weights, jax_weights)


LORA_TRAINING_STEPS = 3


def _lora_transfer_pairs(fx: Fixture) -> list[TensorPair]:
    lora_config = fx.lora_config()
    train_config = OPTIMIZER_CONFIG

    # Adapters trained in torch, loaded into JAX.
    model = fx.torch_model(lora=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = torch_impl.optim.make_optimizer(
        trainable, train_config, MODEL_DIM
    )
    for _ in range(LORA_TRAINING_STEPS):
        optimizer.zero_grad()
        _torch_loss(model, fx.batch).backward()
        optimizer.step()
        scheduler.step()
    params, adapters = torch_to_jax(model)
    from_torch = _both_logits(fx, model, params, adapters)

    # Adapters trained in JAX, loaded into torch.
    params, adapters = fx.jax_model(lora=True)
    opt_state = jax_impl.optim.make_optimizer(train_config, MODEL_DIM).init(adapters)
    for _ in range(LORA_TRAINING_STEPS):
        _, (_, grads) = _jax_lora_value_and_grad(
            params,
            adapters,
            _jax_batch(fx.batch),
            config=model.config,
            lora_config=lora_config,
        )
        adapters, opt_state = _jax_optimizer_step(
            adapters, opt_state, grads, train_config=train_config
        )
    loaded = jax_to_torch(params, adapters, model.config, lora_config)
    from_jax = _both_logits(fx, loaded, params, adapters)
    return [
        TensorPair("adapters trained in torch, logits", *from_torch),
        TensorPair("adapters trained in JAX, logits", *from_jax),
    ]


# Rung 10: decoded token ids.

MAX_NEW_TOKENS = 12
BEAM_SIZE = 3


def _pad_columns(ids: Any, width: int) -> np.ndarray:
    # Both searches may stop early; compare at a common width of PAD_ID.
    ids = _numpy(ids)
    padding = [(0, 0)] * (ids.ndim - 1) + [(0, width - ids.shape[-1])]
    return np.pad(ids, padding, constant_values=PAD_ID)


def _decoding_models(fx: Fixture) -> dict[str, tuple[Any, Any, Any]]:
    # name -> (torch model, params, adapters)
    models = {}
    for name, lora in (("base", False), ("LoRA", True)):
        if lora and fx.lora_rank == 0:
            continue
        models[name] = (fx.torch_model(lora=lora), *fx.jax_model(lora=lora))
    return models


def _greedy_pairs(fx: Fixture) -> list[TensorPair]:
    pairs = []
    source_ids = fx.batch.source_ids
    for name, (model, params, adapters) in _decoding_models(fx).items():
        reference = torch_impl.decode.greedy_search(
            model, _ids(source_ids), MAX_NEW_TOKENS
        )
        candidate = jax_impl.decode.greedy_search(
            params,
            jnp.asarray(source_ids),
            MAX_NEW_TOKENS,
            config=model.config,
            adapters=adapters,
            lora_config=getattr(model, "lora_config", None),
        )
        pairs.append(
            TensorPair(
                f"{name}, greedy ids",
                _pad_columns(reference, MAX_NEW_TOKENS),
                _pad_columns(candidate, MAX_NEW_TOKENS),
            )
        )
    return pairs


def _beam_pairs(fx: Fixture) -> list[TensorPair]:
    model = fx.torch_model()
    params, _ = fx.jax_model()
    source_ids = fx.batch.source_ids
    torch_ids, torch_scores = torch_impl.decode.beam_search(
        model, _ids(source_ids), MAX_NEW_TOKENS, BEAM_SIZE, num_return=BEAM_SIZE
    )
    jax_ids, jax_scores = jax_impl.decode.beam_search(
        params,
        jnp.asarray(source_ids),
        MAX_NEW_TOKENS,
        BEAM_SIZE,
        num_return=BEAM_SIZE,
        config=model.config,
    )
    return [
        TensorPair(
            "beam ids",
            _pad_columns(torch_ids, MAX_NEW_TOKENS),
            _pad_columns(jax_ids, MAX_NEW_TOKENS),
            kind="exact",
        ),
        TensorPair("beam scores", _numpy(torch_scores), _numpy(jax_scores)),
    ]


def _named_pairs(
    prefix: str, reference: dict[str, Any], candidate: dict[str, Any]
) -> list[TensorPair]:
    # One pair per name of ``reference``; a name missing on the candidate side
    # raises KeyError, which the report shows as a failed check.
    return [
        TensorPair(prefix + name, _numpy(value), _numpy(candidate[name]))
        for name, value in reference.items()
    ]


CHECKS: list[Check] = [
    Check(1, "embeddings", "forward", _embedding_pairs),
    Check(1, "layer norm", "forward", _layer_norm_pairs),
    Check(1, "feed-forward", "forward", _feed_forward_pairs),
    Check(2, "attention kernels", "forward", _attend_pairs),
    Check(2, "multi-head attention", "forward", _multi_head_pairs),
    Check(
        2, "vs torch.nn.MultiheadAttention", "forward", _torch_reference_attention_pairs
    ),
    Check(
        2,
        "vs flax MultiHeadDotProductAttention",
        "forward",
        _flax_reference_attention_pairs,
    ),
    Check(3, "layers", "forward", _layer_pairs),
    Check(4, "logits", "forward", _logits_pairs),
    Check(5, "loss", "forward", _loss_pairs),
    Check(5, "vs F.cross_entropy", "forward", _torch_reference_loss_pairs),
    Check(6, "base gradients", "gradient", _base_gradient_pairs),
    Check(6, "gradients with LoRA", "gradient", _lora_gradient_pairs, uses_lora=True),
    Check(7, "Adam steps", "gradient", _optimizer_pairs),
    Check(
        7, "vs torch.optim.Adam and optax.adam", "gradient", _reference_optimizer_pairs
    ),
    Check(7, "learning-rate schedule", "forward", _schedule_pairs),
    Check(8, "50-step training run", "training", _training_pairs),
    Check(9, "LoRA merge", "forward", _lora_merge_pairs, uses_lora=True),
    Check(9, "adapters across twins", "forward", _lora_transfer_pairs, uses_lora=True),
    Check(10, "greedy search", "exact", _greedy_pairs),
    Check(10, "beam search", "forward", _beam_pairs),
]
