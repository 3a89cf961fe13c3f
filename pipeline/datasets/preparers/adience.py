"""Adience (Eidinger et al., 2014): about 19,000 Flickr faces in 8 age groups, 5 subject-exclusive folds.

Official layout (the AdienceBenchmarkGenderAndAgeClassification release):

    SRC/fold_0_data.txt … fold_4_data.txt   tab-separated, with a header:
        user_id  original_image  face_id  age  gender  x  y  dx  dy  tilt_ang  fiducial_yaw_angle  fiducial_score
    SRC/aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>
    SRC/faces/<user_id>/coarse_tilt_aligned_face.<face_id>.<original_image>

The label is the age group's index 0..7 (ordinal); the manifest names the groups ("0-2" … "60+")
for prompts. An `age` of the release lies inside one group
("(25, 32)", or a single year like "29") or it does not ("None", "(38, 48)" across two groups,
"35" between groups): those faces are excluded and listed in excluded.csv. Each face's split
value is its fold, `fold0`..`fold4`; manifest-fold<k>.yaml tests on fold k, validates on fold k+1
(mod 5) and trains on the other three. manifest.yaml is fold 0.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.shard_writer import SkippedSample
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    first_existing,
    read_table,
    require_file,
)

FOLDS = 5
FOLD_FILE = "fold_{k}_data.txt"
COLUMNS = ("user_id", "original_image", "face_id", "age")
# Image folders of the release and each one's file-name prefix.
IMAGE_FOLDERS = {"aligned": "landmark_aligned_face", "faces": "coarse_tilt_aligned_face"}
# The 8 age groups of the benchmark, in years (inclusive).
AGE_GROUPS = ((0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100))
# The groups' names as the benchmark publishes them. The release's files write the third group as
# "(8, 12)" while its paper names it 8-13, and the last is open-ended.
AGE_GROUP_NAMES = ("0-2", "4-6", "8-13", "15-20", "25-32", "38-43", "48-53", "60+")
AGE = LabelSpec(name="age_group", query="Sort images by the age of the person.", metric="ordinal",
                classes=tuple(float(i) for i in range(len(AGE_GROUPS))), class_names=AGE_GROUP_NAMES,
                class_prompt="A photo of a person aged {name}.")
AGE_PATTERN = re.compile(r"^\(\s*(\d+)\s*,\s*(\d+)\s*\)$|^(\d+)$")


@dataclasses.dataclass(frozen=True)
class AdienceConfig(PrepareConfig):
    """Options of the Adience preparer."""

    # Image folder: "aligned" (landmark-aligned faces), "faces" (coarse tilt-aligned) or "auto"
    # (aligned when present).
    images: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.images not in ("auto", *IMAGE_FOLDERS):
            raise InputError(f"images must be auto, aligned or faces, got {self.images!r}")


def fold_splits(k: int) -> SplitSpec:
    """Split roles for fold k: test on fold k, validate on fold k+1, train on the other three."""
    val = (k + 1) % FOLDS
    return SplitSpec(train=tuple(f"fold{i}" for i in range(FOLDS) if i not in (k, val)),
                     val=(f"fold{val}",), test=(f"fold{k}",))


def age_group(age: str) -> int | None:
    """The index of the age group that contains `age` ("(25, 32)" or "29"); None if no single one does."""
    match = AGE_PATTERN.match(age.strip())
    if match is None:
        return None
    low, high = (int(match[1]), int(match[2])) if match[3] is None else (int(match[3]), int(match[3]))
    for index, (start, end) in enumerate(AGE_GROUPS):
        if start <= low and high <= end:
            return index
    return None


def read_adience(src: Path, config: AdienceConfig) -> Prepared:
    """Read the five fold files and locate each face's image."""
    fold_paths = [require_file(src / FOLD_FILE.format(k=k), f"Adience's fold file {FOLD_FILE.format(k=k)}")
                  for k in range(FOLDS)]
    folders = list(IMAGE_FOLDERS) if config.images == "auto" else [config.images]
    images = first_existing([src / name for name in folders], "Adience's face folder (aligned/ or faces/)")
    prefix = IMAGE_FOLDERS[images.name]
    records, excluded = [], []
    for k, path in enumerate(fold_paths):
        for row in read_table(path, COLUMNS, delimiter="\t"):
            source = f"{images.name}/{row['user_id']}/{prefix}.{row['face_id']}.{row['original_image']}"
            group = age_group(row["age"])
            if group is None:
                excluded.append(SkippedSample(len(records) + len(excluded) + 1, source, "age outside the 8 groups",
                                              f"age {row['age']!r} in {path.name}"))
                continue
            records.append(SampleRecord(row=len(records) + len(excluded) + 1, source=source, path=src / source,
                                        labels={AGE.name: group}, split=f"fold{k}"))
    if not records:
        raise InputError(f"no face in {src}/fold_*_data.txt has an age inside the 8 groups; is it Adience?")
    extra = {f"manifest-fold{k}.yaml": fold_splits(k) for k in range(FOLDS)}
    protocol = {
        "age_group": f"index into {list(AGE_GROUPS)}; ages inside no single group are excluded",
        "split": "fold<k> = the face's fold file; manifest-fold<k>.yaml: test fold k, val fold k+1, train the rest",
        "images": images.name,
    }
    return Prepared(records=records, labels=(AGE,), splits=fold_splits(0), protocol=protocol,
                    extra_manifests=extra, excluded=excluded)
