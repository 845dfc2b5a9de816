"""The run directory and its files, written atomically, read with checks.

A run directory holds:

    config.json          format_version, framework, task, model, train, lora, init_from
    model.safetensors    base weights under their PyTorch state_dict names
    adapter.safetensors  LoRA A and B (LoRA runs only)
    adapter_config.json  the LoraConfig and the model config it was trained on
    tokenizer.json       a `tokenizers` library file
    valid.tsv            held-out pairs, source<TAB>target
    metrics.jsonl        one JSON object per evaluation

Every file is written to a temporary name in the same directory, flushed to
disk and renamed over the target, so a crash leaves the old file or the new
one. A new run is built in ``<out>.incomplete`` and renamed to ``<out>`` when
complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save as safetensors_save

from twinformer.config import LoraConfig, ModelConfig
from twinformer.errors import CheckpointError, ConfigError
from twinformer.param_map import adapter_tensor_specs, base_tensor_specs, check_tensors

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
TOKENIZER_FILE = "tokenizer.json"
VALID_FILE = "valid.tsv"
METRICS_FILE = "metrics.jsonl"
INCOMPLETE_SUFFIX = ".incomplete"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never half."""
    path = Path(path)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates the file with mode 0600; give it the mode an ordinary
        # open() would, so that a run directory is as readable as its folder.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    # os.umask can only be read by setting it, so set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read file: {error}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: invalid JSON: {error}") from None


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one JSON line, rewriting the file atomically."""
    path = Path(path)
    existing = path.read_bytes() if path.exists() else b""
    line = json.dumps(dict(record), sort_keys=True) + "\n"
    atomic_write_bytes(path, existing + line.encode("utf-8"))


# safetensors dtype tags that numpy can hold. A checkpoint may only contain the
# float ones (param_map.ALLOWED_DTYPES); the others are read so that the check
# can name the offending tensor and its type.
_NUMPY_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def write_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write numpy arrays to a safetensors file atomically."""
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    data = safetensors_save(arrays, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a safetensors file into numpy arrays.

    bfloat16 tensors, which numpy lacks, come back as ``ml_dtypes.bfloat16``
    arrays. Other dtypes are returned as stored, so that ``check_tensors`` can
    name a tensor of the wrong type.

    Raises:
        CheckpointError: the file is missing, unreadable or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
        header_size = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_size])
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: not a readable safetensors file: {error}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (bad header)")
    body = memoryview(raw)[8 + header_size :]
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _decode_tensor(path, name, entry, body)
    return tensors


def _decode_tensor(path: Path, name: str, entry: Any, body: memoryview) -> np.ndarray:
    try:
        tag = entry["dtype"]
        shape = tuple(int(size) for size in entry["shape"])
        start, end = (int(offset) for offset in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: malformed header entry for {name!r}") from None
    dtype = _numpy_dtype(tag)
    if dtype is None:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {tag}; checkpoints hold only "
            "float32, float64 and bfloat16"
        )
    count = int(np.prod(shape, dtype=np.int64))
    if end - start != count * dtype.itemsize or end > len(body) or start < 0:
        raise CheckpointError(
            f"{path}: tensor {name!r} is truncated or corrupt; the file is damaged"
        )
    return np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()


def _numpy_dtype(tag: str) -> np.dtype | None:
    if tag == "BF16":
        import ml_dtypes  # a dependency of JAX; numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    if tag in _NUMPY_DTYPES:
        return np.dtype(_NUMPY_DTYPES[tag])
    return None


def read_base_tensors(
    path: str | os.PathLike, model_config: ModelConfig
) -> dict[str, np.ndarray]:
    """Read ``model.safetensors`` (or a run directory) and check it."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    tensors = read_tensors(path)
    check_tensors(tensors, base_tensor_specs(model_config), source=str(path))
    return tensors


def write_adapter(
    directory: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    lora_config: LoraConfig,
    model_config: ModelConfig,
) -> None:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``directory``.

    The JSON records the base model config, so loading the adapter onto a base
    of another shape fails with the differing fields named.
    """
    directory = Path(directory)
    check_tensors(
        tensors,
        adapter_tensor_specs(model_config, lora_config),
        source="adapter to save",
    )
    write_tensors(directory / ADAPTER_FILE, tensors)
    write_json(
        directory / ADAPTER_CONFIG_FILE,
        {
            "format_version": FORMAT_VERSION,
            "lora": lora_config.to_dict(),
            "base_model": model_config.to_dict(),
        },
    )


def read_adapter(
    directory: str | os.PathLike, model_config: ModelConfig
) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """Read an adapter written by ``write_adapter`` for the base ``model_config``.

    Raises:
        CheckpointError: files missing, or the adapter was trained on a base
            with another config (the message lists the differing fields), or a
            tensor is missing, unexpected, mis-shaped or mis-typed.
    """
    directory = Path(directory)
    saved = read_json(directory / ADAPTER_CONFIG_FILE)
    try:
        lora_config = LoraConfig.from_dict(saved["lora"])
        base = saved["base_model"]
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(
            f"{directory / ADAPTER_CONFIG_FILE}: invalid adapter config: {error}"
        ) from None
    expected = model_config.to_dict()
    differing = sorted(
        key for key in set(base) | set(expected) if base.get(key) != expected.get(key)
    )
    # Which attention path or dropout the base uses does not change its weights.
    differing = [
        key
        for key in differing
        if key not in ("attention", "dropout", "embedding_dropout", "attention_dropout")
    ]
    if differing:
        details = ", ".join(
            f"{key}: adapter {base.get(key)!r} vs model {expected.get(key)!r}"
            for key in differing
        )
        raise CheckpointError(
            f"{directory}: adapter was trained on another base model ({details}); "
            "load it onto the base it was trained on"
        )
    tensors = read_tensors(directory / ADAPTER_FILE)
    check_tensors(
        tensors,
        adapter_tensor_specs(model_config, lora_config),
        source=str(directory / ADAPTER_FILE),
    )
    return lora_config, tensors


# --- Run directories --------------------------------------------------------


def start_run_directory(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Create ``<out>.incomplete`` to build a run in; return its path.

    Raises:
        CheckpointError: ``out`` exists and is not empty, and ``overwrite`` is off.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(
            f"--out {out} already exists and is not empty; choose another "
            "directory or pass --overwrite"
        )
    staging = out.with_name(out.name + INCOMPLETE_SUFFIX)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def finish_run_directory(staging: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Move a complete run from ``staging`` to ``out``, replacing an old run."""
    staging, out = Path(staging), Path(out)
    if out.exists():
        # Move the old run aside first so that ``out`` is never half of each.
        trash = out.with_name(out.name + ".old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(out, trash)
        os.replace(staging, out)
        shutil.rmtree(trash)
    else:
        os.replace(staging, out)
    return out


@dataclass(frozen=True)
class RunFiles:
    """A run directory read back and checked."""

    directory: Path
    config: dict[str, Any]
    model_config: ModelConfig
    lora_config: LoraConfig | None
    base_tensors: dict[str, np.ndarray]
    adapter_tensors: dict[str, np.ndarray] | None

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER_FILE

    @property
    def valid_path(self) -> Path:
        return self.directory / VALID_FILE

    @property
    def metrics_path(self) -> Path:
        return self.directory / METRICS_FILE


def write_run_config(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
    record = {"format_version": FORMAT_VERSION, **config}
    write_json(Path(directory) / CONFIG_FILE, record)


def load_run(directory: str | os.PathLike) -> RunFiles:
    """Read and check a run directory: config, base weights, adapter, tokenizer.

    Raises:
        CheckpointError: naming the missing or mismatched file or tensor.
    """
    directory = Path(directory)
    if directory.is_file():
        raise CheckpointError(
            f"{directory} is a file, not a run directory; pass the directory that "
            "`twinformer train` wrote"
        )
    if not directory.is_dir():
        hint = ""
        if directory.with_name(directory.name + INCOMPLETE_SUFFIX).exists():
            hint = " (an unfinished run exists beside it with the suffix .incomplete)"
        raise CheckpointError(f"run directory {directory} not found{hint}")
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} is not a run directory: it has no {CONFIG_FILE}; pass a "
            "directory written by `twinformer train` or `twinformer merge`"
        )
    config = read_json(directory / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: unsupported format_version "
            f"{config.get('format_version') if isinstance(config, dict) else None!r}; "
            f"this version reads {FORMAT_VERSION}"
        )
    try:
        model_config = ModelConfig.from_dict(config["model"])
        lora_data = config.get("lora")
        lora_config = LoraConfig.from_dict(lora_data) if lora_data else None
    except (KeyError, TypeError, ConfigError) as error:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: invalid model or lora config: {error}"
        ) from None
    base = read_base_tensors(directory / MODEL_FILE, model_config)
    adapters = None
    if lora_config is not None:
        saved_lora, adapters = read_adapter(directory, model_config)
        if saved_lora != lora_config:
            raise CheckpointError(
                f"{directory}: LoRA config in {CONFIG_FILE} ({lora_config}) differs "
                f"from {ADAPTER_CONFIG_FILE} ({saved_lora})"
            )
    if not (directory / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{directory}: {TOKENIZER_FILE} not found; a run directory needs the "
            "tokenizer it was trained with"
        )
    return RunFiles(directory, config, model_config, lora_config, base, adapters)
