"""Synthetic tasks, TSV reading with line-numbered errors, and splits."""

import pytest

from twinformer.errors import ConfigError, DataError
from twinformer.tasks import (
    SyntheticSpec,
    apply_task,
    group_references,
    load_split,
    make_synthetic_split,
    read_tsv,
    split_pairs,
)

SPEC = SyntheticSpec(
    num_symbols=7, min_length=2, max_length=5, train_size=300, valid_size=37
)


def test_apply_task_rules():
    symbols = ["3", "1", "12", "4"]
    assert apply_task("copy", symbols) == ["3", "1", "12", "4"]
    assert apply_task("reverse", symbols) == ["4", "12", "1", "3"]
    # Numeric order, not string order: "12" sorts after "4".
    assert apply_task("sort", symbols) == ["1", "3", "4", "12"]


def test_synthetic_split_targets_follow_task():
    split = make_synthetic_split("reverse", seed=5, spec=SPEC)
    for source, target in split.train + split.valid:
        assert target.split() == source.split()[::-1]
        assert 2 <= len(source.split()) <= 5
        assert all(0 <= int(symbol) < 7 for symbol in source.split())


def test_synthetic_split_sizes_and_disjoint():
    split = make_synthetic_split("sort", seed=3, spec=SPEC)
    assert len(split.train) == 300
    assert len(split.valid) == 37
    valid_sources = {source for source, _ in split.valid}
    assert len(valid_sources) == 37
    assert not valid_sources & {source for source, _ in split.train}


def test_synthetic_split_seeded():
    first = make_synthetic_split("copy", seed=11, spec=SPEC)
    again = make_synthetic_split("copy", seed=11, spec=SPEC)
    other = make_synthetic_split("copy", seed=13, spec=SPEC)
    assert first == again
    assert first.valid != other.valid


def test_synthetic_spec_too_small():
    spec = SyntheticSpec(num_symbols=2, min_length=1, max_length=2, valid_size=5)
    with pytest.raises(ConfigError, match="distinct sequences"):
        make_synthetic_split("copy", seed=0, spec=spec)


def test_synthetic_unknown_task():
    with pytest.raises(ConfigError, match="unknown synthetic task 'rotate'"):
        make_synthetic_split("rotate", seed=0, spec=SPEC)


def _write(tmp_path, data: bytes):
    path = tmp_path / "pairs.tsv"
    path.write_bytes(data)
    return path


def test_read_tsv_columns_and_endings(tmp_path):
    data = "\ufeffHi.\tSalut.\tCC-BY 2.0 (France)\r\n Go \t Va ! \n".encode()
    pairs = read_tsv(_write(tmp_path, data))
    assert pairs == [("Hi.", "Salut."), ("Go", "Va !")]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"a\tb\nno tab here\n", "line 2: no tab"),
        (b"a\tb\nc\td\n\t x\n", "line 3: empty source"),
        (b"a\tb\nc\t  \n", "line 2: empty target"),
        (b"a\tb\n\nc\td\n", "line 2: blank line"),
        (b"a\tb\nc\t\xff\xfe\n", "line 2: invalid UTF-8"),
        (b"", "is empty"),
    ],
)
def test_read_tsv_errors(tmp_path, data, message):
    with pytest.raises(DataError, match=message):
        read_tsv(_write(tmp_path, data))


def test_read_tsv_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_tsv(tmp_path / "absent.tsv")


def _pairs_with_repeats():
    pairs = []
    for index in range(41):
        pairs.append((f"source {index}", f"target {index}"))
        if index % 3 == 0:
            pairs.append((f"source {index}", f"other target {index}"))
    return pairs


def test_split_pairs_by_source():
    pairs = _pairs_with_repeats()
    split = split_pairs(pairs, seed=2, valid_fraction=0.25)
    train_sources = {source for source, _ in split.train}
    valid_sources = {source for source, _ in split.valid}
    assert not train_sources & valid_sources
    assert len(valid_sources) == round(0.25 * 41)
    # Every line lands on exactly one side, so repeated sources stay together.
    assert sorted(split.train + split.valid) == sorted(pairs)


def test_split_pairs_seeded():
    pairs = _pairs_with_repeats()
    assert split_pairs(pairs, seed=7) == split_pairs(pairs, seed=7)
    first = split_pairs(pairs, seed=7, valid_fraction=0.3)
    other = split_pairs(pairs, seed=8, valid_fraction=0.3)
    assert first.valid != other.valid


def test_split_pairs_one_source():
    with pytest.raises(DataError, match="1 distinct source"):
        split_pairs([("a", "b"), ("a", "c")], seed=0)


def test_group_references_order():
    pairs = [("x", "1"), ("y", "2"), ("x", "3")]
    assert group_references(pairs) == [("x", ["1", "3"]), ("y", ["2"])]


def test_load_split_data_rules(tmp_path):
    with pytest.raises(ConfigError, match="needs --data"):
        load_split("translate", seed=0)
    with pytest.raises(ConfigError, match="translate only"):
        load_split("copy", seed=0, data_path=tmp_path / "x.tsv")
    with pytest.raises(ConfigError, match="unknown task"):
        load_split("summarize", seed=0)
