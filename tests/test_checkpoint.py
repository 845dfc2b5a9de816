"""Run-directory files: atomic writes, tensor I/O, adapters, loading checks."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from twinformer import checkpoint
from twinformer.config import LoraConfig, ModelConfig
from twinformer.errors import CheckpointError
from twinformer.param_map import adapter_tensor_specs, base_tensor_specs

CONFIG = ModelConfig(
    source_vocab_size=37,
    target_vocab_size=37,
    model_dim=35,
    num_heads=5,
    ff_dim=23,
    num_encoder_layers=1,
    num_decoder_layers=2,
)
LORA = LoraConfig(rank=3, alpha=6, targets=("query", "feed_forward.hidden"))


def random_tensors(specs, seed=0):
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in specs}


def test_tensors_round_trip_with_bfloat16(tmp_path):
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.linspace(0, 1, 5),
        "c": np.array([1.5, -2.0], dtype=ml_dtypes.bfloat16),
    }
    checkpoint.write_tensors(tmp_path / "t.safetensors", tensors)
    back = checkpoint.read_tensors(tmp_path / "t.safetensors")
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype, name
        assert np.array_equal(back[name], value), name


def test_read_tensors_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint.read_tensors(tmp_path / "absent.safetensors")


def test_read_tensors_truncated_file(tmp_path):
    path = tmp_path / "t.safetensors"
    checkpoint.write_tensors(path, {"a": np.ones((64, 64), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.read_tensors(path)


def test_read_tensors_not_safetensors(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoint.read_tensors(path)


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    checkpoint.write_json(path, {"old": 1})

    def broken_replace(source, target):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_json(path, {"new": 2})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_append_jsonl_keeps_earlier_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    checkpoint.append_jsonl(path, {"step": 1})
    checkpoint.append_jsonl(path, {"step": 2})
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 1}, {"step": 2}]


def test_adapter_round_trip(tmp_path):
    tensors = random_tensors(adapter_tensor_specs(CONFIG, LORA))
    checkpoint.write_adapter(tmp_path, tensors, LORA, CONFIG)
    lora, back = checkpoint.read_adapter(tmp_path, CONFIG)
    assert lora == LORA
    assert set(back) == set(tensors)
    assert all(np.array_equal(back[name], tensors[name]) for name in tensors)


def test_adapter_on_other_base_names_fields(tmp_path):
    tensors = random_tensors(adapter_tensor_specs(CONFIG, LORA))
    checkpoint.write_adapter(tmp_path, tensors, LORA, CONFIG)
    other = CONFIG.replace(ff_dim=29)
    with pytest.raises(CheckpointError, match="ff_dim: adapter 23 vs model 29"):
        checkpoint.read_adapter(tmp_path, other)


def test_adapter_ignores_dropout_and_attention_path(tmp_path):
    tensors = random_tensors(adapter_tensor_specs(CONFIG, LORA))
    checkpoint.write_adapter(tmp_path, tensors, LORA, CONFIG)
    same_weights = CONFIG.replace(dropout=0.0, attention="manual")
    lora, _ = checkpoint.read_adapter(tmp_path, same_weights)
    assert lora == LORA


def test_adapter_with_extra_tensor_is_rejected(tmp_path):
    tensors = random_tensors(adapter_tensor_specs(CONFIG, LORA))
    checkpoint.write_adapter(tmp_path, tensors, LORA, CONFIG)
    tensors["decoder.layers.0.cross_attention.key.lora_A"] = np.zeros((3, 35))
    checkpoint.write_tensors(tmp_path / checkpoint.ADAPTER_FILE, tensors)
    with pytest.raises(CheckpointError, match="cross_attention.key.lora_A"):
        checkpoint.read_adapter(tmp_path, CONFIG)


def write_run(directory, lora=None):
    checkpoint.write_run_config(
        directory,
        {
            "framework": "torch",
            "task": {"name": "copy"},
            "model": CONFIG.to_dict(),
            "lora": lora.to_dict() if lora else None,
        },
    )
    checkpoint.write_tensors(
        directory / checkpoint.MODEL_FILE, random_tensors(base_tensor_specs(CONFIG))
    )
    if lora:
        tensors = random_tensors(adapter_tensor_specs(CONFIG, lora))
        checkpoint.write_adapter(directory, tensors, lora, CONFIG)
    (directory / checkpoint.TOKENIZER_FILE).write_text("{}")


def test_run_directory_staging_and_load(tmp_path):
    out = tmp_path / "run"
    staging = checkpoint.start_run_directory(out)
    assert staging.name == "run.incomplete"
    write_run(staging, LORA)
    assert not out.exists()
    checkpoint.finish_run_directory(staging, out)
    assert not staging.exists()
    run = checkpoint.load_run(out)
    assert run.model_config == CONFIG
    assert run.lora_config == LORA
    assert run.adapter_tensors is not None
    assert len(run.base_tensors) == len(base_tensor_specs(CONFIG))


def test_start_refuses_non_empty_out(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(CheckpointError, match="--overwrite"):
        checkpoint.start_run_directory(out)
    assert (out / "keep.txt").read_text() == "user data"


def test_finish_replaces_old_run_whole(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    staging = checkpoint.start_run_directory(out, overwrite=True)
    (staging / "new.txt").write_text("new")
    checkpoint.finish_run_directory(staging, out)
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_load_run_missing_directory_mentions_incomplete(tmp_path):
    (tmp_path / "run.incomplete").mkdir()
    with pytest.raises(CheckpointError, match="unfinished run"):
        checkpoint.load_run(tmp_path / "run")


@pytest.mark.parametrize(
    "broken_file, message",
    [
        (checkpoint.MODEL_FILE, "model.safetensors: file not found"),
        (checkpoint.TOKENIZER_FILE, "tokenizer.json not found"),
        (checkpoint.CONFIG_FILE, "is not a run directory: it has no config.json"),
        (checkpoint.ADAPTER_FILE, "adapter.safetensors: file not found"),
    ],
)
def test_load_run_missing_file(tmp_path, broken_file, message):
    write_run(tmp_path, LORA)
    (tmp_path / broken_file).unlink()
    with pytest.raises(CheckpointError, match=message):
        checkpoint.load_run(tmp_path)


def test_load_run_mismatched_weights(tmp_path):
    write_run(tmp_path)
    other = CONFIG.replace(model_dim=40, num_heads=5)
    tensors = random_tensors(base_tensor_specs(other))
    checkpoint.write_tensors(tmp_path / checkpoint.MODEL_FILE, tensors)
    with pytest.raises(CheckpointError, match="has shape"):
        checkpoint.load_run(tmp_path)


def test_load_run_bad_format_version(tmp_path):
    write_run(tmp_path)
    config = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
    config["format_version"] = 99
    (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format_version 99"):
        checkpoint.load_run(tmp_path)


def test_written_files_follow_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        checkpoint.write_json(tmp_path / "config.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644


def test_load_run_on_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file, not a run directory"):
        checkpoint.load_run(path)
