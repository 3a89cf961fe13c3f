"""Rankings of a split's images per query, as `rankpipe eval --export` writes them (docs/exports.md).

A ranking file is one table with the columns `COLUMNS`, one row per (query, image): rows are grouped
by query in the order given, and within a query sorted by rank. Rankings of a k-fold evaluation carry
their fold, and the table then has a last column `fold`. Rank 1 is the highest score; equal scores
are ordered by key so that files are reproducible. The file formats are those of
rankpipe.adapter.evaluation.exports.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankpipe.adapter.evaluation.exports import Table, read_table, write_table
from rankpipe.errors import InputError

# Column names in file order: image key, query sentence, predicted score, rank within the query,
# label in label units (NaN when missing) and the sample's split value.
COLUMNS = ("key", "query", "score", "rank", "label", "split")
# The column appended after COLUMNS when the rankings come from several folds: the fold's index.
FOLD_COLUMN = "fold"
# The table's kind: the `format` attribute of its HDF5 files.
KIND = "rankpipe-rankings"


@dataclasses.dataclass(frozen=True)
class QueryRanking:
    """The predictions of one query on a set of images, in any order."""

    # The ranking sentence, e.g. "Sort images by the number of cats."
    query: str
    # [n] WebDataset keys of the images.
    keys: np.ndarray
    # [n] predicted scores in label units.
    scores: np.ndarray
    # [n] labels in label units, NaN where missing.
    labels: np.ndarray
    # [n] the split value of each image.
    splits: np.ndarray
    # Index of the fold (checkpoint) of a k-fold evaluation that made the ranking; None for one checkpoint.
    fold: int | None = None

    def __post_init__(self) -> None:
        n = len(self.keys)
        for name in ("scores", "labels", "splits"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, keys has {n}")

    def order(self) -> np.ndarray:
        """Indices from the highest score to the lowest; equal scores by key. [n] -> [n]."""
        # lexsort sorts by its last key first: descending score, then ascending key.
        return np.lexsort((np.asarray(self.keys, dtype=str), -np.asarray(self.scores, dtype=np.float64)))

    def ranks(self) -> np.ndarray:
        """Rank of each image, 1 = highest score. [n] int64."""
        ranks = np.empty(len(self.keys), dtype=np.int64)
        ranks[self.order()] = np.arange(1, len(self.keys) + 1)
        return ranks


def rankings_table(rankings: Sequence[QueryRanking]) -> dict[str, np.ndarray]:
    """The rows of all rankings as columns: grouped by query in the given order, sorted by rank.

    The columns are COLUMNS, plus FOLD_COLUMN when the rankings carry folds (all or none must).
    """
    with_fold = [r.fold is not None for r in rankings]
    if any(with_fold) and not all(with_fold):
        raise ValueError("either every ranking or none carries a fold")
    columns = COLUMNS + (FOLD_COLUMN,) if any(with_fold) else COLUMNS
    parts: dict[str, list[np.ndarray]] = {name: [] for name in columns}
    for ranking in rankings:
        order = ranking.order()
        n = len(order)
        parts["key"].append(np.asarray(ranking.keys, dtype=str)[order])
        parts["query"].append(np.full(n, ranking.query, dtype=object).astype(str))
        parts["score"].append(np.asarray(ranking.scores, dtype=np.float64)[order])
        parts["rank"].append(np.arange(1, n + 1, dtype=np.int64))
        parts["label"].append(np.asarray(ranking.labels, dtype=np.float64)[order])
        parts["split"].append(np.asarray(ranking.splits, dtype=str)[order])
        if ranking.fold is not None:
            parts[FOLD_COLUMN].append(np.full(n, ranking.fold, dtype=np.int64))
    return {
        name: np.concatenate(parts[name]) if parts[name] else np.array([], dtype=_DTYPES[name]) for name in columns
    }


def write_rankings(path: str | Path, rankings: Sequence[QueryRanking]) -> Path:
    """Write rankings in the export format chosen by the file's suffix (CSV, JSONL, HDF5, ...).

    Raises:
        InputError: the suffix is not one of the export formats.
    """
    return write_table(path, Table(KIND, rankings_table(rankings)))


def read_rankings(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ranking file written by `write_rankings` back into columns (as `rankings_table` returns).

    Raises:
        InputError: a missing file, or a file that is not a ranking table.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ranking file {path} does not exist; pass a file written by `rankpipe eval --export`")
    columns = read_table(path, KIND)
    if tuple(columns) not in (COLUMNS, COLUMNS + (FOLD_COLUMN,)) and columns:
        raise InputError(f"{path} is not a ranking file: its header must be {','.join(COLUMNS)}[,{FOLD_COLUMN}]")
    names = tuple(columns) or COLUMNS
    return {name: _typed(columns.get(name, []), _DTYPES[name]) for name in names}


def _typed(values: list, dtype: type) -> np.ndarray:
    if dtype is np.float64:
        return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    if dtype is np.int64:
        return np.array([int(v) for v in values], dtype=np.int64)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


_DTYPES = {
    "key": str, "query": str, "score": np.float64, "rank": np.int64, "label": np.float64, "split": str,
    FOLD_COLUMN: np.int64,
}
