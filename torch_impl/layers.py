"""Embeddings, feed-forward network and the encoder and decoder layers.

Vaswani et al. 2017, sections 3.1 to 3.5. Shapes:
    B batch, S source length, T target length, D model dim, F feed-forward
    dim, V vocabulary.

Each sub-layer is wrapped in a residual connection with LayerNorm:
    post-LN (the paper): x = LayerNorm(x + Dropout(sublayer(x)))
    pre-LN:              x = x + Dropout(sublayer(LayerNorm(x)))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from torch_impl.attention import MultiHeadAttention
from twinformer.config import ModelConfig
from twinformer.errors import DataError

LayerCache = dict[str, dict[str, Tensor]]


def sinusoidal_position_encoding(
    length: int, model_dim: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Build the fixed position encoding of section 3.5.

    PE(pos, 2i) = sin(pos / 10000^(2i / d_model)) and
    PE(pos, 2i + 1) = cos(pos / 10000^(2i / d_model)). An odd ``model_dim``
    has one more sine than cosine dimension.

    Args:
        length: number of positions.
        model_dim: d_model.
        dtype: floating dtype of the result.

    Returns:
        (length, model_dim) table; row ``pos`` encodes position ``pos``.
    """
    # Computed in float64 so that float32 and float64 tables agree to rounding.
    positions = torch.arange(length, dtype=torch.float64)[:, None]
    even_index = 2 * (torch.arange(model_dim) // 2)
    frequencies = 10000.0 ** (-even_index.to(torch.float64) / model_dim)
    angles = positions * frequencies  # (length, D)
    is_even = torch.arange(model_dim) % 2 == 0
    table = torch.where(is_even, torch.sin(angles), torch.cos(angles))
    return table.to(dtype)


class Embeddings(nn.Module):
    """Token embedding times sqrt(d_model) plus position encoding (3.4, 3.5).

    ``weight`` (V, D) is the only parameter, so the state_dict key is
    ``<path>.weight``. The position table is computed in float64 once per
    dtype and device and cast to the weight's dtype, so a model cast with
    ``.double()`` gets an exact float64 table rather than an upcast float32
    one. It is a plain cache, not a buffer, so it stays out of the state_dict.
    """

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.model_dim = config.model_dim
        self.max_length = config.max_length
        self.weight = nn.Parameter(torch.empty(vocab_size, config.model_dim))
        self.dropout = nn.Dropout(config.embedding_dropout)
        self._position_tables: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def position_table(self) -> Tensor:
        """Return the (max_length, D) position encoding in the weight's dtype."""
        cache_key = (self.weight.dtype, self.weight.device)
        if cache_key not in self._position_tables:
            # A table first built while decoding under inference_mode must
            # still be usable by autograd later, so it is built outside it.
            with torch.inference_mode(False):
                table = sinusoidal_position_encoding(
                    self.max_length, self.model_dim, self.weight.dtype
                )
                self._position_tables[cache_key] = table.to(self.weight.device)
        return self._position_tables[cache_key]

    def forward(self, ids: Tensor, offset: int = 0) -> Tensor:
        """Embed token ids that start at position ``offset``.

        Args:
            ids: token ids, (B, L).
            offset: position of ``ids[:, 0]``; non-zero in cached decoding.

        Returns:
            (B, L, D).

        Raises:
            DataError: an id outside [0, V) or a position beyond max_length.
        """
        check_token_ids(ids, self.vocab_size)
        end = offset + ids.shape[1]
        if end > self.max_length:
            raise DataError(
                f"sequence needs positions up to {end}, but the model's max_length "
                f"is {self.max_length}; shorten the input or build the model with "
                "a larger max_length"
            )
        tokens = nn.functional.embedding(ids, self.weight) * math.sqrt(self.model_dim)
        positions = self.position_table()[offset:end]  # (L, D)
        return self.dropout(tokens + positions)


def check_token_ids(ids: Tensor, vocab_size: int) -> None:
    """Raise DataError when an id lies outside [0, vocab_size)."""
    if ids.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(ids))
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise DataError(
            f"token id {bad} is outside the vocabulary of size {vocab_size}; "
            f"ids must lie in [0, {vocab_size - 1}]"
        )


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2 (section 3.3); W1 is ``hidden``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.hidden = nn.Linear(config.model_dim, config.ff_dim)
        self.output = nn.Linear(config.ff_dim, config.model_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Map (B, L, D) -> (B, L, D) through the (B, L, F) hidden layer."""
        return self.output(torch.relu(self.hidden(x)))


class _Residual(nn.Module):
    """Shared post-LN / pre-LN residual wrapper around one sub-layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_position == "pre"
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, norm: nn.LayerNorm, sublayer: Callable[[Tensor], Tensor]
    ) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each with a residual and LayerNorm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attention = MultiHeadAttention(config)
        self.self_attention_norm = nn.LayerNorm(
            config.model_dim, eps=config.layer_norm_eps
        )
        self.feed_forward = FeedForward(config)
        self.feed_forward_norm = nn.LayerNorm(
            config.model_dim, eps=config.layer_norm_eps
        )
        self.residual = _Residual(config)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Encode (B, S, D) with the source padding mask (B, 1, 1, S)."""
        x = self.residual(
            x, self.self_attention_norm, lambda h: self.self_attention(h, h, mask)
        )
        return self.residual(x, self.feed_forward_norm, self.feed_forward)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the memory, feed-forward."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        eps = config.layer_norm_eps
        self.self_attention = MultiHeadAttention(config)
        self.self_attention_norm = nn.LayerNorm(config.model_dim, eps=eps)
        self.cross_attention = MultiHeadAttention(config)
        self.cross_attention_norm = nn.LayerNorm(config.model_dim, eps=eps)
        self.feed_forward = FeedForward(config)
        self.feed_forward_norm = nn.LayerNorm(config.model_dim, eps=eps)
        self.residual = _Residual(config)

    def forward(
        self,
        x: Tensor,
        memory: Tensor | None,
        self_mask: Tensor,
        cross_mask: Tensor,
        cache: LayerCache | None = None,
        cache_position: int = 0,
    ) -> Tensor:
        """Decode one layer.

        Args:
            x: decoder states, (B, T, D).
            memory: encoder output, (B, S, D); may be ``None`` with a cache,
                whose cross-attention keys and values were computed once.
            self_mask: causal and target padding mask, (B, 1, T, T), or
                (B, 1, T, P) against the P cached positions filled so far.
            cross_mask: source padding mask, (B, 1, 1, S).
            cache: ``{"self_attention": ..., "cross_attention": ...}``, each
                ``{"key", "value"}`` of (B, H, L or S, E); updated in place.
            cache_position: position of ``x[:, 0]`` in the cache.

        Returns:
            (B, T, D).
        """
        self_cache = None if cache is None else cache["self_attention"]
        cross_cache = None if cache is None else cache["cross_attention"]
        cross_input = memory if cache is None else None

        x = self.residual(
            x,
            self.self_attention_norm,
            lambda h: self.self_attention(h, h, self_mask, self_cache, cache_position),
        )
        x = self.residual(
            x,
            self.cross_attention_norm,
            lambda h: self.cross_attention(h, cross_input, cross_mask, cross_cache),
        )
        return self.residual(x, self.feed_forward_norm, self.feed_forward)
