"""Scaled dot-product and multi-head attention (Vaswani et al. 2017, 3.2).

Shapes:
    B batch, Q query length, K key length, H heads, E head dim (d_k = d_v),
    D model dim. Inside attention PyTorch keeps heads before length,
    (B, H, Q, E), the layout of ``F.scaled_dot_product_attention``.

Masks are boolean, broadcastable to (B, H, Q, K), and True means "may attend".
A query row whose keys are all masked returns zeros, never NaN, in both paths.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinformer.config import ATTENTION_PATHS, ModelConfig
from twinformer.errors import ConfigError

AttentionCache = dict[str, Tensor]

# Device types whose ``F.scaled_dot_product_attention`` kernels already return
# zeros for a query row with every key masked, so ``attend_fused`` needs no
# extra masking there. Skipping it saves four small operations per call,
# which is a tenth of a cached decoding step at the small size.
ZEROS_FULLY_MASKED_ROWS = frozenset({"cpu"})


def attend_manual(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Compute softmax(Q K^T / sqrt(d_k)) V step by step (section 3.2.1).

    Args:
        query: queries.
        key: keys.
        value: values.
        mask: boolean, True where a query may attend to a key; ``None``
            attends everywhere.
        dropout_p: dropout probability on the attention weights.
        training: apply dropout only when True.

    Returns:
        The attended values; zero for a query with every key masked.

    Shape:
        query (B, H, Q, E), key and value (B, H, K, E), mask broadcastable to
        (B, H, Q, K) -> (B, H, Q, E).
    """
    # Scores, (B, H, Q, K).
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])

    # Masked scores get the dtype's lowest finite value rather than -inf, so a
    # fully masked row gives a uniform softmax instead of NaN.
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)

    # Zero the rows that may attend to nothing; their gradients are then zero too.
    if mask is not None:
        weights = weights * mask.any(dim=-1, keepdim=True)
    weights = F.dropout(weights, p=dropout_p, training=training)

    # (B, H, Q, K) @ (B, H, K, E) -> (B, H, Q, E).
    return weights @ value


def attend_fused(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """Compute the same attention as ``attend_manual`` with one fused kernel.

    Calls ``F.scaled_dot_product_attention`` with a boolean mask. Its CPU
    kernels return zeros for a query row with every key masked (tested). On
    other devices some kernels return NaN there, so such rows attend to every
    key and their output is set to zero afterwards.

    Args:
        query: queries.
        key: keys.
        value: values.
        mask: boolean, True where a query may attend to a key; ``None``
            attends everywhere.
        dropout_p: dropout probability on the attention weights.
        training: apply dropout only when True.

    Returns:
        The attended values; zero for a query with every key masked.

    Shape:
        query (B, H, Q, E), key and value (B, H, K, E), mask broadcastable to
        (B, H, Q, K) -> (B, H, Q, E).
    """
    dropout_p = dropout_p if training else 0.0
    if mask is None or query.device.type in ZEROS_FULLY_MASKED_ROWS:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout_p
        )

    # Rows with no allowed key, (B or 1, H or 1, Q or 1, 1).
    has_key = mask.any(dim=-1, keepdim=True)
    safe_mask = mask | ~has_key
    output = F.scaled_dot_product_attention(
        query, key, value, attn_mask=safe_mask, dropout_p=dropout_p
    )
    return output * has_key


class MultiHeadAttention(nn.Module):
    """Multi-head attention with learned projections (section 3.2.2).

    MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, where
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V). The per-head projections of
    all heads are one (D, D) linear each: ``query``, ``key``, ``value``, and
    ``output`` is W^O.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.attention = config.attention
        self.attention_dropout = config.attention_dropout
        self.query = nn.Linear(config.model_dim, config.model_dim)
        self.key = nn.Linear(config.model_dim, config.model_dim)
        self.value = nn.Linear(config.model_dim, config.model_dim)
        self.output = nn.Linear(config.model_dim, config.model_dim)

    def split_heads(self, x: Tensor) -> Tensor:
        """Reshape (B, L, D) to (B, H, L, E)."""
        batch, length, _ = x.shape
        x = x.view(batch, length, self.num_heads, self.head_dim)
        return x.transpose(1, 2)

    def project_key_value(self, key_value_input: Tensor) -> tuple[Tensor, Tensor]:
        """Project (B, K, D) inputs to keys and values, each (B, H, K, E)."""
        key = self.split_heads(self.key(key_value_input))
        value = self.split_heads(self.value(key_value_input))
        return key, value

    def forward(
        self,
        query_input: Tensor,
        key_value_input: Tensor | None,
        mask: Tensor | None,
        cache: AttentionCache | None = None,
        cache_position: int = 0,
        attention: str | None = None,
    ) -> Tensor:
        """Attend from ``query_input`` to ``key_value_input``.

        Args:
            query_input: inputs the queries are projected from.
            key_value_input: inputs the keys and values are projected from.
                With a ``cache`` they are written into the cache at
                ``cache_position``, and ``None`` reads the cache unchanged.
            mask: boolean, True where a query may attend to a key; over the
                cache positions filled so far, new keys included, when a
                cache is given.
            cache: ``{"key", "value"}``, updated in place, or ``None`` to
                attend to ``key_value_input`` alone.
            cache_position: first cache index that the new keys fill.
            attention: "manual" or "fused"; ``None`` uses the config's path.

        Returns:
            The attention output after the ``output`` projection.

        Shape:
            query_input (B, Q, D), key_value_input (B, K, D), mask
            broadcastable to (B, H, Q, K), or (B, H, Q, cache_position + K)
            with a self-attention cache; cache entries (B, H, L, E)
            -> (B, Q, D).

        Raises:
            ConfigError: an unknown attention path.
        """
        path = self.attention if attention is None else attention
        if path not in ATTENTION_PATHS:
            raise ConfigError(
                f"attention must be one of {ATTENTION_PATHS}, got {path!r}"
            )

        # Project to heads: queries (B, H, Q, E); keys and values (B, H, K, E).
        query = self.split_heads(self.query(query_input))
        if cache is None:
            key, value = self.project_key_value(key_value_input)
        else:
            key, value = self._read_cache(key_value_input, cache, cache_position)

        # Attend per head, then join heads: (B, H, Q, E) -> (B, Q, H * E).
        attend = attend_manual if path == "manual" else attend_fused
        heads = attend(query, key, value, mask, self.attention_dropout, self.training)
        batch, _, length, _ = heads.shape
        joined = heads.transpose(1, 2).reshape(batch, length, -1)
        return self.output(joined)

    def _read_cache(
        self, key_value_input: Tensor | None, cache: AttentionCache, position: int
    ) -> tuple[Tensor, Tensor]:
        if key_value_input is None:
            return cache["key"], cache["value"]
        new_key, new_value = self.project_key_value(key_value_input)
        end = position + new_key.shape[2]
        cache["key"][:, :, position:end] = new_key
        cache["value"][:, :, position:end] = new_value
        # Only the filled positions are read. The JAX twin reads all L with a
        # mask, because its compiled loop needs fixed shapes.
        return cache["key"][:, :, :end], cache["value"][:, :, :end]
