"""The PyTorch twin behind the ``twinformer.runner.Runner`` interface.

Arrays cross the interface as numpy arrays: token ids as integers, weights in
the checkpoint layout of ``twinformer.param_map``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from torch_impl.decode import beam_search, greedy_search
from torch_impl.lora import (
    inject_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
)
from torch_impl.loss import label_smoothed_cross_entropy
from torch_impl.model import Transformer
from torch_impl.optim import clip_gradients, make_optimizer
from twinformer.config import PAD_ID, LoraConfig, ModelConfig, TrainConfig
from twinformer.data import Batch
from twinformer.errors import ConfigError
from twinformer.param_map import base_tensor_specs, check_tensors

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Runner:
    """A PyTorch Transformer, optionally with LoRA, ready to train and decode.

    Construction seeds torch's global random generator with
    ``train_config.seed``, because dropout in torch draws from it. Weights
    and adapters come from a separate generator with the same seed.
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
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if adapter_tensors is not None and lora_config is None:
            raise ConfigError(
                "adapter_tensors need a lora_config; pass both or neither"
            )
        self.model_config = model_config
        self.train_config = train_config
        self.lora_config = lora_config
        self.dtype = DTYPES[dtype]

        # Base weights: fresh from the seed, or loaded and checked.
        generator = torch.Generator().manual_seed(train_config.seed)
        torch.manual_seed(train_config.seed)
        self.model = Transformer(model_config, self.dtype, generator)
        if base_tensors is not None:
            self._load_base(base_tensors)

        # Adapters: the base freezes and only A and B train.
        if lora_config is not None:
            inject_lora(self.model, lora_config, generator)
            if adapter_tensors is not None:
                load_lora_state_dict(self.model, _to_torch(adapter_tensors, self.dtype))

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.scheduler = make_optimizer(
            trainable, train_config, model_config.model_dim
        )
        self._trainable = trainable
        self._learning_rate = 0.0

    def _load_base(self, tensors: dict[str, np.ndarray]) -> None:
        check_tensors(tensors, base_tensor_specs(self.model_config), source="base")
        self.model.load_state_dict(_to_torch(tensors, self.dtype), strict=True)

    def train_step(self, batch: Batch) -> float:
        """Take one optimizer step; return the mean label-smoothed loss per token."""
        self.model.train()
        source, target_input, labels = _batch_tensors(batch)
        logits = self.model(source, target_input)
        loss = label_smoothed_cross_entropy(
            logits, labels, self.train_config.label_smoothing
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self._trainable, self.train_config.clip_grad_norm)
        self._learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return loss.item()

    @property
    def learning_rate(self) -> float:
        """Learning rate applied at the last ``train_step`` (0 before the first)."""
        return self._learning_rate

    @torch.no_grad()
    def evaluate_loss(self, batch: Batch) -> tuple[float, int]:
        """Return (summed loss over non-padding tokens, token count), no dropout."""
        self.model.eval()
        source, target_input, labels = _batch_tensors(batch)
        logits = self.model(source, target_input)
        total = label_smoothed_cross_entropy(
            logits, labels, self.train_config.label_smoothing, reduction="sum"
        )
        return float(total), int((labels != PAD_ID).sum())

    def greedy_search(self, source_ids: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Decode greedily; (B, S) source ids -> (B, L) ids, L <= max_new_tokens."""
        self.model.eval()
        ids = greedy_search(self.model, _ids(source_ids), max_new_tokens)
        return ids.numpy().astype(np.int32)

    def beam_search(
        self,
        source_ids: np.ndarray,
        max_new_tokens: int,
        beam_size: int,
        length_penalty: float = 0.6,
        num_return: int = 1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decode with beam search; ids (B, num_return, L), scores (B, num_return)."""
        self.model.eval()
        ids, scores = beam_search(
            self.model,
            _ids(source_ids),
            max_new_tokens,
            beam_size,
            length_penalty,
            num_return,
        )
        return ids.numpy().astype(np.int32), scores.numpy()

    def base_tensors(self) -> dict[str, np.ndarray]:
        """Return the base weights in the run dtype, checkpoint names, unmerged."""
        state = self.model.state_dict()
        return {
            spec.name: state[spec.name].detach().cpu().numpy().copy()
            for spec in base_tensor_specs(self.model_config)
        }

    def adapter_tensors(self) -> dict[str, np.ndarray] | None:
        """Return the LoRA tensors (``None`` without LoRA)."""
        if self.lora_config is None:
            return None
        return {
            name: value.cpu().numpy().copy()
            for name, value in lora_state_dict(self.model).items()
        }

    def merged_base_tensors(self) -> dict[str, np.ndarray]:
        """Return base weights with W + s B A; the live model stays unmerged."""
        tensors = self.base_tensors()
        for path, layer in lora_layers(self.model).items():
            with torch.no_grad():
                delta = layer.delta_weight().cpu().numpy()
            tensors[f"{path}.weight"] = tensors[f"{path}.weight"] + delta
        return tensors

    def parameter_counts(self) -> tuple[int, int]:
        """Return (trainable, total) parameter counts; tied tensors count once."""
        # parameters() yields each Parameter once; tying reuses one Parameter.
        parameters = list(self.model.parameters())
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        return trainable, sum(p.numel() for p in parameters)


def _to_torch(tensors: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, Tensor]:
    # bfloat16 (ml_dtypes) arrays have no torch view; upcast through float32.
    converted = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if array.dtype.name == "bfloat16":
            array = array.astype(np.float32)
        converted[name] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    return converted


def _ids(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.int64))


def _batch_tensors(batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
    return (
        _ids(batch.source_ids),
        _ids(batch.target_input_ids),
        _ids(batch.target_output_ids),
    )
