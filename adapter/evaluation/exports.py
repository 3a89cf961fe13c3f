"""Rankings of a split's images per query, and their CSV / JSONL / HDF5 files (layout in docs/exports.md).

A ranking file is one table with the columns `COLUMNS`, one row per (query, image): rows are grouped
by query in the order given, and within a query sorted by rank. Rankings of a k-fold evaluation carry
their fold, and the table then has a last column `fold`. Rank 1 is the highest score; equal
scores are ordered by key so that files are reproducible. Missing labels are empty cells (CSV), null
(JSONL) or NaN (HDF5). Files are written to a temporary name and renamed, so a failed export never
leaves a half-written file in place of an old one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rankpipe.errors import InputError
from rankpipe.files import atomic_target

# Column names in file order: image key, query sentence, predicted score, rank within the query,
# label in label units (NaN when missing) and the sample's split value.
COLUMNS = ("key", "query", "score", "rank", "label", "split")
# The column appended after COLUMNS when the rankings come from several folds: the fold's index.
FOLD_COLUMN = "fold"
# HDF5 files carry this format tag and version in their root attrs.
H5_FORMAT = "rankpipe-rankings"
H5_VERSION = 1


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
    """Write rankings as CSV, JSONL or HDF5, chosen by the file's suffix.

    Raises:
        InputError: the suffix is not one of the supported formats.
    """
    path = Path(path)
    writer = _WRITERS[export_format(path)]
    table = rankings_table(rankings)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        writer(tmp, table)
    return path


def read_rankings(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ranking file written by `write_rankings` back into columns (as `rankings_table` returns)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"ranking file {path} does not exist; pass a file written by `rankpipe eval --export`")
    return _READERS[export_format(path)](path)


def export_format(path: str | Path) -> str:
    """The format name of an export path from its suffix.

    Raises:
        InputError: the suffix is not .csv, .jsonl, .h5 or .hdf5.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"cannot export rankings to {path}: use a file name ending in {', '.join(_SUFFIXES)}")
    return _SUFFIXES[suffix]


# ---------------------------------------------------------------------------- CSV


def _write_csv(path: Path, table: dict[str, np.ndarray]) -> None:
    columns = list(table)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in zip(*(table[name] for name in columns)):
            key, query, score, rank, label, split, *fold = row
            # repr of a Python float is the shortest text that reads back to the same float.
            cells = [key, query, repr(float(score)), int(rank), "" if math.isnan(label) else repr(float(label)), split]
            writer.writerow(cells + [int(v) for v in fold])


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = tuple(next(reader, None) or ())
        if header not in (COLUMNS, COLUMNS + (FOLD_COLUMN,)):
            raise InputError(f"{path} is not a ranking CSV: its header must be {','.join(COLUMNS)}[,{FOLD_COLUMN}]")
        rows = list(reader)
    return _columns_from_rows(
        header,
        [(key, query, float(score), int(rank), float(label) if label else math.nan, split, *(int(v) for v in fold))
         for key, query, score, rank, label, split, *fold in rows],
    )


# ---------------------------------------------------------------------------- JSONL


def _write_jsonl(path: Path, table: dict[str, np.ndarray]) -> None:
    columns = list(table)
    with path.open("w", encoding="utf-8") as f:
        for key, query, score, rank, label, split, *fold in zip(*(table[name] for name in columns)):
            record = {
                "key": str(key), "query": str(query), "score": float(score), "rank": int(rank),
                "label": None if math.isnan(label) else float(label), "split": str(split),
            }
            record.update((FOLD_COLUMN, int(v)) for v in fold)
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path) -> dict[str, np.ndarray]:
    rows, columns = [], COLUMNS
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                label = math.nan if r["label"] is None else float(r["label"])
                fold = (int(r[FOLD_COLUMN]),) if FOLD_COLUMN in r else ()
                columns = COLUMNS + (FOLD_COLUMN,) if fold else COLUMNS
                rows.append((r["key"], r["query"], float(r["score"]), int(r["rank"]), label, r["split"], *fold))
    return _columns_from_rows(columns, rows)


# ---------------------------------------------------------------------------- HDF5


def _write_h5(path: Path, table: dict[str, np.ndarray]) -> None:
    import h5py

    text = h5py.string_dtype(encoding="utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["format"] = H5_FORMAT
        f.attrs["version"] = H5_VERSION
        f.attrs["columns"] = list(table)
        for name in table:
            column = table[name]
            if column.dtype.kind in "US":
                f.create_dataset(name, data=column.astype(object), dtype=text)
            else:
                f.create_dataset(name, data=column)


def _read_h5(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != H5_FORMAT:
            raise InputError(f"{path} is not a ranking HDF5 file (its 'format' attribute is not {H5_FORMAT!r})")
        out = {}
        for name in COLUMNS + ((FOLD_COLUMN,) if FOLD_COLUMN in f else ()):
            dataset = f[name]
            if h5py.check_string_dtype(dataset.dtype) is not None:
                out[name] = dataset.asstr()[()].astype(str)
            else:
                out[name] = dataset[()]
    return out


def _columns_from_rows(names: Sequence[str], rows: list[tuple]) -> dict[str, np.ndarray]:
    columns = list(zip(*rows)) if rows else [()] * len(names)
    return {name: np.array(values, dtype=_DTYPES[name]) for name, values in zip(names, columns)}


_DTYPES = {
    "key": str, "query": str, "score": np.float64, "rank": np.int64, "label": np.float64, "split": str,
    FOLD_COLUMN: np.int64,
}


_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".h5": "hdf5", ".hdf5": "hdf5"}
_WRITERS: dict[str, Callable[[Path, dict[str, np.ndarray]], None]] = {
    "csv": _write_csv, "jsonl": _write_jsonl, "hdf5": _write_h5,
}
_READERS: dict[str, Callable[[Path], dict[str, np.ndarray]]] = {
    "csv": _read_csv, "jsonl": _read_jsonl, "hdf5": _read_h5,
}
