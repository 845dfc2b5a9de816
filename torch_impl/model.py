"""The encoder-decoder Transformer (Vaswani et al. 2017, section 3).

Shapes:
    B batch, S source length, T target length, L cache length, H heads,
    E head dim, D model dim, V vocabulary.

``Transformer.state_dict()`` keys are exactly the checkpoint names of
``twinformer.param_map.base_tensor_specs``, so a state_dict is a checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_impl.layers import DecoderLayer, Embeddings, EncoderLayer
from twinformer.config import PAD_ID, ModelConfig
from twinformer.errors import DataError

# {"position": int, "target_ids": (B, L), "layers": [per-layer caches]}; see
# Transformer.init_cache.
DecodeCache = dict[str, Any]


def padding_mask(ids: Tensor) -> Tensor:
    """Return True where ``ids`` (B, K) is not padding, shaped (B, 1, 1, K)."""
    return (ids != PAD_ID)[:, None, None, :]


def causal_mask(query_positions: Tensor, key_length: int) -> Tensor:
    """Let each query position attend to keys at or before it: (1, 1, Q, K)."""
    key_positions = torch.arange(key_length, device=query_positions.device)
    return (key_positions[None, :] <= query_positions[:, None])[None, None]


class Encoder(nn.Module):
    """N encoder layers, then ``final_norm`` with pre-LN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(config) for _ in range(config.num_encoder_layers)
        )
        if config.norm_position == "pre":
            self.final_norm = nn.LayerNorm(config.model_dim, eps=config.layer_norm_eps)
        else:
            self.final_norm = None

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Map (B, S, D) -> (B, S, D) with the source padding mask (B, 1, 1, S)."""
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.final_norm is None else self.final_norm(x)


class Decoder(nn.Module):
    """N decoder layers, then ``final_norm`` with pre-LN."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(config) for _ in range(config.num_decoder_layers)
        )
        if config.norm_position == "pre":
            self.final_norm = nn.LayerNorm(config.model_dim, eps=config.layer_norm_eps)
        else:
            self.final_norm = None

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        self_mask: Tensor,
        cross_mask: Tensor,
        cache: DecodeCache | None = None,
    ) -> Tensor:
        """Map (B, T, D) -> (B, T, D), attending to the memory (B, S, D)."""
        for index, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, memory, self_mask, cross_mask)
            else:
                layer_cache = cache["layers"][index]
                x = layer(
                    x, None, self_mask, cross_mask, layer_cache, cache["position"]
                )
        return x if self.final_norm is None else self.final_norm(x)


class Transformer(nn.Module):
    """Encoder-decoder Transformer with optional shared and tied embeddings.

    With ``share_embeddings`` there is no ``source_embedding``: the encoder
    reads ``target_embedding``. With ``tie_output`` there is no
    ``output_projection``: logits are ``x @ target_embedding.weight.T`` (3.4).
    """

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.target_embedding = Embeddings(config.target_vocab_size, config)
        if not config.share_embeddings:
            self.source_embedding = Embeddings(config.source_vocab_size, config)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if not config.tie_output:
            self.output_projection = nn.Linear(
                config.model_dim, config.target_vocab_size, bias=False
            )
        self.to(dtype)
        self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise every parameter as docs/architecture.md specifies.

        Embeddings normal with std model_dim^-0.5, linear weights
        Xavier-uniform, biases zero, LayerNorm scale one and bias zero.
        """
        std = self.config.model_dim**-0.5
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, Embeddings):
                    nn.init.normal_(module.weight, std=std, generator=generator)
                elif isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight, generator=generator)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, nn.LayerNorm):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

    @property
    def source_embedder(self) -> Embeddings:
        """The embedding the encoder reads: ``target_embedding`` when shared."""
        if self.config.share_embeddings:
            return self.target_embedding
        return self.source_embedding

    def encode(self, source_ids: Tensor) -> Tensor:
        """Encode source tokens.

        Args:
            source_ids: token ids, PAD_ID after the end.

        Returns:
            The memory that the decoder attends to.

        Shape:
            source_ids (B, S) -> (B, S, D).

        Raises:
            DataError: an id outside the source vocabulary or S > max_length.
        """
        x = self.source_embedder(source_ids)
        return self.encoder(x, padding_mask(source_ids))

    def decode(
        self,
        target_input_ids: Tensor,
        memory: Tensor,
        source_ids: Tensor,
        cache: DecodeCache | None = None,
    ) -> Tensor:
        """Predict the next token at every target position.

        Args:
            target_input_ids: ids, BOS first. With a cache, the T ids that
                follow the ``cache["position"]`` ids decoded so far.
            memory: encoder output. With a cache it is not read, because the
                cache contains the cross-attention keys and values.
            source_ids: source ids, for the source padding mask.
            cache: from ``init_cache``, updated in place with its position
                advanced by T. ``None`` decodes the whole prefix at once.

        Returns:
            Logits over the target vocabulary.

        Shape:
            target_input_ids (B, T), memory (B, S, D), source_ids (B, S)
            -> (B, T, V).

        Raises:
            DataError: an id outside the target vocabulary, a position beyond
                max_length, or more positions than the cache has room for.
        """
        offset = 0 if cache is None else cache["position"]
        x = self.target_embedding(target_input_ids, offset)
        self_mask = self._self_attention_mask(target_input_ids, cache)
        x = self.decoder(x, memory, self_mask, padding_mask(source_ids), cache)
        if cache is not None:
            cache["position"] += target_input_ids.shape[1]
        return self.output_logits(x)

    def output_logits(self, x: Tensor) -> Tensor:
        """Map decoder states (B, T, D) to logits (B, T, V)."""
        if self.config.tie_output:
            return F.linear(x, self.target_embedding.weight)
        return self.output_projection(x)

    def forward(self, source_ids: Tensor, target_input_ids: Tensor) -> Tensor:
        """Return logits (B, T, V) for (B, S) source and (B, T) decoder input ids."""
        memory = self.encode(source_ids)
        return self.decode(target_input_ids, memory, source_ids)

    def init_cache(self, memory: Tensor, max_length: int) -> DecodeCache:
        """Build a decoding cache for up to ``max_length`` decoder positions.

        Self-attention keys and values are preallocated, (B, H, L, E) with
        L = ``max_length``, and written at ``position`` step by step; unused
        positions stay masked because ``target_ids`` contains PAD_ID there.
        Cross-attention keys and values, (B, H, S, E), are computed once here.

        Args:
            memory: encoder output.
            max_length: number of decoder positions L the cache has room for,
                at most ``config.max_length``.

        Returns:
            ``{"position": 0, "target_ids": (B, L), "layers": [{"self_attention":
            {"key", "value"}, "cross_attention": {"key", "value"}}, ...]}``.

        Shape:
            memory (B, S, D); self-attention entries (B, H, L, E),
            cross-attention entries (B, H, S, E).

        Raises:
            DataError: ``max_length`` exceeds ``config.max_length``.
        """
        if max_length > self.config.max_length:
            raise DataError(
                f"cache length {max_length} exceeds the model's max_length "
                f"{self.config.max_length}; decode fewer tokens"
            )
        batch = memory.shape[0]
        shape = (batch, self.config.num_heads, max_length, self.config.head_dim)
        layers = []
        for layer in self.decoder.layers:
            key, value = layer.cross_attention.project_key_value(memory)
            empty = memory.new_zeros(shape)
            layers.append(
                {
                    "self_attention": {"key": empty, "value": empty.clone()},
                    "cross_attention": {"key": key, "value": value},
                }
            )
        target_ids = torch.full(
            (batch, max_length), PAD_ID, dtype=torch.long, device=memory.device
        )
        return {"position": 0, "target_ids": target_ids, "layers": layers}

    def _self_attention_mask(
        self, target_input_ids: Tensor, cache: DecodeCache | None
    ) -> Tensor:
        # Without a cache: causal (1, 1, T, T) & target padding (B, 1, 1, T).
        length = target_input_ids.shape[1]
        if cache is None:
            positions = torch.arange(length, device=target_input_ids.device)
            return causal_mask(positions, length) & padding_mask(target_input_ids)

        # With a cache: the new ids join the cached ids, and the mask runs
        # over the positions filled so far, (B, 1, T, start + T).
        start = cache["position"]
        end = start + length
        key_ids = cache["target_ids"]
        if end > key_ids.shape[1]:
            raise DataError(
                f"cache has room for {key_ids.shape[1]} positions, but decoding needs "
                f"{end}; build the cache with a larger max_length"
            )
        key_ids[:, start:end] = target_input_ids
        if length == 1:
            # A single new id may attend to every filled position: no causal mask.
            return padding_mask(key_ids[:, :end])
        positions = torch.arange(start, end, device=key_ids.device)
        return causal_mask(positions, end) & padding_mask(key_ids[:, :end])
