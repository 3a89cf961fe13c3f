"""CLEVR (Johnson et al., 2017): rendered scenes of 3–10 objects, counted per colour, material and shape.

Official layout (CLEVR_v1.0):

    SRC/scenes/CLEVR_train_scenes.json, CLEVR_val_scenes.json
        {"scenes": [{"image_filename": "CLEVR_train_000000.png", "objects": [{"color", "material", "shape", …}]}]}
    SRC/images/train/CLEVR_train_000000.png, SRC/images/val/…

As in the paper's appendix A.2, one model ranks by 13 counts: 8 colours ("Sort images by the
number of objects in red."), 2 materials and 3 shapes. Every image carries all 13 (zeros are real
counts here). The train scenes train (less a seeded validation hold-out); the val scenes, CLEVR's
evaluation set, are the test split (the test scenes are not released).
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, SplitSpec
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.datasets.preparers.common import (
    PrepareConfig,
    Prepared,
    check_fraction,
    holdout,
    require_dir,
)

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
MATERIALS = ("rubber", "metal")
SHAPES = ("cube", "sphere", "cylinder")
# Object attribute -> its values and the query template of their counts.
ATTRIBUTES = {
    "color": (COLORS, "Sort images by the number of objects in {}."),
    "material": (MATERIALS, "Sort images by the number of {} objects."),
    "shape": (SHAPES, "Sort images by the number of {}s."),
}


@dataclasses.dataclass(frozen=True)
class CLEVRConfig(PrepareConfig):
    """Options of the CLEVR preparer."""

    # Fraction of the train scenes held out for validation (seeded hash of the file name).
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("val_fraction", self.val_fraction)


def label_name(attribute: str, value: str) -> str:
    """Label of one attribute value: ("color", "red") -> "color_red"."""
    return f"{attribute}_{value}"


LABELS = tuple(LabelSpec(name=label_name(attr, value), query=query.format(value))
               for attr, (values, query) in ATTRIBUTES.items() for value in values)


def read_clevr(src: Path, config: CLEVRConfig) -> Prepared:
    """Read the scene files and count each scene's objects per colour, material and shape."""
    scene_dir = src / "scenes"
    files = sorted(scene_dir.glob("CLEVR_*_scenes.json")) if scene_dir.is_dir() else []
    if not files:
        raise InputError(f"expected CLEVR scene files at {scene_dir}/CLEVR_train_scenes.json and "
                         "CLEVR_val_scenes.json; none found")
    records = []
    for path in files:
        set_name = path.stem.removeprefix("CLEVR_").removesuffix("_scenes")
        images = require_dir(src / "images" / set_name, f"the images of {path.name}")
        scenes = _scenes(path)
        role = "train" if set_name.startswith("train") else "test"
        held = holdout([s["image_filename"] for s in scenes], config.val_fraction, config.seed) \
            if role == "train" else set()
        for scene in scenes:
            name = scene["image_filename"]
            records.append(SampleRecord(row=len(records) + 1, source=f"images/{set_name}/{name}",
                                        path=images / name, labels=count_objects(scene["objects"], path),
                                        split="val" if name in held else role))
    protocol = {
        "counts": "objects per colour, material and shape in each scene; all 13 labels on every image",
        "split": f"train scenes: train less a seeded {config.val_fraction:.0%} val; val scenes: test",
        "scenes": [p.name for p in files],
    }
    return Prepared(records=records, labels=LABELS, splits=SplitSpec(), protocol=protocol)


def count_objects(objects: list[dict], where: Path) -> dict[str, int]:
    """The 13 counts of one scene's objects; an unknown attribute value is an InputError."""
    labels = {label.name: 0 for label in LABELS}
    found = Counter()
    for obj in objects:
        for attribute, (values, _) in ATTRIBUTES.items():
            value = obj.get(attribute)
            if value not in values:
                raise InputError(f"{where}: an object has {attribute} {value!r}; CLEVR's are {', '.join(values)}")
            found[label_name(attribute, value)] += 1
    labels.update(found)
    return labels


def _scenes(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); re-download it") from e
    if not isinstance(data, dict) or not isinstance(data.get("scenes"), list):
        raise InputError(f"{path} is not a CLEVR scene file: it needs a 'scenes' list")
    return data["scenes"]
