"""KonIQ-10k (Hosu et al., 2020): 10,073 in-the-wild photos with crowd-sourced mean opinion scores.

Official layout (database.mmsp-kn.de, and the metadata folder of github.com/subpic/koniq):

    SRC/koniq10k_scores_and_distributions.csv   image_name, c1..c5, c_total, MOS, SD, MOS_zscore
    SRC/koniq10k_distributions_sets.csv         the same columns and `set`: training/validation/test
    SRC/1024x768/<image_name>                   (or 512x384/, the half-size release)

The official split is the `set` column of koniq10k_distributions_sets.csv (7,058 / 1,000 / 2,015).
Without that file the split is a seeded random one of the same proportions, and prepare.json says so.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.shard_writer import AutoSplit
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    first_existing,
    read_table,
    require_dir,
)

logger = logging.getLogger(__name__)

SCORES_FILE = "koniq10k_scores_and_distributions.csv"
SETS_FILE = "koniq10k_distributions_sets.csv"
RESOLUTIONS = ("1024x768", "512x384")
# Values of the sets file's `set` column -> split values.
SET_SPLITS = {"training": "train", "validation": "val", "test": "test"}
# The KonIQ paper's proportions (7,058 / 1,000 / 2,015 of 10,073), used only without the sets file.
RANDOM_FRACTIONS = (0.7007, 0.0993, 0.2000)
MOS = LabelSpec(name="mos", query="Sort images by the image quality.")


@dataclasses.dataclass(frozen=True)
class KonIQConfig(PrepareConfig):
    """Options of the KonIQ-10k preparer."""

    # Image folder: "1024x768" (the paper's images) or "512x384".
    resolution: str = "1024x768"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolution not in RESOLUTIONS:
            raise InputError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {self.resolution!r}")


def read_koniq10k(src: Path, config: KonIQConfig) -> Prepared:
    """Read the MOS table, the official split and the image folder."""
    scores_path, sets_path = src / SCORES_FILE, src / SETS_FILE
    table_path = first_existing([scores_path, sets_path], f"KonIQ-10k's score table {SCORES_FILE}", folder=False)
    images = require_dir(src / config.resolution, f"KonIQ-10k's {config.resolution} image folder")
    mos = {row["image_name"]: row["MOS"] for row in read_table(table_path, ["image_name", "MOS"])}
    if sets_path.is_file():
        split_of = {}
        for row in read_table(sets_path, ["image_name", "set"]):
            if row["set"] not in SET_SPLITS:
                raise InputError(f"{sets_path}: image {row['image_name']} has set {row['set']!r}; "
                                 f"expected one of {', '.join(SET_SPLITS)}")
            split_of[row["image_name"]] = SET_SPLITS[row["set"]]
        split_rule = f"official: the `set` column of {SETS_FILE}"
    else:
        logger.warning("%s not found: using a seeded random split of KonIQ's proportions", sets_path)
        splitter = AutoSplit(fractions=RANDOM_FRACTIONS, seed=config.seed)
        split_of = {name: splitter.assign(name) for name in mos}
        split_rule = f"seeded random 7058/1000/2015 proportions ({SETS_FILE} not found)"
    records = []
    for name in sorted(mos):
        if name not in split_of:
            raise InputError(f"{sets_path} has no row for {name}, which {table_path.name} lists; "
                             "use the two files of one release")
        records.append(SampleRecord(row=len(records) + 1, source=f"{config.resolution}/{name}",
                                    path=images / name, labels={MOS.name: mos[name]}, split=split_of[name]))
    protocol = {"mos": f"column MOS of {table_path.name}", "split": split_rule, "images": config.resolution}
    return Prepared(records=records, labels=(MOS,), splits=SplitSpec(), protocol=protocol)
