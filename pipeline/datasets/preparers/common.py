"""What every dataset preparer shares: its options, what it hands to the writer, and layout checks.

A preparer reads a dataset exactly as its authors distribute it and returns a `Prepared`: the
samples (not yet read), the labels with the paper's queries, the split roles, and a record of the
protocol. `rankpipe.pipeline.datasets.preparers.prepare.prepare_dataset` writes them into tars. Layout checks
raise `InputError` naming the file that was expected and where, so a user with a half-unpacked
download knows what is missing.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.shard_writer import AutoSplit, SkippedSample
from rankpipe.pipeline.data.sources import SampleRecord


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Options every preparer takes; each dataset's config adds its own fields."""

    # Seeds every random choice (validation hold-outs, per-class splits): same seed, same splits.
    seed: int = 0
    # Also measure colourfulness, contrast and brightness on every image (decodes each one).
    attributes: bool = False
    # Samples per tar.
    samples_per_tar: int = 1000

    def __post_init__(self) -> None:
        if self.samples_per_tar < 1:
            raise InputError(f"samples_per_tar must be at least 1, got {self.samples_per_tar}")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A dataset read from its official layout, ready for `write_shards`."""

    # The samples in a stable order (their row numbers make the sample keys).
    records: list[SampleRecord]
    # The labels with the paper's queries.
    labels: tuple[LabelSpec, ...]
    # Split roles of the main manifest.
    splits: SplitSpec
    # How the labels and splits were made (written to prepare.json).
    protocol: dict[str, Any]
    # Further manifests over the same tars, by file name (e.g. one per Adience fold).
    extra_manifests: dict[str, SplitSpec] = dataclasses.field(default_factory=dict)
    # Files written beside the tars, by name: their text (e.g. COCO's per-image crowd flags).
    sidecars: dict[str, str] = dataclasses.field(default_factory=dict)
    # Samples the protocol leaves out (not errors: e.g. an Adience age between two groups).
    excluded: list[SkippedSample] = dataclasses.field(default_factory=list)


def require_dir(path: Path, what: str) -> Path:
    """`path` when it is a folder; otherwise an InputError saying `what` was expected there."""
    if not path.is_dir():
        raise InputError(f"expected {what} at {path}, but there is no such folder; "
                         "pass --src the folder where the dataset was unpacked")
    return path


def require_file(path: Path, what: str) -> Path:
    """`path` when it is a file; otherwise an InputError saying `what` was expected there."""
    if not path.is_file():
        raise InputError(f"expected {what} at {path}, but there is no such file; "
                         "pass --src the folder where the dataset was unpacked")
    return path


def first_existing(candidates: Sequence[Path], what: str, folder: bool = True) -> Path:
    """The first of `candidates` that exists; an InputError listing all of them otherwise."""
    for path in candidates:
        if (path.is_dir() if folder else path.is_file()):
            return path
    listed = ", ".join(str(p) for p in candidates)
    raise InputError(f"expected {what} at one of: {listed}; none exists. "
                     "Pass --src the folder where the dataset was unpacked")


def read_table(path: Path, columns: Iterable[str], delimiter: str = ",") -> list[dict[str, str]]:
    """Rows of a delimited text file with a header; an InputError names any missing column."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path} is not a readable text table ({e}); re-download it") from e
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"{path} has no column {missing[0]!r} (columns: {', '.join(header) or 'none'}); "
                         "is it the file from the official release?")
    return rows


def holdout(sources: Sequence[str], fraction: float, seed: int) -> set[str]:
    """The sources a seeded hash puts in a `fraction` validation hold-out (stable under reordering)."""
    splitter = AutoSplit(fractions=(1.0 - fraction, fraction, 0.0), seed=seed)
    return {source for source in sources if splitter.assign(source) == "val"}


def check_fraction(name: str, value: float) -> None:
    """Refuse a fraction outside [0, 1)."""
    if not 0.0 <= value < 1.0:
        raise InputError(f"{name} must be in [0, 1), got {value}")


def relative(path: Path, root: Path) -> str:
    """`path` relative to `root` in POSIX form: the sample's `source`."""
    return path.relative_to(root).as_posix()
