"""Typed configurations shared by the PyTorch and JAX twins.

Names used in code, and the symbols of "Attention Is All You Need" (Vaswani et
al. 2017) and "LoRA" (Hu et al. 2021) that they stand for:

    model_dim   d_model      num_heads    h          head_dim   d_k = d_v
    ff_dim      d_ff         num_*_layers N          dropout    P_drop
    lora_rank   r            lora_alpha   alpha      lora_A     A (r x in)
    lora_B      B (out x r)  scaling      alpha / r (or alpha / sqrt(r), rsLoRA)

Every config is a frozen dataclass that validates itself on creation, so a bad
value fails where it is written rather than deep inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from twinformer.errors import ConfigError

NORM_POSITIONS = ("post", "pre")
ATTENTION_PATHS = ("manual", "fused")

# Token ids reserved in every vocabulary of the project, synthetic or learned.
PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
UNK_ID = 3
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _require_positive_int(name: str, value: Any) -> None:
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"{name} must be a positive integer, got {value!r}",
    )


def _require_probability(name: str, value: Any) -> None:
    _require(
        isinstance(value, (int, float)) and 0.0 <= value < 1.0,
        f"{name} must be a probability in [0, 1), got {value!r}",
    )


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of the encoder-decoder Transformer."""

    # Vocabulary sizes, special tokens included (ids 0-3, see SPECIAL_TOKENS).
    source_vocab_size: int
    target_vocab_size: int
    # d_model: width of every residual stream, 512 in the base model.
    model_dim: int = 512
    # h: attention heads per layer; model_dim must divide by it.
    num_heads: int = 8
    # d_ff: inner width of the position-wise feed-forward network.
    ff_dim: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    # Maximum sequence length, in tokens with BOS/EOS, that the position table covers.
    max_length: int = 256
    # P_drop on each sub-layer output before the residual add (0.1 in the paper).
    dropout: float = 0.1
    # Dropout on the sum of embeddings and position encodings (0.1 in the paper).
    embedding_dropout: float = 0.1
    # Dropout on attention weights after softmax; the paper does not use it.
    attention_dropout: float = 0.0
    # "post": LayerNorm(x + sublayer(x)) as in the paper. "pre":
    # x + sublayer(LayerNorm(x)) with a final LayerNorm after each stack.
    norm_position: str = "post"
    # The paper does not give LayerNorm's epsilon; 1e-5 is torch's default and
    # both twins use this field (Flax's own default would be 1e-6).
    layer_norm_eps: float = 1e-5
    # One embedding matrix for source and target tokens (needs equal vocabularies).
    share_embeddings: bool = True
    # Output projection reuses the target embedding matrix (section 3.4).
    tie_output: bool = True
    # "manual" follows softmax(QK^T / sqrt(d_k))V step by step; "fused" calls
    # F.scaled_dot_product_attention / jax.nn.dot_product_attention.
    attention: str = "fused"

    def __post_init__(self) -> None:
        for name in (
            "source_vocab_size",
            "target_vocab_size",
            "model_dim",
            "num_heads",
            "ff_dim",
            "num_encoder_layers",
            "num_decoder_layers",
            "max_length",
        ):
            _require_positive_int(name, getattr(self, name))
        _require(
            self.model_dim % self.num_heads == 0,
            f"model_dim ({self.model_dim}) must be divisible by num_heads "
            f"({self.num_heads}); pick num_heads among the divisors of model_dim",
        )
        _require(
            self.source_vocab_size > len(SPECIAL_TOKENS)
            and self.target_vocab_size > len(SPECIAL_TOKENS),
            f"vocabulary sizes must exceed the {len(SPECIAL_TOKENS)} special tokens, "
            f"got source {self.source_vocab_size} and target {self.target_vocab_size}",
        )
        for name in ("dropout", "embedding_dropout", "attention_dropout"):
            _require_probability(name, getattr(self, name))
        _require(
            self.norm_position in NORM_POSITIONS,
            f"norm_position must be one of {NORM_POSITIONS}, "
            f"got {self.norm_position!r}",
        )
        _require(
            self.attention in ATTENTION_PATHS,
            f"attention must be one of {ATTENTION_PATHS}, got {self.attention!r}",
        )
        _require(
            self.layer_norm_eps > 0,
            f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}",
        )
        _require(
            not self.share_embeddings
            or self.source_vocab_size == self.target_vocab_size,
            "share_embeddings needs equal vocabularies, got source "
            f"{self.source_vocab_size} and target {self.target_vocab_size}; "
            "set share_embeddings=False",
        )

    @property
    def head_dim(self) -> int:
        """d_k = d_v = model_dim / num_heads."""
        return self.model_dim // self.num_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


# Target pattern that selects every linear layer of the model.
ALL_LINEAR = "all"
# Wq and Wv, the pair adapted in the LoRA paper's main experiments.
DEFAULT_LORA_TARGETS = ("query", "value")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters added to frozen linear layers."""

    # r: rank of A (r x in) and B (out x r).
    rank: int = 8
    # alpha: the update B A x is scaled by alpha / r (or alpha / sqrt(r)).
    alpha: float = 16.0
    # Patterns naming the linear layers to adapt; see
    # twinformer.param_map.match_lora_targets for the syntax.
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    # Dropout on the adapter's input x only; the frozen path receives x unchanged.
    dropout: float = 0.0
    # rsLoRA (Kalajdzievski 2023): scale by alpha / sqrt(r), which keeps the
    # update's magnitude stable as the rank grows.
    use_rslora: bool = False

    def __post_init__(self) -> None:
        _require_positive_int("lora rank", self.rank)
        _require(
            isinstance(self.alpha, (int, float)) and self.alpha > 0,
            f"lora alpha must be positive, got {self.alpha!r}",
        )
        _require_probability("lora dropout", self.dropout)
        targets = self.targets
        if isinstance(targets, str):
            targets = tuple(t for t in targets.split(",") if t)
            object.__setattr__(self, "targets", targets)
        _require(
            len(targets) > 0 and all(isinstance(t, str) and t for t in targets),
            f"lora targets must be a non-empty list of names, got {self.targets!r}",
        )

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA."""
        if self.use_rslora:
            return self.alpha / math.sqrt(self.rank)
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        data = dict(data)
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by both twins' training loops."""

    steps: int = 2000
    # Sentences (sequence pairs) per batch.
    batch_size: int = 64
    # Adam moments as in the paper: beta1 0.9, beta2 0.98, eps 1e-9.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    # lr = lr_scale * model_dim^-0.5 * min(step^-0.5, step * warmup_steps^-1.5).
    # The paper uses lr_scale 1 and 4000 warmup steps for 100k-step runs.
    lr_scale: float = 1.0
    warmup_steps: int = 4000
    # epsilon_ls of the paper: the smoothed target gives 1 - eps to the true token.
    label_smoothing: float = 0.1
    # Clip the global L2 norm of all trainable gradients; 0 disables clipping.
    clip_grad_norm: float = 0.0
    # Evaluate (validation loss, greedy decoding metrics) every this many steps.
    eval_every: int = 200
    # How many held-out examples greedy decoding scores at each evaluation.
    eval_examples: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "warmup_steps", "eval_every"):
            _require_positive_int(name, getattr(self, name))
        _require_positive_int("eval_examples", self.eval_examples)
        _require(
            isinstance(self.seed, int) and 0 <= self.seed < 2**32,
            f"seed must be an integer in [0, 2**32), got {self.seed!r}",
        )
        _require(self.lr_scale > 0, f"lr_scale must be positive, got {self.lr_scale}")
        _require(
            0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
            f"Adam betas must lie in [0, 1), got ({self.adam_beta1}, "
            f"{self.adam_beta2})",
        )
        _require(self.adam_eps > 0, f"adam_eps must be positive, got {self.adam_eps}")
        _require_probability("label_smoothing", self.label_smoothing)
        _require(
            self.clip_grad_norm >= 0,
            f"clip_grad_norm must be >= 0 (0 disables it), got {self.clip_grad_norm}",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} fields {unknown}; valid fields are {sorted(known)}"
        )
    return cls(**data)


def base_model_config(source_vocab_size: int, target_vocab_size: int) -> ModelConfig:
    """Return the base model of Table 3: N=6, d_model=512, d_ff=2048, h=8, 0.1."""
    return ModelConfig(
        source_vocab_size=source_vocab_size,
        target_vocab_size=target_vocab_size,
        model_dim=512,
        num_heads=8,
        ff_dim=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout=0.1,
        embedding_dropout=0.1,
    )


# Named presets for `--preset`; "small" is the command line's default, sized to
# learn the synthetic tasks in minutes on a laptop CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "base": dict(
        model_dim=512,
        num_heads=8,
        ff_dim=2048,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dropout=0.1,
        embedding_dropout=0.1,
    ),
    "small": dict(
        model_dim=64,
        num_heads=4,
        ff_dim=256,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dropout=0.1,
        embedding_dropout=0.1,
    ),
}

__all__ = [
    "ALL_LINEAR",
    "BOS_ID",
    "DEFAULT_LORA_TARGETS",
    "EOS_ID",
    "LoraConfig",
    "ModelConfig",
    "PAD_ID",
    "PRESETS",
    "SPECIAL_TOKENS",
    "TrainConfig",
    "UNK_ID",
    "base_model_config",
]
