"""Low-rank adapters on frozen linear layers (Hu et al. 2021, "LoRA").

h = W x + b + s * B A dropout(x), with W (out, in) frozen, A (R, in) and
B (out, R) trained, and s = alpha / r (``LoraConfig.scaling``; alpha / sqrt(r)
with rsLoRA). B starts at zero, so a fresh adapter leaves the model unchanged.

Shapes: R rank, in / out the features of the wrapped linear layer.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from twinformer import checkpoint
from twinformer.config import LoraConfig
from twinformer.errors import LoraError
from twinformer.param_map import adapter_tensor_specs, check_tensors


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    The wrapped layer's ``weight`` and ``bias`` Parameters become this
    module's own attributes, so state_dict names stay ``<path>.weight`` and
    ``<path>.bias`` and the adapter adds ``<path>.lora_A`` and ``<path>.lora_B``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = {"dtype": self.weight.dtype, "device": self.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.reset_adapter(generator)

    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """Draw A Kaiming-uniform with bound 1/sqrt(in) and set B to zero."""
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def delta_weight(self) -> Tensor:
        """Return s * B A, (out, in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: Tensor) -> Tensor:
        """Map (..., in) -> (..., out); a merged layer skips the adapter path."""
        base = F.linear(x, self.weight, self.bias)
        if self.merged:
            return base
        # (..., in) -> (..., R) -> (..., out).
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return base + self.scaling * update

    def merge(self) -> None:
        """Fold the adapter into the weight: W <- W + s B A.

        Raises:
            LoraError: A or B contains NaN or inf; the weight is left as is.
        """
        if self.merged:
            warnings.warn("LoRA layer is already merged; merge skipped", stacklevel=2)
            return
        self.check_finite()
        with torch.no_grad():
            self.weight.add_(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Take the adapter out of the weight again: W <- W - s B A."""
        if not self.merged:
            warnings.warn("LoRA layer is not merged; unmerge skipped", stacklevel=2)
            return
        with torch.no_grad():
            self.weight.sub_(self.delta_weight())
        self.merged = False

    def check_finite(self, name: str = "LoRA layer") -> None:
        """Raise LoraError when A or B contains NaN or inf."""
        for tensor_name, tensor in (("lora_A", self.lora_A), ("lora_B", self.lora_B)):
            if not torch.isfinite(tensor).all():
                raise LoraError(
                    f"{name}.{tensor_name} contains NaN or inf, so it cannot be "
                    "merged; the base weights were left unchanged. Retrain the "
                    "adapter or lower the learning rate"
                )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Return every LoRALinear of ``model`` by dotted module path."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, LoRALinear)
    }


def inject_lora(
    model: nn.Module,
    lora_config: LoraConfig,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Wrap the linear layers that ``lora_config.targets`` selects in LoRALinear.

    Every base parameter is frozen (requires_grad False) and every adapter
    parameter is trainable. The model must carry its ``ModelConfig`` as
    ``model.config``; the config is stored as ``model.lora_config``.

    Args:
        model: a ``Transformer`` without adapters.
        lora_config: rank, alpha, targets, dropout, rsLoRA.
        generator: random source for A; ``None`` uses torch's global one.

    Returns:
        The dotted paths of the wrapped layers, in forward order.

    Raises:
        LoraError: an unknown target (the message lists valid names), a rank
            above min(in, out) of a selected layer, or a model that already
            has adapters.
    """
    if lora_layers(model):
        raise LoraError(
            "model already has LoRA adapters; build a fresh model to inject again"
        )
    specs = adapter_tensor_specs(model.config, lora_config)
    paths = [spec.name.removesuffix(".lora_A") for spec in specs[::2]]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for path in paths:
        parent_path, _, attribute = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        layer = LoRALinear(
            getattr(parent, attribute),
            lora_config.rank,
            lora_config.alpha,
            lora_config.dropout,
            lora_config.use_rslora,
            generator,
        )
        setattr(parent, attribute, layer)
    model.lora_config = lora_config
    return paths


def merge_lora(model: nn.Module) -> None:
    """Merge every adapter into its base weight (W <- W + s B A).

    All adapters are checked before any weight changes, so a NaN or inf in
    one of them leaves the whole model untouched. When every layer is
    already merged, this warns once and changes nothing.

    Raises:
        LoraError: an adapter contains NaN or inf (named in the message).
    """
    pending = {
        path: layer for path, layer in lora_layers(model).items() if not layer.merged
    }
    if not pending:
        warnings.warn("LoRA adapters are already merged; merge skipped", stacklevel=2)
        return
    for path, layer in pending.items():
        layer.check_finite(path)
    for layer in pending.values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Subtract every merged adapter from its base weight again.

    When no layer is merged, this warns once and changes nothing.
    """
    merged = [layer for layer in lora_layers(model).values() if layer.merged]
    if not merged:
        warnings.warn("LoRA adapters are not merged; unmerge skipped", stacklevel=2)
        return
    for layer in merged:
        layer.unmerge()


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Return the adapter tensors only, named ``<path>.lora_A`` / ``.lora_B``."""
    tensors: dict[str, Tensor] = {}
    for path, layer in lora_layers(model).items():
        tensors[f"{path}.lora_A"] = layer.lora_A.detach()
        tensors[f"{path}.lora_B"] = layer.lora_B.detach()
    return tensors


def load_lora_state_dict(model: nn.Module, tensors: dict[str, object]) -> None:
    """Copy adapter tensors (torch or numpy) into the model's adapters.

    Raises:
        LoraError: the model has no adapters or has merged ones.
        CheckpointError: a tensor is missing, unexpected or mis-shaped for
            the model's LoRA config.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoraError("model has no LoRA adapters; call inject_lora first")
    if any(layer.merged for layer in layers.values()):
        raise LoraError("model has merged adapters; call unmerge_lora before loading")
    specs = adapter_tensor_specs(model.config, model.lora_config)
    check_tensors(tensors, specs, source="adapter tensors")
    with torch.no_grad():
        for path, layer in layers.items():
            for name in ("lora_A", "lora_B"):
                value = _as_tensor(tensors[f"{path}.{name}"])
                getattr(layer, name).copy_(value)


def save_adapter(
    model: nn.Module, lora_config: LoraConfig, directory: str | os.PathLike
) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` to ``directory``.

    The directory is created when missing.
    """
    Path(directory).mkdir(parents=True, exist_ok=True)
    tensors = {
        name: value.cpu().numpy() for name, value in lora_state_dict(model).items()
    }
    checkpoint.write_adapter(directory, tensors, lora_config, model.config)


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoraConfig:
    """Load an adapter saved by ``save_adapter``, injecting LoRA when needed.

    Raises:
        CheckpointError: the files are missing or belong to another base.
        LoraError: the model already has adapters of another LoRA config.
    """
    lora_config, tensors = checkpoint.read_adapter(directory, model.config)
    if not lora_layers(model):
        inject_lora(model, lora_config)
    elif model.lora_config != lora_config:
        raise LoraError(
            f"{directory}: adapter config {lora_config} differs from the model's "
            f"adapters {model.lora_config}; load it onto a model without adapters"
        )
    load_lora_state_dict(model, tensors)
    return lora_config


def _as_tensor(value: object) -> Tensor:
    # bfloat16 numpy arrays (ml_dtypes) have no torch equivalent: upcast first.
    if isinstance(value, Tensor):
        return value
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(array))
