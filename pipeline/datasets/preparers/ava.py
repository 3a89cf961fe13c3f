"""AVA (Murray et al., 2012): about 255,000 photos from dpchallenge.com with 1–10 aesthetic votes.

Official layout (the AVA_dataset release):

    SRC/AVA.txt                                   one image per line, space-separated:
        index  image_id  n1 … n10  semantic_tag_1  semantic_tag_2  challenge_id
        (n_k = number of votes for score k)
    SRC/aesthetics_image_lists/generic_test.jpgl  the official test list, one image id per line
    SRC/images/<image_id>.jpg                     (images/images/ in some copies)

The label is the mean vote, Σ k·n_k / Σ n_k. Test images are those of generic_test.jpgl; every
other image trains, less a seeded validation hold-out. The paper's Table 4 attributes
(colourfulness, contrast, brightness) are measured on every image by default.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    check_fraction,
    first_existing,
    holdout,
    relative,
    require_file,
)

VOTES_FILE = "AVA.txt"
TEST_LIST = "aesthetics_image_lists/generic_test.jpgl"
IMAGE_DIRS = ("images", "images/images", "image")
# index, image id, ten vote counts, two semantic tags, challenge id.
COLUMNS = 15
SCORES = range(1, 11)
MOS = LabelSpec(name="mos", query="Sort images by the image quality of aesthetics.")


@dataclasses.dataclass(frozen=True)
class AVAConfig(PrepareConfig):
    """Options of the AVA preparer."""

    # The paper's Table 4 evaluates colourfulness, contrast and brightness on AVA: measured by default.
    attributes: bool = True
    # Fraction of the training images held out for validation (seeded hash of the image id).
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("val_fraction", self.val_fraction)


def read_ava(src: Path, config: AVAConfig) -> Prepared:
    """Read the vote counts, the official test list and the image folder."""
    votes_path = require_file(src / VOTES_FILE, "AVA's vote table AVA.txt")
    test_path = require_file(src / TEST_LIST, "AVA's official test list")
    images = first_existing([src / d for d in IMAGE_DIRS], "AVA's image folder")
    test_ids = {line.strip() for line in test_path.read_text().splitlines() if line.strip()}
    means = _mean_scores(votes_path)
    val_ids = holdout([i for i in means if i not in test_ids], config.val_fraction, config.seed)
    records = []
    for image_id, mean in means.items():
        split = "test" if image_id in test_ids else "val" if image_id in val_ids else "train"
        records.append(SampleRecord(row=len(records) + 1, source=f"{relative(images, src)}/{image_id}.jpg",
                                    path=images / f"{image_id}.jpg", labels={MOS.name: mean}, split=split))
    protocol = {
        "mos": f"mean of the 1-10 vote counts in {VOTES_FILE}",
        "split": f"test: {TEST_LIST}; val: seeded {config.val_fraction:.0%} of the rest; train: the others",
    }
    return Prepared(records=records, labels=(MOS,), splits=SplitSpec(), protocol=protocol)


def _mean_scores(path: Path) -> dict[str, float | None]:
    """Image id -> mean vote (None when it has no votes), in file order."""
    means: dict[str, float | None] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != COLUMNS or not all(f.isdigit() for f in fields[:12]):
            raise InputError(f"{path} line {number} has {len(fields)} fields; AVA.txt lines are {COLUMNS} "
                             "space-separated integers (index, image id, 10 vote counts, 2 tags, challenge)")
        votes = [int(n) for n in fields[2:12]]
        total = sum(votes)
        means[fields[1]] = sum(k * n for k, n in zip(SCORES, votes)) / total if total else None
    return means
