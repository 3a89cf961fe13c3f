"""How each photo-tasks image was made, written to OUT/recipes.jsonl, and how to make it again.

A recipe names the base photo, the crop and what was done to it (a distortion, a jitter or pasted
cut-outs). `render` turns a recipe back into the exact stored pixels, which is how the labels can be
checked independently of the build.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from rankpipe.errors import InputError
from rankpipe.pipeline.datasets.demo_data import render_background
from rankpipe.pipeline.datasets.photo_tasks.attributes import Jitter
from rankpipe.pipeline.datasets.photo_tasks.counting import Placement, composite
from rankpipe.pipeline.datasets.photo_tasks.distortions import get_distortion
from rankpipe.pipeline.datasets.photo_tasks.sources import Cutout

RECIPES_FILE = "recipes.jsonl"
# The group whose images carry cut-outs, a jitter and a distortion at once (several labels per image).
MIXED = "mixed"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one image was made: enough to render it again from its base photo and the cut-outs."""

    # "quality", "attributes", "counting" or "mixed".
    group: str
    # Base photo name and its split.
    photo: str
    split: str
    # Square crop in photo pixels: (top, left, side).
    crop: tuple[int, int, int]
    # Quality images: the distortion's name, its applied parameter and the noise seed.
    distortion: str | None = None
    parameter: float | None = None
    noise_seed: int | None = None
    # Attribute images: the photometric jitter.
    jitter: Jitter | None = None
    # Counting images: the target category and every pasted cut-out, in pasting order.
    target: str | None = None
    placements: tuple[Placement, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain data, leaving out the fields this kind of image does not use."""
        data = dataclasses.asdict(self)
        return {key: value for key, value in data.items() if value is not None and value != ()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipe:
        """The recipe `to_json` wrote (extra keys such as "key" are ignored)."""
        jitter = data.get("jitter")
        return cls(
            group=data["group"], photo=data["photo"], split=data["split"], crop=tuple(data["crop"]),
            distortion=data.get("distortion"), parameter=data.get("parameter"), noise_seed=data.get("noise_seed"),
            jitter=Jitter(**jitter) if jitter is not None else None, target=data.get("target"),
            placements=tuple(Placement(**p) for p in data.get("placements", ())),
        )


def render(recipe: Recipe, photo: np.ndarray, cutouts: dict[tuple[str, str], Cutout], size: int) -> np.ndarray:
    """The image a recipe describes: RGB [size, size, 3] uint8.

    Args:
        photo: The base photo's pixels, as its loader returns them.
        cutouts: Cut-outs by (category, name).
        size: Output side in pixels.
    """
    pixels = render_background(photo, recipe.crop, 1.0, size)
    if recipe.group == MIXED:
        # Paste first, so the jitter and the distortion act on the whole picture, cut-outs included,
        # and every label describes all of it.
        pixels = recipe.jitter.apply(composite(pixels, recipe.placements, cutouts))
        return get_distortion(recipe.distortion).apply(pixels, recipe.parameter, recipe.noise_seed)
    if recipe.distortion is not None:
        pixels = get_distortion(recipe.distortion).apply(pixels, recipe.parameter, recipe.noise_seed)
    if recipe.jitter is not None:
        pixels = recipe.jitter.apply(pixels)
    if recipe.placements:
        pixels = composite(pixels, recipe.placements, cutouts)
    return pixels


def read_recipes(out_dir: str | Path) -> dict[str, Recipe]:
    """The recipes of a built dataset by sample key."""
    path = Path(out_dir) / RECIPES_FILE
    if not path.is_file():
        raise InputError(f"{path} does not exist; pass the --out folder of `rankpipe datasets build photo-tasks`")
    recipes = {}
    for line in path.read_text().splitlines():
        data = json.loads(line)
        recipes[data["key"]] = Recipe.from_json(data)
    return recipes
