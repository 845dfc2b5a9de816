"""The JAX twin's ``Runner``: parameters, optimizer state and a PRNG key.

Implements ``twinformer.runner.Runner`` for the command line. The model code
stays pure; this class is the one place that keeps state between calls. Its
training step is compiled once per batch shape with ``jax.jit``.

Shapes: B batch, S source length, T target length, V target vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl import decode
from jax_impl.lora import (
    adapter_tensors,
    adapters_from_tensors,
    init_lora,
    merge_lora,
)
from jax_impl.loss import label_smoothed_cross_entropy
from jax_impl.model import check_token_ids, forward, init_params, resolve_dtype
from jax_impl.optim import make_optimizer
from twinformer.config import PAD_ID, LoraConfig, ModelConfig, TrainConfig
from twinformer.data import Batch
from twinformer.errors import ConfigError, DataError
from twinformer.param_map import base_tensor_specs, from_tree, to_tree
from twinformer.schedule import transformer_learning_rate

# Sequence lengths are padded up to the next of 8, 12, 16, 24, 32, 48, ...
# (powers of two and 1.5 times powers of two) before entering a compiled
# function. That bounds the compilations of a run to a few per axis, and
# above 8 a padded length is less than 1.5 times the length itself.
MIN_LENGTH_BUCKET = 8


def length_bucket(length: int) -> int:
    """Return the smallest of 8, 12, 16, 24, 32, 48, ... that is >= ``length``."""
    bucket = MIN_LENGTH_BUCKET
    while bucket < length:
        is_power_of_two = bucket & (bucket - 1) == 0
        bucket = bucket * 3 // 2 if is_power_of_two else bucket * 4 // 3
    return bucket


Tree = dict[str, Any]

# The PRNG of the dropout keys. A mid-sized training step draws millions of
# dropout bits. JAX's default, threefry2x32, runs as a rolled loop on the
# CPU, where 22 dropout masks of (32, 32, 256) took 83 ms. Philox (also the
# family of torch's CUDA generator) took 19 ms. Initialisation keeps threefry.
DROPOUT_PRNG = "philox2x32"
BatchArrays = tuple[jax.Array, jax.Array, jax.Array]


def batch_loss(
    params: Tree,
    adapters: Tree | None,
    batch: BatchArrays,
    dropout_key: jax.Array | None,
    *,
    config: ModelConfig,
    lora_config: LoraConfig | None,
    smoothing: float,
    deterministic: bool,
    reduction: str = "mean",
) -> jax.Array:
    """Return the label-smoothed loss of a batch (mean or sum over tokens).

    Args:
        params: the base tree of ``jax_impl.model``.
        adapters: the LoRA tree, or None.
        batch: int32 (source_ids (B, S), target_input_ids (B, T),
            target_output_ids (B, T)).
        dropout_key: PRNG key, needed when ``deterministic`` is False.
        config: model shape.
        lora_config: the adapters' scaling and dropout.
        smoothing: label smoothing eps.
        deterministic: True disables dropout.
        reduction: "mean" or "sum" over non-padding tokens.
    """
    source_ids, target_input_ids, target_output_ids = batch
    logits = forward(
        params,
        source_ids,
        target_input_ids,
        config=config,
        adapters=adapters,
        lora_config=lora_config,
        dropout_key=dropout_key,
        deterministic=deterministic,
    )
    return label_smoothed_cross_entropy(
        logits, target_output_ids, smoothing, reduction=reduction
    )


def make_train_step(
    model_config: ModelConfig,
    train_config: TrainConfig,
    lora_config: LoraConfig | None,
    optimizer: optax.GradientTransformation,
) -> Callable[..., tuple[Tree, Any, jax.Array]]:
    """Build the compiled step (params, adapters, opt_state, batch, key).

    The step differentiates the mean loss per token with respect to the
    adapters when ``lora_config`` is given, and with respect to the base
    parameters otherwise; the other tree is a constant.

    Returns:
        A jitted function returning (new trainable tree, new optimizer state,
        mean loss per token).
    """
    options = dict(
        config=model_config,
        lora_config=lora_config,
        smoothing=train_config.label_smoothing,
        deterministic=False,
    )

    def mean_loss(
        trainable: Tree, frozen: Tree, batch: BatchArrays, key: jax.Array
    ) -> jax.Array:
        params, adapters = (frozen, trainable) if lora_config else (trainable, None)
        return batch_loss(params, adapters, batch, key, **options)

    @jax.jit
    def train_step(
        params: Tree,
        adapters: Tree | None,
        opt_state: Any,
        batch: BatchArrays,
        key: Any,
    ) -> tuple[Tree, Any, jax.Array]:
        trainable, frozen = (adapters, params) if lora_config else (params, adapters)
        loss, grads = jax.value_and_grad(mean_loss)(trainable, frozen, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    return train_step


class Runner:
    """A JAX model ready to train, score and decode (``twinformer.runner``).

    Attributes:
        model_config: the model's shape.
        lora_config: the adapters' settings, or None for full training.
        params: the base tree; frozen when ``lora_config`` is given.
        adapters: the adapter tree, or None.
    """

    def __init__(
        self,
        model_config: ModelConfig,
        train_config: TrainConfig,
        lora_config: LoraConfig | None = None,
        base_tensors: dict[str, np.ndarray] | None = None,
        adapter_tensors: dict[str, np.ndarray] | None = None,
        dtype: str = "float32",
    ) -> None:
        """Build the model; see ``twinformer.runner.Runner.__init__``.

        Raises:
            ConfigError: an unsupported dtype, or float64 without 64-bit JAX.
            CheckpointError: tensors missing, unexpected or mis-shaped.
            ConfigError: adapter tensors without a LoRA config.
            LoraError: a LoRA config that does not fit the model.
        """
        self.model_config = model_config
        self.train_config = train_config
        self.lora_config = lora_config
        self.dtype = resolve_dtype(dtype)
        base_key, lora_key = jax.random.split(jax.random.key(train_config.seed))
        self._key = jax.random.key(train_config.seed, impl=DROPOUT_PRNG)
        self.params = self._load_base(base_tensors, base_key)
        self.adapters = self._load_adapters(adapter_tensors, lora_key)

        self._optimizer = make_optimizer(train_config, model_config.model_dim)
        trainable = self.adapters if lora_config else self.params
        self._opt_state = self._optimizer.init(trainable)
        self._step = 0
        self._train_step = make_train_step(
            model_config, train_config, lora_config, self._optimizer
        )
        self._evaluate = jax.jit(
            batch_loss,
            static_argnames=("config", "lora_config", "deterministic", "reduction"),
        )

    def _load_base(self, tensors: dict[str, np.ndarray] | None, key: Any) -> Tree:
        if tensors is None:
            return init_params(self.model_config, key, self.dtype)
        # bfloat16 and float32 checkpoints are cast to the Runner's dtype.
        specs = base_tensor_specs(self.model_config)
        tree = to_tree(tensors, specs, source="base tensors")
        return jax.tree_util.tree_map(lambda leaf: jnp.asarray(leaf, self.dtype), tree)

    def _load_adapters(self, tensors: dict[str, np.ndarray] | None, key: Any) -> Any:
        if self.lora_config is None:
            if tensors is not None:
                raise ConfigError(
                    "adapter_tensors need a lora_config; pass both or neither"
                )
            return None
        if tensors is None:
            return init_lora(self.model_config, self.lora_config, key, self.dtype)
        return adapters_from_tensors(
            tensors, self.model_config, self.lora_config, self.dtype
        )

    def train_step(self, batch: Batch) -> float:
        """Take one optimizer step; return the mean label-smoothed loss per token."""
        arrays = self._check_batch(batch)
        self._key, step_key = jax.random.split(self._key)
        trainable, self._opt_state, loss = self._train_step(
            self.params, self.adapters, self._opt_state, arrays, step_key
        )
        if self.lora_config:
            self.adapters = trainable
        else:
            self.params = trainable
        self._step += 1
        return float(loss)

    @property
    def learning_rate(self) -> float:
        """Learning rate applied at the last ``train_step`` (0 before the first)."""
        if self._step == 0:
            return 0.0
        return transformer_learning_rate(
            self._step,
            self.model_config.model_dim,
            self.train_config.warmup_steps,
            self.train_config.lr_scale,
        )

    def evaluate_loss(self, batch: Batch) -> tuple[float, int]:
        """Return (summed loss over non-padding tokens, token count), no dropout."""
        arrays = self._check_batch(batch)
        total = self._evaluate(
            self.params,
            self.adapters,
            arrays,
            None,
            config=self.model_config,
            lora_config=self.lora_config,
            smoothing=self.train_config.label_smoothing,
            deterministic=True,
            reduction="sum",
        )
        return float(total), int(np.sum(np.asarray(arrays[2]) != PAD_ID))

    def greedy_search(self, source_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Decode greedily; (B, S) source ids -> (B, L) ids, L <= max_new_tokens."""
        ids = decode.greedy_search(
            self.params,
            self._pad_length(np.asarray(source_ids)),
            max_new_tokens,
            config=self.model_config,
            adapters=self.adapters,
            lora_config=self.lora_config,
        )
        return np.asarray(ids)

    def beam_search(
        self,
        source_ids: np.ndarray,
        max_new_tokens: int,
        beam_size: int,
        length_penalty: float = 0.6,
        num_return: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode with beam search; ids (B, num_return, L), scores (B, num_return)."""
        ids, scores = decode.beam_search(
            self.params,
            self._pad_length(np.asarray(source_ids)),
            max_new_tokens,
            beam_size,
            length_penalty,
            num_return,
            config=self.model_config,
            adapters=self.adapters,
            lora_config=self.lora_config,
        )
        return np.asarray(ids), np.asarray(scores)

    def base_tensors(self) -> dict[str, np.ndarray]:
        """Return the base weights, checkpoint names, unmerged."""
        specs = base_tensor_specs(self.model_config)
        return from_tree(jax.device_get(self.params), specs, source="base tree")

    def adapter_tensors(self) -> dict[str, np.ndarray] | None:
        """Return the LoRA tensors (None without LoRA)."""
        if self.lora_config is None:
            return None
        return adapter_tensors(self.adapters, self.model_config, self.lora_config)

    def merged_base_tensors(self) -> dict[str, np.ndarray]:
        """Return base weights with the adapters merged in (W + s B A)."""
        if self.lora_config is None:
            return self.base_tensors()
        merged = merge_lora(self.params, self.adapters, self.lora_config)
        specs = base_tensor_specs(self.model_config)
        return from_tree(jax.device_get(merged), specs, source="merged base tree")

    def parameter_counts(self) -> tuple[int, int]:
        """Return (trainable, total) parameter counts; tied tensors count once."""
        base = _count(self.params)
        if self.lora_config is None:
            return base, base
        adapters = _count(self.adapters)
        return adapters, base + adapters

    def _check_batch(self, batch: Batch) -> BatchArrays:
        config = self.model_config
        check_token_ids(
            batch.source_ids, config.source_vocab_size, config.max_length, "source_ids"
        )
        for name in ("target_input_ids", "target_output_ids"):
            check_token_ids(
                getattr(batch, name), config.target_vocab_size, config.max_length, name
            )
        shapes = [np.shape(getattr(batch, name)) for name in Batch.__dataclass_fields__]
        if shapes[1] != shapes[2] or shapes[0][0] != shapes[1][0]:
            raise DataError(
                f"batch shapes do not fit together: source {shapes[0]}, target "
                f"input {shapes[1]}, target output {shapes[2]}; the batch size must "
                "match and target input and output must have the same shape"
            )
        return tuple(
            jnp.asarray(self._pad_length(getattr(batch, name)), jnp.int32)
            for name in Batch.__dataclass_fields__
        )

    def _pad_length(self, ids: np.ndarray) -> np.ndarray:
        # Differs from the torch twin: jit compiles once per input shape, so
        # lengths are rounded up to a bucket (at most max_length). The extra
        # PAD_ID positions are masked as keys and ignored by the loss, so the
        # results do not change.
        length = ids.shape[1]
        bucket = min(length_bucket(length), self.model_config.max_length)
        if bucket <= length:
            return ids
        return np.pad(ids, ((0, 0), (0, bucket - length)), constant_values=PAD_ID)


def _count(tree: Tree) -> int:
    return int(sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree)))
