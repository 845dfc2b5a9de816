"""Greedy and beam search of the PyTorch twin, with and without the cache.

The fixture model (seed 3, untied output) ends the five rows of the fixture
batch at different steps, and one row never emits EOS within 12 tokens.
``test_fixture_rows_end_at_different_steps`` checks that this stays true.
"""

import pytest
import torch

from torch_impl.decode import beam_search, greedy_search, length_penalty_factor
from torch_impl.lora import inject_lora, lora_layers, merge_lora
from torch_impl.model import Transformer
from twinformer.config import BOS_ID, EOS_ID, PAD_ID, LoraConfig, ModelConfig
from twinformer.errors import ConfigError

VOCAB, MAX_NEW = 37, 12


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run on one CPU thread: for models this small, torch's thread pool
    costs more than it gains, and on a busy machine it slows steps by 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def decode_model(dtype=torch.float64) -> Transformer:
    config = ModelConfig(
        source_vocab_size=VOCAB,
        target_vocab_size=VOCAB,
        model_dim=35,
        num_heads=5,
        ff_dim=22,
        num_encoder_layers=2,
        num_decoder_layers=2,
        max_length=17,
        tie_output=False,
    )
    generator = torch.Generator().manual_seed(3)
    return Transformer(config, dtype, generator).eval()


def source_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    source = torch.randint(4, VOCAB, (5, 11), generator=generator)
    source[1, 6:] = PAD_ID
    source[3, 3:] = PAD_ID
    return source


def eos_positions(ids: torch.Tensor) -> list[int | None]:
    positions = []
    for row in ids:
        hits = (row == EOS_ID).nonzero().flatten().tolist()
        positions.append(hits[0] if hits else None)
    return positions


def test_fixture_rows_end_at_different_steps():
    ends = eos_positions(greedy_search(decode_model(), source_batch(), MAX_NEW))
    assert None in ends
    assert len({end for end in ends if end is not None}) >= 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_greedy_cached_matches_uncached(dtype):
    model, source = decode_model(dtype), source_batch()
    cached = greedy_search(model, source, MAX_NEW)
    uncached = greedy_search(model, source, MAX_NEW, use_cache=False)
    assert torch.equal(cached, uncached)


def test_greedy_rows_stop_at_own_eos():
    ids = greedy_search(decode_model(), source_batch(), MAX_NEW)
    assert ids.shape == (5, MAX_NEW)  # one row never ends, so all steps run
    for row, end in zip(ids, eos_positions(ids), strict=True):
        if end is None:
            assert (row != PAD_ID).all()
        else:
            assert (row[end + 1 :] == PAD_ID).all()
            assert (row[:end] != EOS_ID).all()


def test_greedy_loop_ends_when_all_rows_done():
    source = source_batch()[[0, 2, 3, 4]]  # the rows that reach EOS
    ids = greedy_search(decode_model(), source, MAX_NEW)
    ends = eos_positions(ids)
    assert None not in ends
    assert ids.shape == (4, max(ends) + 1)


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    [
        # float64: per-step and whole-prefix matmuls sum in other orders.
        (torch.float64, 1e-12),
        # float32: the same reordering at eps 6e-8 through 4 layers.
        (torch.float32, 1e-5),
    ],
)
def test_cached_logits_match_full_decode(dtype, tolerance):
    model, source = decode_model(dtype), source_batch()
    ids = greedy_search(model, source, MAX_NEW)
    prefix = torch.cat([torch.full((5, 1), BOS_ID), ids[:, :-1]], dim=1)
    with torch.no_grad():
        memory = model.encode(source)
        full = model.decode(prefix, memory, source)
        cache = model.init_cache(memory, MAX_NEW)
        steps = [
            model.decode(prefix[:, t : t + 1], memory, source, cache)
            for t in range(MAX_NEW)
        ]
    stepwise = torch.cat(steps, dim=1)
    assert cache["position"] == MAX_NEW
    error = (stepwise - full).abs().max() / full.abs().max()
    assert float(error) < tolerance


def test_beam_size_one_equals_greedy():
    model, source = decode_model(), source_batch()
    greedy = greedy_search(model, source, MAX_NEW)
    ids, scores = beam_search(model, source, MAX_NEW, beam_size=1)
    assert ids.shape == (5, 1, greedy.shape[1])
    assert torch.equal(ids[:, 0], greedy)
    assert scores.shape == (5, 1)


def sequence_log_prob(model, source, ids):
    """Sum of log p over the tokens of ids (1, L) up to EOS, by a full decode."""
    length = int((ids != PAD_ID).sum())
    tokens = ids[:, :length]
    prefix = torch.cat([torch.full((1, 1), BOS_ID), tokens[:, :-1]], dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(source, prefix), dim=-1)
    return log_probs.gather(-1, tokens[..., None]).sum(), length


def test_beam_scores_follow_length_penalty():
    model, source = decode_model(), source_batch()
    ids, scores = beam_search(model, source, MAX_NEW, beam_size=4, num_return=3)
    assert ids.shape[:2] == (5, 3)
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    for b in range(5):
        for k in range(3):
            total, length = sequence_log_prob(
                model, source[b : b + 1], ids[b, k : k + 1]
            )
            expected = total / length_penalty_factor(length, 0.6)
            # float64: the same log-probs summed stepwise vs in one decode.
            assert float(scores[b, k]) == pytest.approx(float(expected), abs=1e-10)


def test_beam_cached_matches_uncached():
    model, source = decode_model(), source_batch()
    cached_ids, cached_scores = beam_search(model, source, MAX_NEW, 4, num_return=4)
    ids, scores = beam_search(model, source, MAX_NEW, 4, num_return=4, use_cache=False)
    assert torch.equal(cached_ids, ids)
    # float64: cached and full decodes round differently, ~1e-15 per logit.
    assert torch.allclose(cached_scores, scores, atol=1e-10, rtol=0)


def test_beam_batch_matches_single_rows():
    model, source = decode_model(), source_batch()
    ids, scores = beam_search(model, source, MAX_NEW, 3, num_return=2)
    for b in range(5):
        row_ids, row_scores = beam_search(model, source[b : b + 1], MAX_NEW, 3, 0.6, 2)
        length = row_ids.shape[-1]
        assert torch.equal(ids[b, :, :length], row_ids[0]), f"row {b}"
        assert (ids[b, :, length:] == PAD_ID).all(), f"row {b}"
        # float64: the same sums; batching changes only matmul blocking.
        assert torch.allclose(scores[b], row_scores[0], atol=1e-10, rtol=0)


def test_decoding_same_with_lora_merged():
    model, source = decode_model(), source_batch()
    inject_lora(model, LoraConfig(rank=3, alpha=5.0, targets=("all",)))
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_(std=0.1, generator=generator)
    greedy = greedy_search(model, source, MAX_NEW)
    beams, _ = beam_search(model, source, MAX_NEW, 3)
    uncached = greedy_search(model, source, MAX_NEW, use_cache=False)
    merge_lora(model)
    assert torch.equal(greedy_search(model, source, MAX_NEW), greedy)
    assert torch.equal(beam_search(model, source, MAX_NEW, 3)[0], beams)
    assert torch.equal(uncached, greedy)


@pytest.mark.parametrize(
    ("max_new_tokens", "beam_size", "num_return", "message"),
    [
        (0, 2, 1, "max_new_tokens must be an integer in \\[1, 16\\]"),
        (17, 2, 1, "max_new_tokens must be an integer in \\[1, 16\\]"),
        (5, 0, 1, "beam_size must be a positive integer, got 0"),
        (5, 2, 3, "num_return must be an integer in \\[1, beam_size=2\\]"),
    ],
)
def test_beam_rejects_bad_requests(max_new_tokens, beam_size, num_return, message):
    model, source = decode_model(), source_batch()
    with pytest.raises(ConfigError, match=message):
        beam_search(model, source, max_new_tokens, beam_size, num_return=num_return)


def test_greedy_rejects_bad_length():
    model, source = decode_model(), source_batch()
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_search(model, source, 0)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        greedy_search(model, source, 17)


def test_decoded_tensors_allow_edits():
    # Decoding runs under inference_mode. Its results must still take
    # in-place edits, and the model must still train afterwards.
    model, source = decode_model(), source_batch()
    ids = greedy_search(model, source, MAX_NEW)
    beam_ids, scores = beam_search(model, source, MAX_NEW, beam_size=2)
    for tensor in (ids, beam_ids, scores):
        assert not tensor.is_inference()
    ids[ids == EOS_ID] = PAD_ID
    beam_ids[:, :, 0] = BOS_ID

    model.train()
    logits = model(source, torch.full_like(source, BOS_ID))
    logits.sum().backward()
    assert model.target_embedding.weight.grad is not None
