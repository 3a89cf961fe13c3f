"""Pack samples into WebDataset tars with an index and a manifest.

Output folder layout (docs/manifest.md):

    OUT/<name>-000000.tar ...   samples: __key__, the image bytes under their own extension, json
    OUT/index.json              {"tars": [{"name", "count"}], "total"}: lets embed size its store up front
    OUT/manifest.yaml           the dataset's Manifest with the shard pattern, labels and splits
    OUT/skipped.csv             every sample left out, with its row, path and the reason

Tars are written under hidden temporary names and renamed only once every tar is complete, and the
manifest is written last: a run killed while packing leaves the previous outputs as they were, and
never a half tar that looks finished.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from rankpipe.errors import InputError
from rankpipe.files import exclusive_output, write_text_atomic
from rankpipe.pipeline.data.manifest import SPLIT_ROLES, LabelSpec, Manifest, SplitSpec
from rankpipe.pipeline.data.sources import TAR_IMAGE_EXTENSIONS, SampleRecord, sample_key
from rankpipe.pipeline.data.tar_writer import TarEntry, TarSequence, remove_stale_tars

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
MANIFEST_FILE = "manifest.yaml"
SKIPPED_FILE = "skipped.csv"
# Dataset names become file names and brace patterns, so they keep to a safe alphabet.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# Image formats packed (PIL format name -> tar extensions, canonical first): those `rankpipe embed`
# decodes. Other formats are skipped and reported rather than packed where nothing can read them.
FORMAT_EXTENSIONS = {"JPEG": ("jpg", "jpeg"), "PNG": ("png",), "WEBP": ("webp",)}


@dataclasses.dataclass(frozen=True)
class AutoSplit:
    """Gives samples without a split value one, from a seeded hash of their image path.

    Hashing the path (not the row) keeps the split stable when the table is reordered and sends
    duplicate rows of one image to the same split.
    """

    # Fractions of train, val and test, in that order; they must sum to 1.
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    # Mixed into the hash: another seed gives another, equally stable split.
    seed: int = 0

    def __post_init__(self) -> None:
        if len(self.fractions) != len(SPLIT_ROLES) or any(f < 0 for f in self.fractions):
            raise InputError(f"split fractions must be three non-negative numbers, got {self.fractions}")
        if not math.isclose(sum(self.fractions), 1.0, abs_tol=1e-6):
            raise InputError(f"split fractions must sum to 1, got {self.fractions} (sum {sum(self.fractions)})")

    def assign(self, source: str) -> str:
        """The split role ("train", "val" or "test") of the image at `source`.

        The path is normalised first (`./a.jpg` and `x/../a.jpg` are `a.jpg`), so one image spelled
        two ways cannot land in two splits; an already normal path hashes as it always did.
        """
        digest = hashlib.sha256(f"{self.seed}:{os.path.normpath(source)}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        bound = 0.0
        for role, fraction in zip(SPLIT_ROLES, self.fractions):
            bound += fraction
            if u < bound:
                return role
        return SPLIT_ROLES[-1]


@dataclasses.dataclass(frozen=True)
class SkippedSample:
    """A sample left out of the tars and why."""

    # The record's row (1-based data row of the table, or position in the folder listing).
    row: int
    # The image path as the input wrote it.
    source: str
    # Short reason, one of a few categories, used to count skips ("missing image file", ...).
    reason: str
    # The specifics: the exception text or the offending value.
    detail: str


@dataclasses.dataclass(frozen=True)
class ShardsResult:
    """What `write_shards` produced."""

    # The output folder.
    out_dir: Path
    # The written manifest.yaml.
    manifest_path: Path
    # The tars in order.
    tars: tuple[TarEntry, ...]
    # Samples left out.
    skipped: tuple[SkippedSample, ...]
    # Written samples per split value.
    split_counts: dict[str, int]

    @property
    def total(self) -> int:
        """Number of samples written."""
        return sum(tar.count for tar in self.tars)

    def skipped_by_reason(self) -> dict[str, int]:
        """How many samples were skipped for each reason."""
        return dict(Counter(s.reason for s in self.skipped))

    def summary(self) -> str:
        """One line for the user: written, tars, skipped by reason, and where the report is."""
        line = f"Wrote {self.total} samples in {len(self.tars)} tars to {self.out_dir}"
        if not self.skipped:
            return line + "; skipped none."
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped_by_reason().items()))
        return line + f"; skipped {len(self.skipped)} ({reasons}), listed in {self.out_dir / SKIPPED_FILE}."


class SampleError(Exception):
    """A sample that cannot be packed; the writer skips it and reports `reason` and `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_label(name: str, value: Any) -> float | None:
    """A raw label value as a float; None when it is missing ("", None or NaN).

    Raises:
        SampleError: the value is not a number, or is infinite.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SampleError("non-numeric label", f"{name}={value!r}")
    try:
        number = float(value)
    except ValueError:
        raise SampleError("non-numeric label", f"{name}={value!r}") from None
    except OverflowError:  # an integer too large for a float, e.g. 10**400 in a JSONL table
        number = math.inf
    if math.isnan(number):
        return None
    if math.isinf(number):
        raise SampleError("non-finite label", f"{name}={value!r}")
    return number


def write_shards(
    records: Iterable[SampleRecord],
    out_dir: str | Path,
    name: str,
    labels: Sequence[LabelSpec],
    samples_per_tar: int = 1000,
    splits: SplitSpec = SplitSpec(),
    auto_split: AutoSplit = AutoSplit(),
    progress: Callable[[int], None] | None = None,
) -> ShardsResult:
    """Write valid records into tars and the index, manifest and skipped report beside them.

    Every image is read and checked with PIL before it is packed; samples with a missing or
    unreadable image, a non-numeric label or no label at all are skipped and reported. Without
    `labels` the samples form an unlabelled collection: only the image is needed, and no split is
    assigned.

    Args:
        records: The samples, e.g. from `rankpipe.pipeline.data.sources.read_input`.
        out_dir: Output folder (created if needed).
        name: Dataset name: the tar prefix and the manifest's name.
        labels: The labels to pack, with their queries; other label values of a record are ignored.
            Empty for an unlabelled collection.
        samples_per_tar: Samples per tar; the last tar holds the rest.
        splits: Which split values form train/val/test, written to the manifest.
        auto_split: Split assignment for records whose split is None.
        progress: Called with 1 after each record (e.g. a progress bar's update).

    Returns:
        The tars, skipped samples and split counts.

    Raises:
        InputError: bad name or samples_per_tar, or no record could be written.
    """
    if not NAME_PATTERN.match(name):
        raise InputError(
            f"dataset name {name!r} must start with a letter or digit and use only letters, digits, '-' and '_'; "
            "pass --name"
        )
    if samples_per_tar < 1:
        raise InputError(f"samples per tar must be at least 1, got {samples_per_tar}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # One writer per shard folder: a second job into it is refused while this one runs.
    with exclusive_output(out_dir, "rankpipe shards"):
        label_names = [label.name for label in labels]
        writer = TarSequence(out_dir, name, samples_per_tar)
        skipped: list[SkippedSample] = []
        split_counts: Counter[str] = Counter()
        try:
            for record in records:
                try:
                    sample, split = _make_sample(record, label_names, auto_split)
                except SampleError as skip:
                    logger.debug("skipping row %d (%s): %s", record.row, record.source, skip)
                    skipped.append(SkippedSample(record.row, record.source, skip.reason, skip.detail))
                else:
                    writer.write(sample)
                    split_counts[split] += 1
                if progress is not None:
                    progress(1)
            writer.close()
            if not writer.entries:
                reasons = ", ".join(f"{n} {r}" for r, n in Counter(s.reason for s in skipped).items())
                first = f"; first: row {skipped[0].row} {skipped[0].source!r}: {skipped[0].detail}" if skipped else ""
                raise InputError(
                    f"no sample could be written ({reasons or 'the input is empty'}){first}; fix the input and rerun"
                )
            manifest = Manifest(name=name, shards=shard_pattern(name, len(writer.entries)), labels=tuple(labels),
                                splits=splits)
            write_text_atomic(out_dir / INDEX_FILE, _index_json(writer.entries))
            write_text_atomic(out_dir / SKIPPED_FILE, skipped_csv(skipped))
            writer.commit()
            # The manifest goes last, once the tars it names exist under their final names.
            write_text_atomic(out_dir / MANIFEST_FILE, manifest.to_yaml())
        finally:
            writer.discard()
        remove_stale_tars(out_dir, name, len(writer.entries))
    result = ShardsResult(
        out_dir=out_dir, manifest_path=out_dir / MANIFEST_FILE, tars=tuple(writer.entries),
        skipped=tuple(skipped), split_counts=dict(split_counts),
    )
    logger.info("wrote %d samples in %d tars to %s", result.total, len(result.tars), out_dir)
    return result


def _make_sample(record: SampleRecord, label_names: list[str], auto_split: AutoSplit) -> tuple[dict, str]:
    values = {name: parse_label(name, record.labels.get(name)) for name in label_names}
    values = {name: value for name, value in values.items() if value is not None}
    if label_names and not values:
        raise SampleError("no label values", f"all of {', '.join(label_names)} are empty")
    data = _read_image(record)
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            # A full decode, as embed will do: verify() reads only the structure, so a truncated
            # JPEG would pass here and fail in the middle of embedding.
            image.load()
    except UnidentifiedImageError:
        raise SampleError("unreadable image", "not an image format PIL can identify") from None
    except Exception as e:  # PIL raises many types for corrupt files; all mean "cannot decode"
        raise SampleError("unreadable image", f"{type(e).__name__}: {e}") from None
    if image_format not in FORMAT_EXTENSIONS:
        supported = ", ".join(FORMAT_EXTENSIONS)
        raise SampleError("unsupported image format", f"{image_format}; convert it to one of {supported}")
    extension = record.extension or _extension(record, image_format)
    if record.split is not None:
        split = record.split
    else:
        # An unlabelled collection is ranked whole: it has no train/val/test to hash into.
        split = auto_split.assign(record.source) if label_names else ""
    meta = {"labels": values, "split": split, "source": record.source}
    return {"__key__": sample_key(record), extension: data, "json": json.dumps(meta).encode()}, split


def _read_image(record: SampleRecord) -> bytes:
    if record.data is not None:
        return record.data
    if record.member is not None:
        if not record.member.name:
            raise SampleError("missing image file", f"the tar sample has no {', '.join(TAR_IMAGE_EXTENSIONS)} member")
        try:
            return record.member.read()
        except OSError as e:
            raise SampleError("missing image file", str(e)) from None
    if record.path is None:
        raise SampleError("missing image file", "the image path is empty")
    if record.path.exists() and not record.path.is_file():  # a FIFO or device would be read forever
        raise SampleError("not a regular file", f"{record.path} is not a file")
    try:
        return record.path.read_bytes()
    except FileNotFoundError:
        raise SampleError("missing image file", f"{record.path} does not exist") from None
    except OSError as e:
        raise SampleError("missing image file", f"{record.path}: {e}") from None


def _extension(record: SampleRecord, image_format: str) -> str:
    """The file's own suffix when it names its format, else the format's usual one (a PNG saved as .jpg)."""
    suffix = Path(record.path.name if record.path is not None else record.source).suffix.lower().lstrip(".")
    known = FORMAT_EXTENSIONS[image_format]
    return suffix if suffix in known else known[0]


def shard_pattern(name: str, n_tars: int) -> str:
    """The brace pattern naming tars 0..n_tars-1 of dataset `name`, e.g. "koniq-{000000..000009}.tar"."""
    return f"{name}-{{000000..{n_tars - 1:06d}}}.tar"


def _index_json(entries: list[TarEntry]) -> str:
    tars = [{"name": e.name, "count": e.count, "sha256": e.sha256} for e in entries]
    return json.dumps({"tars": tars, "total": sum(e.count for e in entries)}, indent=1) + "\n"


def skipped_csv(skipped: Sequence[SkippedSample]) -> str:
    """The text of a skipped.csv: a header, then one row (row, path, reason, detail) per sample."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", "path", "reason", "detail"])
    writer.writerows([s.row, s.source, s.reason, s.detail] for s in skipped)
    return buffer.getvalue()
