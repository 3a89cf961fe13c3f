"""COCO-REM (Singh et al., 2024) and COCO: object counts per category from COCO-format annotations.

Official layout (cocodataset.org; COCO-REM's revised masks use the same format and images):

    SRC/annotations/instances_trainrem.json, instances_valrem.json   (COCO-REM)
    SRC/annotations/instances_train2017.json, instances_val2017.json (COCO, used when no *rem.json exists)
    SRC/train2017/<file_name>, SRC/val2017/<file_name>               (or under SRC/images/)

Each category becomes a label `count_<name>` ranked by "Sort images by the number of <name>."
(the category name as COCO writes it). As in the paper, an image carries the count of a category
only when it holds at least one of it (`include_zero` adds the zeros). Annotation sets named
*train* are the training set (less a seeded validation hold-out); sets named *val* are the test set.

Crowd annotations (`iscrowd: 1`) mark one region holding many objects that were not outlined one
by one, so they are never counted as objects. With crowd "keep" (the default) the image keeps the
count of its individually annotated objects, which is then a lower bound; with "drop" the image
gets no count for that category. A category with a crowd region but no outlined object gets no
count under either policy (its count is unknown, not zero). Either way coco_counts.jsonl records,
per sample key, the outlined counts and the categories flagged crowd.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.sources import SampleRecord, sample_key
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    check_fraction,
    first_existing,
    holdout,
    relative,
)

logger = logging.getLogger(__name__)

ANNOTATIONS = "annotations"
COUNTS_FILE = "coco_counts.jsonl"
CROWD_POLICIES = ("keep", "drop")


@dataclasses.dataclass(frozen=True)
class COCOConfig(PrepareConfig):
    """Options of the COCO-REM preparer."""

    # "keep": images with a crowd region keep their count of outlined objects; "drop": no count then.
    crowd: str = "keep"
    # Give every image a count for every category, zeros included (the paper counts only present ones).
    include_zero: bool = False
    # Fraction of training images held out for validation (seeded hash of the file name).
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crowd not in CROWD_POLICIES:
            raise InputError(f"crowd must be one of {', '.join(CROWD_POLICIES)}, got {self.crowd!r}")
        check_fraction("val_fraction", self.val_fraction)


def count_label(name: str) -> str:
    """Label name of a category: "traffic light" -> "count_traffic_light"."""
    return "count_" + re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def read_coco_rem(src: Path, config: COCOConfig) -> Prepared:
    """Read every instances_*.json (COCO-REM's when present) and count objects per image and category."""
    files = annotation_files(src)
    categories: dict[int, str] = {}
    records, sidecar = [], []
    for path in files:
        data = _load(path)
        role = "train" if "train" in path.stem else "test"
        for cat in data["categories"]:
            if categories.setdefault(cat["id"], cat["name"]) != cat["name"]:
                raise InputError(f"{path} names category {cat['id']} {cat['name']!r}, another file "
                                 f"{categories[cat['id']]!r}; use annotation files of one release")
        images = image_folder(src, path)
        counts: dict[int, Counter[int]] = {}
        crowded: dict[int, set[int]] = {}
        for ann in data["annotations"]:
            if ann.get("iscrowd", 0):
                crowded.setdefault(ann["image_id"], set()).add(ann["category_id"])
            else:
                counts.setdefault(ann["image_id"], Counter())[ann["category_id"]] += 1
        held = holdout([img["file_name"] for img in data["images"]], config.val_fraction, config.seed) \
            if role == "train" else set()
        for image in sorted(data["images"], key=lambda img: img["id"]):
            image_counts, crowd = counts.get(image["id"], Counter()), crowded.get(image["id"], set())
            labels = _labels(image_counts, crowd, categories, config)
            record = SampleRecord(
                row=len(records) + 1, source=f"{relative(images, src)}/{image['file_name']}",
                path=images / image["file_name"], labels=labels,
                split="val" if image["file_name"] in held else role,
            )
            records.append(record)
            sidecar.append({"key": sample_key(record), "image_id": image["id"], "annotations": path.name,
                            "counts": {categories[c]: n for c, n in sorted(image_counts.items())},
                            "crowd": sorted(categories[c] for c in crowd)})
    labels = tuple(LabelSpec(name=count_label(name), query=f"Sort images by the number of {name}.")
                   for _, name in sorted(categories.items()))
    if len({label.name for label in labels}) != len(labels):
        raise InputError(f"two categories of {files[0]} give the same label name; rename one")
    protocol = {
        "annotations": [p.name for p in files],
        "counts": "outlined (non-crowd) instances per category; " + (
            "zeros included" if config.include_zero else "only categories present in the image"),
        "crowd": config.crowd,
        "split": f"*train* sets: train less a seeded {config.val_fraction:.0%} val; *val* sets: test",
    }
    return Prepared(records=records, labels=labels, splits=SplitSpec(), protocol=protocol,
                    sidecars={COUNTS_FILE: "".join(json.dumps(line) + "\n" for line in sidecar)})


def annotation_files(src: Path) -> list[Path]:
    """COCO-REM's instances_*rem.json when any exists, else every instances_*.json."""
    folder = src / ANNOTATIONS
    found = sorted(folder.glob("instances_*.json")) if folder.is_dir() else []
    if not found:
        raise InputError(f"expected COCO-format annotations at {folder}/instances_*.json "
                         "(instances_trainrem.json, instances_valrem.json or instances_train2017.json, ...)")
    revised = [p for p in found if p.stem.endswith("rem")]
    if revised:
        logger.info("using COCO-REM annotations %s", ", ".join(p.name for p in revised))
    return revised or found


def image_folder(src: Path, annotation: Path) -> Path:
    """The image folder of an annotation file: instances_val2017.json and instances_valrem.json -> val2017/."""
    name = annotation.stem.removeprefix("instances_")
    base = name.removesuffix("rem") + "2017" if name.endswith("rem") else name
    candidates = [src / base, src / "images" / base] + ([src / name] if name != base else [])
    return first_existing(candidates, f"the images of {annotation.name}")


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); re-download it") from e
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError(f"{path} is not a COCO instances file: it needs images, annotations and categories")
    return data


def _labels(counts: Counter[int], crowd: set[int], categories: dict[int, str], config: COCOConfig) -> dict[str, int]:
    labels = {}
    for cat, name in categories.items():
        # A crowd region with no outlined object of its category leaves the count unknown, not zero.
        if cat in crowd and (config.crowd == "drop" or cat not in counts):
            continue
        if cat in counts or config.include_zero:
            labels[count_label(name)] = counts.get(cat, 0)
    return labels
