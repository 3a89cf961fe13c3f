"""Ranking exports: ranks, row order and CSV / JSONL / HDF5 round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rankpipe.adapter.evaluation.exports import Table, read_table, write_table
from rankpipe.adapter.evaluation.query_rankings import (
    COLUMNS,
    QueryRanking,
    rankings_table,
    read_rankings,
    write_rankings,
)
from rankpipe.errors import InputError


def _rankings(seed: int = 0) -> list[QueryRanking]:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=6) / 3.0  # floats whose text form needs all 17 digits
    scores[4] = scores[1]  # a tie, broken by key
    labels = rng.integers(1, 5, 6).astype(float)
    labels[2] = np.nan
    keys = np.array(["img/005", "img/001", "img/004", "img/000", "img/003", "ünïcode,\"key\""])
    splits = np.array(["test", "test", "test-b", "test", "test", "test"])
    cats = QueryRanking("Sort images by the number of cats.", keys, scores, labels, splits)
    age = QueryRanking("Sort by age, oldest first.", keys[:3], np.array([2.0, 3.0, 1.0]), np.array([10.0, 20.0, 30.0]), splits[:3])
    return [cats, age]


def test_ranks_put_the_highest_score_first_and_break_ties_by_key() -> None:
    ranking = QueryRanking("q", np.array(["b", "a", "c", "d"]), np.array([1.0, 1.0, 3.0, -2.0]), np.zeros(4), np.array(["t"] * 4))
    assert ranking.ranks().tolist() == [3, 2, 1, 4]


def test_table_groups_by_query_in_order_and_sorts_by_rank() -> None:
    table = rankings_table(_rankings())
    assert list(table) == list(COLUMNS)
    assert table["query"].tolist() == ["Sort images by the number of cats."] * 6 + ["Sort by age, oldest first."] * 3
    assert table["rank"].tolist() == [1, 2, 3, 4, 5, 6, 1, 2, 3]
    assert np.all(np.diff(table["score"][:6]) <= 0)
    assert table["key"][6:].tolist() == ["img/001", "img/005", "img/004"]
    assert table["label"][6:].tolist() == [20.0, 10.0, 30.0]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".h5", ".hdf5", ".parquet"])
def test_round_trip_reads_back_equal(tmp_path: Path, suffix: str) -> None:
    rankings = _rankings()
    path = write_rankings(tmp_path / f"out/rankings{suffix}", rankings)
    back = read_rankings(path)
    expected = rankings_table(rankings)
    assert list(back) == list(COLUMNS)
    for name in COLUMNS:
        if expected[name].dtype.kind == "f":
            np.testing.assert_array_equal(back[name], expected[name])  # exact, NaN where NaN
        else:
            assert back[name].tolist() == expected[name].tolist(), name
    assert np.isnan(back["label"]).sum() == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file may be left behind"


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".h5", ".parquet"])
def test_empty_rankings_round_trip(tmp_path: Path, suffix: str) -> None:
    back = read_rankings(write_rankings(tmp_path / f"empty{suffix}", []))
    assert all(len(back[name]) == 0 for name in COLUMNS)


def test_unknown_suffix_is_an_input_error_and_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"\.csv"):
        write_rankings(tmp_path / "rankings.xlsx", _rankings())
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "rankings.jsonl"
    path.write_text("old\n")
    bad = QueryRanking("q", np.array(["a"]), np.array([1.0]), np.array([1.0]), np.array(["t"]))
    object.__setattr__(bad, "scores", np.array(["not a number"]))
    with pytest.raises(ValueError):
        write_rankings(path, [bad])
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rankings.jsonl"]


def test_reading_a_foreign_file_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="header"):
        read_rankings(path)
    with pytest.raises(InputError, match="does not exist"):
        read_rankings(tmp_path / "missing.csv")


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".h5", ".parquet"])
def test_one_table_round_trips_through_every_format(tmp_path: Path, suffix: str) -> None:
    """The stack both `eval --export` and `rank --out` write through: text, integers with gaps, floats."""
    table = Table(
        "rankpipe-test",
        {"rank": np.array([1, 2, 0]), "key": np.array(["a", "b", "é"]), "score": np.array([0.1, np.nan, 1 / 3])},
        missing={"rank": np.array([False, False, True])},
    )
    back = read_table(write_table(tmp_path / f"t{suffix}", table), "rankpipe-test")
    assert list(back) == ["rank", "key", "score"]
    assert [None if v is None else int(v) for v in back["rank"]] == [1, 2, None]
    assert [str(v) for v in back["key"]] == ["a", "b", "é"]
    assert [None if v is None else float(v) for v in back["score"]] == [0.1, None, 1 / 3]


def test_an_hdf5_file_of_another_table_is_refused(tmp_path: Path) -> None:
    path = write_table(tmp_path / "t.h5", Table("rankpipe-rank", {"key": np.array(["a"])}))
    with pytest.raises(InputError, match="not a rankpipe-rankings HDF5 file"):
        read_rankings(path)


def test_parquet_marks_missing_cells_as_nulls_and_names_its_table(tmp_path: Path) -> None:
    """Collection-scale tools read a missing Parquet cell as null, never as NaN or an empty string."""
    import pyarrow.parquet as pq

    table = Table("rankpipe-rank", {"rank": np.array([1, 0]), "key": np.array(["a", "b"]), "score": np.array([0.5, np.nan])},
                  missing={"rank": np.array([False, True]), "key": np.array([False, True])})
    path = write_table(tmp_path / "t.parquet", table)
    data = pq.read_table(path)
    assert str(data.schema.field("rank").type) == "int64" and str(data.schema.field("score").type) == "double"
    assert data.column("rank").null_count == 1 and data.column("score").null_count == 1 and data.column("key").null_count == 1
    with pytest.raises(InputError, match="not a rankpipe-rankings Parquet file"):
        read_rankings(path)
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_table(tmp_path / "junk.parquet", "rankpipe-rank")
