"""Export files: one table of columns written as CSV, JSONL, HDF5 or Parquet, chosen by the file's suffix.

Every file rankpipe exports goes through here: `rankpipe eval --export` (rankings per query, see
adapter/evaluation/rankings.py) and `rankpipe rank --out` (one row per image, see rank_outputs.py). A
new format is one writer (and, where it is read back, one reader) registered in `FORMATS`.

Cells: text as is; integers as integers; floats as the shortest text that reads back to the same
float. A missing value (a NaN float, or a cell marked in `Table.missing`) is an empty CSV cell, a
JSON null, NaN in HDF5 and a null in Parquet. Files are written to a temporary name and renamed (rankpipe.files), so a
failed export never leaves a half-written file in place of an old one. Layouts: docs/exports.md.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rankpipe.errors import InputError
from rankpipe.files import atomic_target


@dataclasses.dataclass(frozen=True)
class Table:
    """Rows to export, held as columns of equal length."""

    # What the table is, e.g. "rankpipe-rankings": the HDF5 file's `format` attribute and the Parquet
    # file's schema metadata, checked on reading.
    kind: str
    # Column name -> [n] values, in file order: str, int64 or float64 (NaN = missing).
    columns: Mapping[str, np.ndarray]
    # Column name -> [n] bool, True where the cell is missing (for columns that cannot hold NaN).
    missing: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    # JSONL only: record field -> {column: key}, columns gathered into one nested object, e.g.
    # {"scores": {"score[q1]": "q1"}}; the object takes the place of its first column.
    json_objects: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        lengths = {name: len(values) for name, values in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns of unequal length: {lengths}")

    def cells(self) -> Iterator[list[Any]]:
        """Each row as plain Python values in column order: str, int, float, or None when missing."""
        converted = [_python_values(values, self.missing.get(name)) for name, values in self.columns.items()]
        return (list(row) for row in zip(*converted))


@dataclasses.dataclass(frozen=True)
class Format:
    """One export format."""

    # Suffixes that select it.
    suffixes: tuple[str, ...]
    # Writes a table to a path.
    write: Callable[[Path, Table], None]
    # Reads columns back (name -> [n] values as text or numbers); None when the format is write-only.
    read: Callable[[Path, str], dict[str, list[Any]]] | None


def write_table(path: str | Path, table: Table) -> Path:
    """Write `table` in the format chosen by the suffix of `path`, atomically; returns the path.

    Raises:
        InputError: the suffix is not one of `FORMATS`.
    """
    path = Path(path)
    writer = export_format(path).write
    with atomic_target(path) as partial:
        writer(partial, table)
    return path


def read_table(path: str | Path, kind: str) -> dict[str, list[Any]]:
    """The columns of a file written by `write_table`: name -> values (text, numbers; None when missing).

    Raises:
        InputError: a missing file, an unknown suffix, or an HDF5 file of another kind.
    """
    path = Path(path)
    fmt = export_format(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist; pass a file that rankpipe exported")
    return fmt.read(path, kind)


def export_format(path: str | Path) -> Format:
    """The format of an export path, from its suffix.

    Raises:
        InputError: the suffix is not one of `FORMATS`.
    """
    suffix = Path(path).suffix.lower()
    for fmt in FORMATS.values():
        if suffix in fmt.suffixes:
            return fmt
    suffixes = [s for fmt in FORMATS.values() for s in fmt.suffixes]
    raise InputError(f"cannot export to {path}: use a file name ending in {', '.join(suffixes)}")


def _python_values(values: np.ndarray, missing: np.ndarray | None) -> list[Any]:
    values = np.asarray(values)
    if values.dtype.kind == "f":
        out: list[Any] = [None if math.isnan(v) else v for v in values.tolist()]
    elif values.dtype.kind in "iu":
        out = [int(v) for v in values.tolist()]
    else:
        out = [str(v) for v in values.tolist()]
    if missing is not None:
        out = [None if gone else v for v, gone in zip(out, np.asarray(missing).tolist())]
    return out


# ---------------------------------------------------------------------------- CSV


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    # repr of a Python float is the shortest text that reads back to the same float.
    return repr(value) if isinstance(value, float) else value


def _write_csv(path: Path, table: Table) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(table.columns))
        for row in table.cells():
            writer.writerow([_csv_cell(v) for v in row])


def _read_csv(path: Path, kind: str) -> dict[str, list[Any]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        rows = list(reader)
    columns = list(zip(*rows)) if rows else [()] * len(header)
    return {name: [value if value != "" else None for value in values] for name, values in zip(header, columns)}


# ---------------------------------------------------------------------------- JSONL


def _write_jsonl(path: Path, table: Table) -> None:
    names = list(table.columns)
    grouped = {column: (field, key) for field, keys in table.json_objects.items() for column, key in keys.items()}
    with path.open("w", encoding="utf-8") as f:
        for row in table.cells():
            record: dict[str, Any] = {}
            for name, value in zip(names, row):
                if name in grouped:
                    field, key = grouped[name]
                    record.setdefault(field, {})[key] = value
                else:
                    record[name] = value
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _read_jsonl(path: Path, kind: str) -> dict[str, list[Any]]:
    columns: dict[str, list[Any]] = {}
    with path.open(encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for i, record in enumerate(records):
        for name, value in record.items():
            columns.setdefault(name, [None] * i).append(value)
        for name, values in columns.items():
            if len(values) == i:  # a field this record lacks
                values.append(None)
    return columns


# ---------------------------------------------------------------------------- HDF5

# HDF5 files carry their table's kind and this layout version in their root attrs.
H5_VERSION = 1


def _write_h5(path: Path, table: Table) -> None:
    import h5py

    text = h5py.string_dtype(encoding="utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["format"] = table.kind
        f.attrs["version"] = H5_VERSION
        f.attrs["columns"] = list(table.columns)
        for name, column in table.columns.items():
            column = np.asarray(column)
            gone = table.missing.get(name)
            if column.dtype.kind in "USO":
                f.create_dataset(name, data=column.astype(str).astype(object), dtype=text)
            elif gone is not None and np.any(gone):  # an integer column with gaps: NaN marks them
                f.create_dataset(name, data=np.where(gone, np.nan, column.astype(np.float64)))
            else:
                f.create_dataset(name, data=column)


def _read_h5(path: Path, kind: str) -> dict[str, list[Any]]:
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != kind:
            raise InputError(f"{path} is not a {kind} HDF5 file (its 'format' attribute is not {kind!r})")
        out = {}
        for name in [str(c) for c in f.attrs["columns"]]:
            dataset = f[name]
            if h5py.check_string_dtype(dataset.dtype) is not None:
                out[name] = dataset.asstr()[()].astype(str).tolist()
            else:
                out[name] = [None if isinstance(v, float) and math.isnan(v) else v for v in dataset[()].tolist()]
    return out


# ---------------------------------------------------------------------------- Parquet

# Parquet files carry their table's kind in the schema metadata, as HDF5 files do in their attrs.
PARQUET_KIND_KEY = b"rankpipe_format"


def _write_parquet(path: Path, table: Table) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, column in table.columns.items():
        column = np.asarray(column)
        gone = np.zeros(len(column), dtype=bool) if table.missing.get(name) is None else np.asarray(table.missing[name])
        if column.dtype.kind == "f":
            gone = gone | np.isnan(column)
        if column.dtype.kind in "USO":
            arrays[name] = pa.array(column.astype(str).tolist(), type=pa.string(), mask=gone)
        else:
            # A real null, not NaN: Parquet readers (pandas, polars, DuckDB) then all see a missing value.
            arrays[name] = pa.array(column, mask=gone)
    schema_table = pa.table(arrays)
    metadata = {**(schema_table.schema.metadata or {}), PARQUET_KIND_KEY: table.kind.encode()}
    pq.write_table(schema_table.replace_schema_metadata(metadata), path)


def _read_parquet(path: Path, kind: str) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    try:
        data = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise InputError(f"{path} is not a readable Parquet file ({e}); pass a file that rankpipe exported") from e
    if (data.schema.metadata or {}).get(PARQUET_KIND_KEY) != kind.encode():
        raise InputError(f"{path} is not a {kind} Parquet file (its schema metadata does not name {kind!r})")
    return {name: data.column(name).to_pylist() for name in data.column_names}


# Every export format, by name; `rankpipe eval --export` and `rankpipe rank --out` accept each.
FORMATS: dict[str, Format] = {
    "csv": Format((".csv",), _write_csv, _read_csv),
    "jsonl": Format((".jsonl",), _write_jsonl, _read_jsonl),
    "hdf5": Format((".h5", ".hdf5"), _write_h5, _read_h5),
    "parquet": Format((".parquet",), _write_parquet, _read_parquet),
}

