"""Run directories move between the twins through the command line.

A run trained with one framework is evaluated, decoded and fine-tuned with
the other; the metrics agree and a LoRA fine-tune leaves the base file intact.
"""

import json

import pytest

from twinformer import checkpoint
from twinformer.cli import main

# A tiny model, so that training and JAX compilation stay within seconds.
SIZES = [
    "--model-dim", "14", "--num-heads", "2", "--ff-dim", "23",
    "--num-layers", "1", "--max-length", "13", "--batch-size", "16",
    "--eval-every", "30", "--eval-examples", "23", "--warmup-steps", "10",
]  # fmt: skip
PAIRS = [
    ("the cat sleeps", "le chat dort"),
    ("the dog sleeps", "le chien dort"),
    ("a cat eats", "un chat mange"),
    ("a dog eats", "un chien mange"),
    ("the cat eats", "le chat mange"),
    ("the dog eats", "le chien mange"),
    ("a cat sleeps", "un chat dort"),
    ("a dog sleeps", "un chien dort"),
    ("the bird sings", "l'oiseau chante"),
    ("a bird eats", "un oiseau mange"),
    ("the bird sleeps", "l'oiseau dort"),
    ("a bird sings", "un oiseau chante"),
]


def train(*argv):
    assert main(["train", *SIZES, *(str(arg) for arg in argv)]) == 0


def scores(run, framework, tmp_path, *extra):
    report = tmp_path / f"{run.name}-{framework}.json"
    argv = ["evaluate", run, "--framework", framework, "--json", report, *extra]
    assert main([str(arg) for arg in argv]) == 0
    return json.loads(report.read_text())


def translations(run, framework, capsys, *texts, beam_size=1):
    capsys.readouterr()
    argv = ["translate", run, "--framework", framework, "--beam-size", beam_size]
    assert main([str(arg) for arg in [*argv, *texts]]) == 0
    return capsys.readouterr().out.splitlines()


@pytest.fixture(scope="module")
def torch_translate_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cross")
    data = directory / "pairs.tsv"
    data.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS * 3), encoding="utf-8")
    out = directory / "mt-torch"
    train("--framework", "torch", "--task", "translate", "--data", data,
          "--vocab-size", "61", "--steps", "60", "--out", out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def jax_reverse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross") / "rev-jax"
    train("--framework", "jax", "--task", "reverse", "--steps", "60", "--out", out)
    return out


def assert_same_scores(first, second):
    assert set(first) == set(second)
    for name in first:
        # Both twins decode the same ids, so every metric agrees; the loss is
        # float32 arithmetic in two frameworks, equal to about 1e-6.
        assert round(first[name], 2) == round(second[name], 2), name


def test_torch_run_evaluates_same_in_jax(torch_translate_run, tmp_path):
    torch_scores = scores(torch_translate_run, "torch", tmp_path)
    jax_scores = scores(torch_translate_run, "jax", tmp_path)
    assert {"bleu", "chrf", "exact_match"} <= set(torch_scores)
    assert_same_scores(torch_scores, jax_scores)


def test_torch_run_beam_search_same_in_jax(torch_translate_run, tmp_path):
    torch_scores = scores(torch_translate_run, "torch", tmp_path, "--beam-size", 3)
    jax_scores = scores(torch_translate_run, "jax", tmp_path, "--beam-size", 3)
    assert_same_scores(torch_scores, jax_scores)


def test_jax_run_evaluates_same_in_torch(jax_reverse_run, tmp_path):
    config = json.loads((jax_reverse_run / "config.json").read_text())
    assert config["framework"] == "jax"
    assert_same_scores(
        scores(jax_reverse_run, "jax", tmp_path),
        scores(jax_reverse_run, "torch", tmp_path),
    )


def test_translations_match_across_frameworks(torch_translate_run, capsys):
    texts = ["the cat sleeps", "a bird eats", "the dog sings"]
    for beam_size in (1, 4):
        from_torch = translations(torch_translate_run, "torch", capsys, *texts,
                                  beam_size=beam_size)  # fmt: skip
        from_jax = translations(torch_translate_run, "jax", capsys, *texts,
                                beam_size=beam_size)  # fmt: skip
        assert len(from_torch) == len(texts)
        assert from_torch == from_jax


def test_jax_lora_from_torch_base_keeps_base(torch_translate_run, tmp_path, capsys):
    base_file = torch_translate_run / checkpoint.MODEL_FILE
    base_bytes = base_file.read_bytes()
    out = tmp_path / "lora-jax"
    train("--framework", "jax", "--task", "translate",
          "--data", torch_translate_run.parent / "pairs.tsv",
          "--init-from", torch_translate_run, "--lora-rank", "2",
          "--lora-targets", "all", "--steps", "20", "--out", out)  # fmt: skip
    assert (out / checkpoint.MODEL_FILE).read_bytes() == base_bytes
    assert base_file.read_bytes() == base_bytes
    run = checkpoint.load_run(out)
    assert run.lora_config is not None
    assert run.lora_config.rank == 2
    assert json.loads((out / "config.json").read_text())["framework"] == "jax"
    # Trained adapters differ from a fresh one, whose B is zero.
    assert any(
        abs(value).max() > 0
        for name, value in run.adapter_tensors.items()
        if name.endswith("lora_B")
    )
    texts = ["the cat sleeps", "a dog eats"]
    assert translations(out, "jax", capsys, *texts) == translations(
        out, "torch", capsys, *texts
    )
