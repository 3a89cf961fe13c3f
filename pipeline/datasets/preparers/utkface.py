"""UTKFace (Zhang et al., 2017): about 23,700 faces labelled with age, gender and race in their file names.

Official layout: images named `[age]_[gender]_[race]_[date&time].jpg`, in any of the release's
folders, searched recursively under SRC:

    SRC/UTKFace/<age>_<gender>_<race>_<datetime>.jpg.chip.jpg   (aligned and cropped faces)
    SRC/crop_part1/…, SRC/part1/ part2/ part3/…                 (other archives of the release)

The label is the age in years. The paper follows MiVOLO (Kuprashevich & Tolstykh, 2023), who use
the protocol of Berg et al. (2021): ages 21–60, 80 % train / 20 % test. That published file list
is not part of the release, so the split here is a seeded hash of the file name with the same
proportions (and a validation slice of the training part). Files whose name does not follow the
pattern (a few in the release lack the race field) are listed in excluded.csv, as are ages outside
the range.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.shard_writer import AutoSplit, SkippedSample
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    check_fraction,
    relative,
)

NAME_PATTERN = re.compile(r"^(\d+)_([01])_([0-4])_(\d+)\.jpg(\.chip\.jpg)?$")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
AGE = LabelSpec(name="age", query="Sort images by the age of the person.")


@dataclasses.dataclass(frozen=True)
class UTKFaceConfig(PrepareConfig):
    """Options of the UTKFace preparer."""

    # Youngest age kept (Berg et al.'s 21).
    min_age: int = 21
    # Oldest age kept (Berg et al.'s 60).
    max_age: int = 60
    # Fraction of faces in the test split.
    test_fraction: float = 0.2
    # Fraction of faces in the validation split (taken from the training part).
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("test_fraction", self.test_fraction)
        check_fraction("val_fraction", self.val_fraction)
        if self.test_fraction + self.val_fraction >= 1:
            raise InputError("test_fraction + val_fraction must leave some faces to train on")
        if self.min_age > self.max_age:
            raise InputError(f"min_age {self.min_age} is above max_age {self.max_age}")


def read_utkface(src: Path, config: UTKFaceConfig) -> Prepared:
    """Find every face image under SRC and parse its age from the file name."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
                   and not any(part.startswith(".") for part in p.relative_to(src).parts))
    if not files:
        raise InputError(f"expected UTKFace images named [age]_[gender]_[race]_[date&time].jpg under {src} "
                         "(e.g. UTKFace/25_0_1_20170116174525125.jpg.chip.jpg); found no .jpg file")
    train = 1.0 - config.test_fraction - config.val_fraction
    splitter = AutoSplit(fractions=(train, config.val_fraction, config.test_fraction), seed=config.seed)
    records, excluded = [], []
    for path in files:
        source, row = relative(path, src), len(records) + len(excluded) + 1
        match = NAME_PATTERN.match(path.name)
        if match is None:
            excluded.append(SkippedSample(row, source, "name not [age]_[gender]_[race]_[date&time].jpg", path.name))
            continue
        age = int(match[1])
        if not config.min_age <= age <= config.max_age:
            excluded.append(SkippedSample(row, source, "age outside the range",
                                          f"{age} not in {config.min_age}..{config.max_age}"))
            continue
        records.append(SampleRecord(row=row, source=source, path=path, labels={AGE.name: age},
                                    split=splitter.assign(path.name)))
    if not records:
        raise InputError(f"no image under {src} is named [age]_[gender]_[race]_[date&time].jpg with an age in "
                         f"{config.min_age}..{config.max_age}; is it UTKFace?")
    protocol = {
        "age": f"first field of the file name; kept {config.min_age}..{config.max_age}",
        "split": f"seeded hash of the file name: {train:.0%} train, {config.val_fraction:.0%} val, "
                 f"{config.test_fraction:.0%} test",
    }
    return Prepared(records=records, labels=(AGE,), splits=SplitSpec(), protocol=protocol, excluded=excluded)
