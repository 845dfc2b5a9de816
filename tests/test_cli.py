"""The twinformer command end to end, with the torch Runner on a tiny model."""

import io
import json
import re
import subprocess
import sys
import types

import pytest

from twinformer import checkpoint
from twinformer.cli import main

TINY = [
    "--framework", "torch", "--model-dim", "14", "--num-heads", "2",
    "--ff-dim", "23", "--num-layers", "1", "--max-length", "13",
    "--batch-size", "8", "--steps", "6", "--eval-every", "3",
    "--eval-examples", "11", "--warmup-steps", "3",
]  # fmt: skip
TSV_LINES = [
    "the cat sleeps\tle chat dort\tattribution",
    "the dog sleeps\tle chien dort",
    "the dog sleeps\tle chien sommeille",
    "a cat eats\tun chat mange",
    "a dog eats\tun chien mange",
    "the cat eats\tle chat mange",
    "the dog eats\tle chien mange",
    "a cat sleeps\tun chat dort",
    "a dog sleeps\tun chien dort",
    "the bird sings\tl'oiseau chante",
    "a bird eats\tun oiseau mange",
    "the bird sleeps\tl'oiseau dort",
] * 2


def _run(capsys, *argv):
    status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reverse"
    assert main(["train", *TINY, "--task", "reverse", "--out", str(out)]) == 0
    return out


def test_train_writes_run_directory(reverse_run):
    names = sorted(path.name for path in reverse_run.iterdir())
    assert names == sorted(
        ["config.json", "metrics.jsonl", "model.safetensors", "tokenizer.json",
         "valid.tsv"]
    )  # fmt: skip
    assert not reverse_run.with_name("reverse.incomplete").exists()
    config = json.loads((reverse_run / "config.json").read_text())
    assert config["task"] == "reverse"
    assert config["framework"] == "torch"
    assert config["model"]["model_dim"] == 14
    assert config["lora"] is None


def test_train_metrics_lines(reverse_run):
    lines = (reverse_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["step"] for record in records] == [3, 6]
    for record in records:
        assert set(record) == {
            "step", "train_loss", "valid_loss", "learning_rate", "metrics"
        }  # fmt: skip
        assert set(record["metrics"]) == {"token_accuracy", "exact_match"}
        assert record["learning_rate"] > 0


def test_train_summary_line(tmp_path, capsys):
    out = tmp_path / "copy"
    status, stdout, _ = _run(capsys, "train", *TINY, "--task", "copy", "--out", out)
    assert status == 0
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("step=6 ")
    assert "exact_match=" in last


def test_train_refuses_existing_out(reverse_run, capsys):
    before = (reverse_run / "model.safetensors").read_bytes()
    status, _, err = _run(
        capsys, "train", *TINY, "--task", "copy", "--out", reverse_run
    )
    assert status == 2
    assert "error:" in err
    assert "--overwrite" in err
    assert (reverse_run / "model.safetensors").read_bytes() == before


def test_train_bad_data_leaves_nothing(tmp_path, capsys):
    data = tmp_path / "bad.tsv"
    data.write_text("one\tun\ntwo deux\n", encoding="utf-8")
    out = tmp_path / "bad_run"
    status, _, err = _run(
        capsys, "train", *TINY, "--task", "translate", "--data", data, "--out", out
    )
    assert status == 2
    assert "line 2: no tab" in err
    assert not out.exists()
    assert not out.with_name("bad_run.incomplete").exists()


def test_train_missing_data_file(tmp_path, capsys):
    out = tmp_path / "run"
    status, _, err = _run(
        capsys, "train", *TINY, "--task", "translate", "--data",
        tmp_path / "absent.tsv", "--out", out,
    )  # fmt: skip
    assert status == 2
    assert "not found" in err
    assert not out.exists()


def test_train_invalid_heads(tmp_path, capsys):
    status, _, err = _run(
        capsys, "train", *TINY, "--num-heads", "3", "--task", "copy",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert status == 2
    assert "divisible by num_heads" in err


def test_evaluate_json(reverse_run, tmp_path, capsys):
    report = tmp_path / "scores.json"
    status, stdout, _ = _run(capsys, "evaluate", reverse_run, "--json", report)
    assert status == 0
    scores = json.loads(report.read_text())
    assert set(scores) == {"valid_loss", "token_accuracy", "exact_match"}
    assert f"exact_match={scores['exact_match']:.4f}" in stdout


def test_evaluate_beam_and_data(reverse_run, tmp_path, capsys):
    data = tmp_path / "extra.tsv"
    data.write_text("1 2 3\t3 2 1\n4 5\t5 4\n", encoding="utf-8")
    status, stdout, _ = _run(
        capsys, "evaluate", reverse_run, "--data", data, "--beam-size", "3"
    )
    assert status == 0
    assert "token_accuracy=" in stdout


def test_evaluate_missing_run(tmp_path, capsys):
    status, _, err = _run(capsys, "evaluate", tmp_path / "nothing")
    assert status == 2
    assert "not found" in err


def test_evaluate_missing_model_file(reverse_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in reverse_run.iterdir():
        if path.name != "model.safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    status, _, err = _run(capsys, "evaluate", broken)
    assert status == 2
    assert "model.safetensors" in err


def test_translate_arguments_and_stdin(reverse_run, capsys, monkeypatch):
    status, stdout, _ = _run(capsys, "translate", reverse_run, "1 2 3", "4 5")
    assert status == 0
    assert len(stdout.splitlines()) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("1 2\n3 4\n5\n"))
    status, stdout, _ = _run(capsys, "translate", reverse_run, "-", "--beam-size", 2)
    assert status == 0
    assert len(stdout.splitlines()) == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["   "], "input 1 is empty"),
        (["1 2", "--beam-size", "0"], "--beam-size must be at least 1"),
        (["1 2", "--max-length", "13"], r"--max-length must lie in \[1, 12\]"),
        (["1 2", "--max-length", "0"], "--max-length must lie"),
    ],
)
def test_translate_bad_input(reverse_run, capsys, extra, message):
    status, stdout, err = _run(capsys, "translate", reverse_run, *extra)
    assert status == 2
    assert stdout == ""
    assert re.search(message, err), err


def test_translate_task_reports_bleu(tmp_path, capsys):
    data = tmp_path / "pairs.tsv"
    data.write_text("\n".join(TSV_LINES) + "\n", encoding="utf-8")
    out = tmp_path / "mt"
    status, stdout, _ = _run(
        capsys, "train", *TINY, "--task", "translate", "--data", data,
        "--vocab-size", "61", "--out", out,
    )  # fmt: skip
    assert status == 0
    last = stdout.strip().splitlines()[-1]
    for name in ("exact_match=", "bleu=", "chrf="):
        assert name in last
    valid_sources = {line.split("\t")[0] for line in
                     (out / "valid.tsv").read_text().splitlines()}  # fmt: skip
    train_sources = {line.split("\t")[0] for line in TSV_LINES} - valid_sources
    assert valid_sources
    assert train_sources


def test_lora_init_from_and_merge(reverse_run, tmp_path, capsys):
    lora = tmp_path / "lora"
    status, _, _ = _run(
        capsys, "train", "--framework", "torch", "--task", "sort",
        "--init-from", reverse_run, "--lora-rank", "2", "--lora-targets", "all",
        "--steps", "4", "--eval-every", "2", "--eval-examples", "5",
        "--batch-size", "8", "--out", lora,
    )  # fmt: skip
    assert status == 0
    base_bytes = (reverse_run / "model.safetensors").read_bytes()
    assert (lora / "model.safetensors").read_bytes() == base_bytes
    assert (lora / "adapter.safetensors").is_file()
    adapter = checkpoint.read_tensors(lora / "adapter.safetensors")
    assert adapter and all(name.endswith(("lora_A", "lora_B")) for name in adapter)

    merged = tmp_path / "merged"
    status, _, _ = _run(capsys, "merge", lora, "--out", merged)
    assert status == 0
    assert not (merged / "adapter.safetensors").exists()
    assert json.loads((merged / "config.json").read_text())["lora"] is None
    assert (merged / "model.safetensors").read_bytes() != base_bytes
    status, lora_out, _ = _run(capsys, "translate", lora, "3 1 2", "5 4")
    assert status == 0
    status, merged_out, _ = _run(capsys, "translate", merged, "3 1 2", "5 4")
    assert status == 0
    assert merged_out == lora_out


def test_init_from_size_conflict(reverse_run, tmp_path, capsys):
    status, _, err = _run(
        capsys, "train", "--framework", "torch", "--task", "copy",
        "--init-from", reverse_run, "--model-dim", "32", "--out", tmp_path / "x",
    )  # fmt: skip
    assert status == 2
    assert "model_dim=32 (base run has 14)" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--lora-rank", "0"], "--lora-rank must be a positive integer, got 0"),
        (["--lora-rank", "2", "--lora-targets", ","], "--lora-targets is empty"),
        (["--lora-rank", "2", "--lora-targets", "attn"], "'attn' matches no"),
        (["--lora-rank", "15"], "LoRA rank 15 exceeds min(in, out) = 14"),
    ],
)
def test_bad_lora_options(reverse_run, tmp_path, capsys, options, message):
    status, _, err = _run(
        capsys, "train", "--framework", "torch", "--task", "sort",
        "--init-from", reverse_run, "--steps", "2", *options,
        "--out", tmp_path / "lora",
    )  # fmt: skip
    assert status == 2
    assert message in err
    assert not (tmp_path / "lora").exists()
    assert not (tmp_path / "lora.incomplete").exists()


def test_merge_plain_run_rejected(reverse_run, tmp_path, capsys):
    status, _, err = _run(capsys, "merge", reverse_run, "--out", tmp_path / "m")
    assert status == 2
    assert "no LoRA adapter" in err
    assert not (tmp_path / "m").exists()


def test_plot_png(reverse_run, tmp_path, capsys):
    image = tmp_path / "loss.png"
    status, _, _ = _run(capsys, "plot", reverse_run, reverse_run, "--out", image)
    assert status == 0
    assert image.read_bytes().startswith(b"\x89PNG")


def test_plot_missing_metrics(tmp_path, capsys):
    status, _, err = _run(capsys, "plot", tmp_path, "--out", tmp_path / "x.png")
    assert status == 2
    assert "metrics.jsonl not found" in err


def test_parity_passes_arguments(monkeypatch):
    received = []
    report = types.ModuleType("parity.report")
    report.main = lambda argv: received.append(argv) or 3
    monkeypatch.setitem(sys.modules, "parity.report", report)
    argv = ["--dtype", "float64", "--lora-rank", "2", "--json", "out.json"]
    assert main(["parity", *argv]) == 3
    assert received == [argv]


def test_torch_train_does_not_import_jax(tmp_path):
    code = (
        "import sys\n"
        "from twinformer.cli import main\n"
        f"argv = {['train', *TINY, '--steps', '2', '--task', 'copy']!r}\n"
        f"assert main(argv + ['--out', {str(tmp_path / 'run')!r}]) == 0\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_help_does_not_import_jax():
    code = (
        "import sys\n"
        "from twinformer.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_lora_option_without_rank(tmp_path, capsys):
    status, _, err = _run(
        capsys, "train", *TINY, "--task", "copy", "--lora-alpha", "4", "--rslora",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert status == 2
    assert "--lora-alpha, --rslora given without --lora-rank" in err
    assert not (tmp_path / "run").exists()


def test_unwritable_out_is_user_error(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    status, _, err = _run(
        capsys, "train", *TINY, "--task", "copy", "--out", blocker / "run"
    )
    assert status == 2
    assert "Not a directory" in err
    assert "Traceback" not in err


def test_evaluate_json_folder_checked_first(reverse_run, tmp_path, capsys):
    report = tmp_path / "absent" / "scores.json"
    status, stdout, err = _run(capsys, "evaluate", reverse_run, "--json", report)
    assert status == 2
    assert "does not exist" in err
    assert stdout == ""


def test_translate_stdin_dash_must_be_alone(reverse_run, capsys):
    status, _, err = _run(capsys, "translate", reverse_run, "-", "1 2")
    assert status == 2
    assert "must be the only TEXT argument" in err


def test_interrupt_exits_130_without_traceback(monkeypatch, capsys):
    import twinformer.training

    def interrupted(request):
        raise KeyboardInterrupt

    monkeypatch.setattr(twinformer.training, "train_run", interrupted)
    status, _, err = _run(capsys, "train", *TINY, "--task", "copy", "--out", "x")
    assert status == 130
    assert "interrupted" in err
