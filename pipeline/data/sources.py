"""Where samples come from: a label table (CSV, TSV, JSONL), a folder of images, or WebDataset tars.

Readers validate the input eagerly (file exists, columns exist) and return the samples as a list of
`SampleRecord`, so a mistake is reported before anything is written. They do not open images or
parse label values: that is the writer's job, which skips and reports bad samples one by one.

Labelled input is a table, a folder holding one, or label sub-folders. An unlabelled collection (no
label names) is a table of image paths, a folder searched recursively, or existing tars, whose
samples are read by reference (tar, member, byte offset) rather than loaded up front.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import braceexpand

from rankpipe.errors import InputError
from rankpipe.pipeline.data.tars import is_remote, tar_samples

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
# A folder holding one of these files is read as a table whose relative paths start in that folder.
FOLDER_TABLES = ("labels.csv", "labels.tsv", "labels.jsonl")
# Split names recognised as the top level of a FOLDER/<split>/<label value>/ layout.
FOLDER_SPLITS = ("train", "val", "valid", "validation", "dev", "test")


# Image members looked for in a tar sample, in order of preference (as `rankpipe embed` reads them).
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclasses.dataclass(frozen=True)
class TarMember:
    """An image inside a local tar, read by seeking to its bytes."""

    # The tar file.
    tar: Path
    # The member's name inside the tar; "" when the sample has no image member.
    name: str
    # Where the member's bytes start in the tar file, and how many there are.
    offset: int = 0
    size: int = 0

    def read(self) -> bytes:
        """The member's bytes.

        Raises:
            OSError: the tar cannot be read, or ends before the member does.
        """
        with self.tar.open("rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.tar} ends {self.size - len(data)} bytes into member {self.name}")
        return data


@dataclasses.dataclass(frozen=True)
class SampleRecord:
    """One sample as read from the input, before its image is checked or its labels parsed."""

    # 1-based data row of the table (header excluded), or 1-based position in the sorted folder listing.
    row: int
    # The image path as the input wrote it (kept in the sample's json as "source").
    source: str
    # Where to read the image bytes from; None when `data` holds them already.
    path: Path | None
    # Raw label values by label name: numbers, numeric strings, "" or None for a missing value.
    labels: dict[str, Any]
    # The sample's split value, or None to let the writer assign one.
    split: str | None = None
    # The encoded image when it was made in memory (the demo dataset); None to read `path`.
    data: bytes | None = None
    # File extension used inside the tar (without the dot); None to take it from `path`/`source`.
    extension: str | None = None
    # The image inside an existing tar (unlabelled collections packed from tars); None otherwise.
    member: TarMember | None = None


def read_input(
    path: str | Path, image_col: str, label_cols: list[str], split_col: str | None
) -> list[SampleRecord]:
    """Read a label table, a folder with a labels table, a folder of label sub-folders, or (without
    labels) a folder of images or a brace pattern of tars.

    Args:
        path: A .csv/.tsv/.jsonl file, a folder (see `records_from_folder` and `records_from_image_folder`),
            or tars such as "shards/x-{000000..000009}.tar" (unlabelled only, see `records_from_tars`).
        image_col: Table column with image paths (ignored for folders and tars).
        label_cols: Label columns; for label sub-folders exactly one name, given to the folder values;
            none for an unlabelled collection.
        split_col: Table column with split values, or None.

    Returns:
        The records in input order.

    Raises:
        InputError: a missing input, or tars given with labels.
    """
    if is_tar_pattern(str(path)):
        if label_cols:
            raise InputError(
                f"{path} names tars, which are packed only as an unlabelled collection; leave out --label "
                "(to train on labelled WebDataset tars, write a manifest for them and run rankpipe embed)"
            )
        return records_from_tars(str(path))
    path = Path(path)
    if path.is_dir():
        for table in FOLDER_TABLES:
            if (path / table).is_file():
                return records_from_table(path / table, image_col, label_cols, split_col)
        return records_from_folder(path, label_cols) if label_cols else records_from_image_folder(path)
    return records_from_table(path, image_col, label_cols, split_col)


def is_tar_pattern(text: str) -> bool:
    """Whether an input names tars: a .tar file or a brace pattern of them."""
    return all(url.endswith(".tar") for url in braceexpand.braceexpand(text))


def records_from_table(
    path: str | Path, image_col: str, label_cols: list[str], split_col: str | None
) -> list[SampleRecord]:
    """Read a CSV, TSV or JSONL table of image paths and label values.

    Relative image paths resolve against the table's folder. Empty label cells mean "missing".

    Raises:
        InputError: the file is missing or of unknown type, or a column does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"input {path} does not exist; pass a .csv, .tsv or .jsonl table or a folder of images")
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"input {path} has suffix {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)} or a folder")
    rows, columns = _read_jsonl(path) if suffix in (".jsonl", ".ndjson") else _read_delimited(path, suffix)
    wanted = [image_col, *label_cols] + ([split_col] if split_col else [])
    for column in wanted:
        if column not in columns:
            raise InputError(
                f"{path} has no column {column!r}; its columns are: {', '.join(columns) or '(none)'}"
            )
    records = []
    for index, row in enumerate(rows):
        source = "" if row.get(image_col) is None else str(row[image_col]).strip()
        image = Path(source)
        split = None if split_col is None else ("" if row.get(split_col) is None else str(row[split_col]).strip())
        records.append(SampleRecord(
            row=index + 1,
            source=source,
            path=(image if image.is_absolute() else path.parent / image) if source else None,
            labels={name: row.get(name) for name in label_cols},
            split=split,
        ))
    return records


def records_from_folder(folder: str | Path, label_cols: list[str]) -> list[SampleRecord]:
    """Read images from label sub-folders: FOLDER/<value>/image or FOLDER/<split>/<value>/image.

    The sub-folder name is the label value (e.g. `3/` gives 3.0). When the top-level sub-folders are
    split names (train, val, test, ...) they give each image's split. Hidden files are ignored; every
    other file is a sample, so a non-image file, or a file outside any label sub-folder, shows up in
    the skipped report instead of vanishing.

    Raises:
        InputError: the folder holds no sub-folders, or not exactly one label name was given.
    """
    folder = Path(folder)
    if len(label_cols) != 1:
        raise InputError(
            f"{folder} is read as label sub-folders, which carry one label; pass exactly one --label "
            f"(got {len(label_cols)}), or put a labels.csv beside the images for several labels"
        )
    top = _subfolders(folder)
    if not top:
        raise InputError(
            f"{folder} has no labels.csv/labels.jsonl and no label sub-folders; "
            "put images in sub-folders named by their label value (e.g. 3/, 4/)"
        )
    by_split = all(p.name.lower() in FOLDER_SPLITS for p in top)
    # (split, folder whose name is the label value or None, files to read from it)
    groups: list[tuple[str | None, Path | None, list[Path]]] = [(None, None, _files(folder, recursive=False))]
    for outer in top:
        if by_split:
            groups.append((outer.name, None, _files(outer, recursive=False)))
            groups += [(outer.name, inner, _files(inner)) for inner in _subfolders(outer)]
        else:
            groups.append((None, outer, _files(outer)))
    records = []
    for split, label_dir, images in groups:
        for image in sorted(images):
            records.append(SampleRecord(
                row=len(records) + 1,
                source=image.relative_to(folder).as_posix(),
                path=image,
                labels={label_cols[0]: None if label_dir is None else label_dir.name},
                split=split,
            ))
    return records


def records_from_image_folder(folder: str | Path) -> list[SampleRecord]:
    """Read every file under a folder, recursively, as an unlabelled sample, sorted by relative path.

    Hidden files and folders are ignored; every other file is a sample, so a file that is not an image
    shows up in the skipped report instead of vanishing.

    Raises:
        InputError: the folder holds no files.
    """
    folder = Path(folder)
    files = sorted(_files(folder), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise InputError(f"{folder} holds no files; point INPUT at a folder of images, a table of image paths or tars")
    return [SampleRecord(row=i, source=file.relative_to(folder).as_posix(), path=file, labels={})
            for i, file in enumerate(files, start=1)]


def records_from_tars(pattern: str) -> list[SampleRecord]:
    """Read the samples of local WebDataset tars (a brace pattern) as unlabelled samples, by reference.

    A sample's image is its jpg, jpeg, png or webp member (the first found in that order); only member
    headers are read here. The source of a sample is "<tar>#<member>". A sample without an image member
    becomes a record without one, which the writer reports as skipped.

    Raises:
        InputError: a remote tar, a missing tar, or a file that is not a tar.
    """
    urls = list(braceexpand.braceexpand(pattern))
    remote = [url for url in urls if is_remote(url)]
    if remote:
        raise InputError(f"tar {remote[0]} is remote; copy the tars to a local folder and pass their path")
    missing = [url for url in urls if not Path(url).is_file()]
    if missing:
        raise InputError(f"{len(missing)} of the {len(urls)} tars of {pattern} do not exist (first: {missing[0]}); check the pattern")
    records = []
    for url in urls:
        tar = Path(url)
        for key, members in tar_samples(tar):
            ext = next((e for e in TAR_IMAGE_EXTENSIONS if e in members), None)
            member = (TarMember(tar, "") if ext is None
                      else TarMember(tar, members[ext].name, members[ext].offset_data, members[ext].size))
            name = member.name or key
            records.append(SampleRecord(row=len(records) + 1, source=f"{url}#{name}", path=None, labels={},
                                        member=member))
    return records


def sample_key(record: SampleRecord) -> str:
    """A unique, stable WebDataset key: the row number and a slug of the image path.

    WebDataset splits a member name at its first dot and treats slashes as folders, so the slug keeps
    only letters, digits, '-' and '_'.
    """
    stem = record.source.rsplit(".", 1)[0] if "." in Path(record.source).name else record.source
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[-48:]
    return f"{record.row:07d}_{slug}" if slug else f"{record.row:07d}"


def _read_delimited(path: Path, suffix: str) -> tuple[list[dict[str, Any]], list[str]]:
    delimiter = "\t" if suffix == ".tsv" else ","
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = list(reader.fieldnames or [])
            _refuse_repeated_columns(path, columns)
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path} is not a readable UTF-8 table: {e}") from e
    return rows, columns


def _refuse_repeated_columns(path: Path, names: list[str], where: str = "its header") -> None:
    """A table whose header names a column twice would silently keep one of the two: refuse it."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: {where} names column {repeated[0]!r} more than once; give each column its own name")


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows, columns = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs = json.loads(line, object_pairs_hook=lambda items: items)
            row = dict(pairs) if isinstance(pairs, list) else pairs
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {number} is not JSON ({e}); write one JSON object per line") from e
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number} is not a JSON object; write one object per line")
        _refuse_repeated_columns(path, [key for key, _ in pairs], f"line {number}")
        rows.append(row)
        columns.update(dict.fromkeys(row))
    return rows, list(columns)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path, recursive: bool = True) -> list[Path]:
    found = folder.rglob("*") if recursive else folder.iterdir()
    return [
        p for p in found
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
