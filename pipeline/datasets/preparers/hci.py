"""HCI, historical colour images (Palermo et al., 2012): 1,325 photos dated to the decade, 1930s–1970s.

Official layout (HistoricalColor-ECCV2012): one folder per decade, 265 images each,

    SRC/1930s/ 1940s/ 1950s/ 1960s/ 1970s/
    (or SRC/data/imgs/decade_database/<decade>/, or that under HistoricalColor-ECCV2012/)

The label is the decade's first year, an ordinal class of [1930, …, 1970], named "1930s" … "1970s"
in the manifest for prompts. The standard protocol
(Palermo et al., followed by OrdinalCLIP and L2RCLIP) takes, per decade, 50 test and 5 validation
images at random and trains on the other 210; here the draw is seeded by `seed`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    first_existing,
    relative,
)

DECADES = (1930, 1940, 1950, 1960, 1970)
ROOTS = (".", "data/imgs/decade_database", "HistoricalColor-ECCV2012/data/imgs/decade_database", "decade_database")
DECADE = LabelSpec(name="decade", query="Sort images by the taken date of the photo.", metric="ordinal",
                   classes=tuple(float(d) for d in DECADES), class_names=tuple(f"{d}s" for d in DECADES),
                   class_prompt="A photo taken in the {name}.")


@dataclasses.dataclass(frozen=True)
class HCIConfig(PrepareConfig):
    """Options of the HCI preparer."""

    # Test images drawn per decade (the protocol's 50).
    test_per_decade: int = 50
    # Validation images drawn per decade (the protocol's 5).
    val_per_decade: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.test_per_decade < 0 or self.val_per_decade < 0:
            raise InputError("test_per_decade and val_per_decade must be non-negative")


def read_hci(src: Path, config: HCIConfig) -> Prepared:
    """Find the decade folders and deal each decade's images into test, val and train."""
    candidates = [src / root / "1930s" for root in ROOTS]
    root = first_existing(candidates, "HCI's decade folders (1930s/ … 1970s/)").parent
    rng = np.random.default_rng(config.seed)
    records = []
    for decade in DECADES:
        folder = root / f"{decade}s"
        if not folder.is_dir():
            raise InputError(f"expected HCI's decade folder at {folder} beside {root / '1930s'}; "
                             "unpack the whole release")
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        needed = config.test_per_decade + config.val_per_decade + 1
        if len(files) < needed:
            raise InputError(f"{folder} has {len(files)} images; the split needs at least {needed} "
                             "(set test_per_decade / val_per_decade lower)")
        order = rng.permutation(len(files))
        roles = (["test"] * config.test_per_decade + ["val"] * config.val_per_decade
                 + ["train"] * (len(files) - needed + 1))
        split_of = {files[i]: role for i, role in zip(order, roles)}
        for path in files:
            records.append(SampleRecord(row=len(records) + 1, source=relative(path, src), path=path,
                                        labels={DECADE.name: decade}, split=split_of[path]))
    protocol = {
        "decade": "the image's decade folder",
        "split": f"per decade, seeded: {config.test_per_decade} test, {config.val_per_decade} val, the rest train",
    }
    return Prepared(records=records, labels=(DECADE,), splits=SplitSpec(), protocol=protocol)
