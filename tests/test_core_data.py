"""Encoding with length checks, padding, and batch iterators."""

import numpy as np
import pytest

from twinformer.config import BOS_ID, EOS_ID, PAD_ID
from twinformer.data import (
    encode_pairs,
    encode_sources,
    make_batch,
    ordered_batches,
    shuffled_batches,
)
from twinformer.errors import DataError
from twinformer.tokenization import Tokenizer

TOKENIZER = Tokenizer.from_symbols([str(i) for i in range(11)])


def _pairs(count):
    return [
        (" ".join(["1"] * (i % 5 + 1)), " ".join(["2"] * (i % 3 + 1)))
        for i in range(count)
    ]


def test_make_batch_layout():
    batch = make_batch(
        [np.array([5, 6, 7], np.int32), np.array([8], np.int32)],
        [np.array([9, 10], np.int32), np.array([11, 12, 13], np.int32)],
    )
    np.testing.assert_array_equal(batch.source_ids, [[5, 6, 7], [8, PAD_ID, PAD_ID]])
    np.testing.assert_array_equal(
        batch.target_input_ids, [[BOS_ID, 9, 10, PAD_ID], [BOS_ID, 11, 12, 13]]
    )
    np.testing.assert_array_equal(
        batch.target_output_ids, [[9, 10, EOS_ID, PAD_ID], [11, 12, 13, EOS_ID]]
    )
    for array in (batch.source_ids, batch.target_input_ids, batch.target_output_ids):
        assert array.dtype == np.int32


def test_encode_pairs_too_long_names_example():
    pairs = [("1 2", "3"), ("1 2 3 4 5 6", "1")]
    with pytest.raises(
        DataError, match=r"example 1 .*source 6 tokens.*max_length is 5"
    ):
        encode_pairs(pairs, TOKENIZER, max_length=5)


def test_encode_pairs_target_needs_eos_room():
    # 5 target tokens + EOS = 6 > 5.
    with pytest.raises(DataError, match="target 6 tokens"):
        encode_pairs([("1", "1 2 3 4 5")], TOKENIZER, max_length=5)


def test_encode_pairs_skip_long_counts():
    pairs = [("1 2", "3"), ("1 2 3 4 5 6", "1"), ("4", "1 2 3 4 5")]
    encoded, skipped = encode_pairs(pairs, TOKENIZER, max_length=5, skip_long=True)
    assert skipped == 2
    assert len(encoded) == 1
    assert encoded.sources[0].tolist() == TOKENIZER.encode("1 2")


def test_encode_sources_errors():
    # Inputs are numbered from 1, as the command line's messages are.
    with pytest.raises(DataError, match="input 2 is empty"):
        encode_sources(["1", "  "], TOKENIZER, max_length=7)
    with pytest.raises(DataError, match="input 1 has 8 tokens"):
        encode_sources(["1 " * 8], TOKENIZER, max_length=7)


def test_shuffled_batches_seeded_and_full():
    encoded, _ = encode_pairs(_pairs(13), TOKENIZER, max_length=11)
    first = shuffled_batches(encoded, batch_size=5, seed=3)
    again = shuffled_batches(encoded, batch_size=5, seed=3)
    for _ in range(7):
        a, b = next(first), next(again)
        assert a.source_ids.shape[0] == 5
        np.testing.assert_array_equal(a.source_ids, b.source_ids)
        np.testing.assert_array_equal(a.target_output_ids, b.target_output_ids)


def test_shuffled_batches_cover_epoch():
    pairs = [(str(i), str(i)) for i in range(11)]
    encoded, _ = encode_pairs(pairs, TOKENIZER, max_length=3)
    batches = shuffled_batches(encoded, batch_size=11, seed=0)
    epochs = [sorted(next(batches).source_ids[:, 0].tolist()) for _ in range(2)]
    expected = sorted(TOKENIZER.encode(str(i))[0] for i in range(11))
    assert epochs == [expected, expected]


def test_ordered_batches_keep_order():
    encoded, _ = encode_pairs(_pairs(13), TOKENIZER, max_length=11)
    sizes = [batch.source_ids.shape[0] for batch in ordered_batches(encoded, 5)]
    assert sizes == [5, 5, 3]
