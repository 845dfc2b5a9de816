"""Symbol and subword tokenizers: round trips, special ids, save and load."""

import pytest

from twinformer.config import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID
from twinformer.errors import CheckpointError, ConfigError
from twinformer.tokenization import Tokenizer

TEXTS = [
    "the cat sat on the mat",
    "le chat est sur le tapis",
    "the dog sat on the log",
    "élan naïf, façon café",
] * 3


def test_symbol_tokenizer_round_trip():
    tokenizer = Tokenizer.from_symbols([str(i) for i in range(13)])
    assert tokenizer.vocab_size == 17
    ids = tokenizer.encode("3 1 12")
    assert ids == [7, 5, 16]
    assert tokenizer.decode(ids) == "3 1 12"


def test_symbol_tokenizer_unknown():
    tokenizer = Tokenizer.from_symbols(["a", "b"])
    ids = tokenizer.encode("a z b")
    assert ids[1] == UNK_ID
    assert Tokenizer.count_unknown(ids) == 1


def test_symbol_tokenizer_rejects_duplicates():
    with pytest.raises(ConfigError, match="duplicates"):
        Tokenizer.from_symbols(["a", "a"])
    with pytest.raises(ConfigError, match="special"):
        Tokenizer.from_symbols(["<s>", "a"])


def test_decode_stops_at_eos():
    tokenizer = Tokenizer.from_symbols(["a", "b", "c"])
    a, b, c = tokenizer.encode("a b c")
    assert tokenizer.decode([BOS_ID, a, b, EOS_ID, c, PAD_ID]) == "a b"
    assert tokenizer.decode([a, PAD_ID, c]) == "a c"


def test_subword_special_ids():
    tokenizer = Tokenizer.train_subword(TEXTS, vocab_size=97)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.backend.id_to_token(token_id) == token
    assert len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 97


def test_subword_round_trip():
    tokenizer = Tokenizer.train_subword(TEXTS, vocab_size=97)
    for text in TEXTS[:4]:
        ids = tokenizer.encode(text)
        assert UNK_ID not in ids
        assert tokenizer.decode(ids) == text


def test_subword_unseen_character():
    tokenizer = Tokenizer.train_subword(TEXTS, vocab_size=97)
    ids = tokenizer.encode("the cat Ω")
    assert Tokenizer.count_unknown(ids) == 1
    assert "<unk>" in tokenizer.decode(ids)


def test_tokenizer_save_load(tmp_path):
    tokenizer = Tokenizer.train_subword(TEXTS, vocab_size=61)
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.load(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid tokenizer"):
        Tokenizer.load(broken)
