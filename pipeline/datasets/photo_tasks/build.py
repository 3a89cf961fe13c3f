"""Build the photo-tasks dataset: quality, attribute, counting and mixed images with exact labels, in WebDataset tars.

Four groups of images are made from the base photos (docs/photo-tasks.md):

- quality: a clean crop with exactly one distortion at a uniform strength;
- attributes: a clean crop with a photometric jitter (saturation, contrast, brightness);
- counting: a crop of a counting background with k ∈ 0..max_count cut-outs of a target category and a
  few distractor cut-outs of other categories;
- mixed: a counting image that then gets a jitter and a blur of uniform strength, so one image
  carries a count, a blur strength and the measured attributes at once (the bench's query matrix
  asks whether the query picks which one the ranking follows).

Every image is stored as PNG, so the stored pixels are the rendered pixels, and every label is
computed on them or recorded while making them. Each base photo belongs to one split; held-out
counting categories never appear in training images and their labels are absent (NaN) there.
Beside the tars, `photo_tasks.json` records the sources, tasks and held-out categories, and
`recipes.jsonl` how each image was made (enough to make it again).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from rankpipe.errors import InputError
from rankpipe.files import write_text_atomic
from rankpipe.pipeline.data.manifest import SPLIT_ROLES, LabelSpec
from rankpipe.pipeline.data.shard_writer import ShardsResult, write_shards
from rankpipe.pipeline.data.sources import SampleRecord, sample_key
from rankpipe.pipeline.datasets.demo_data import deal_splits
from rankpipe.pipeline.datasets.photo_tasks.attributes import (
    ATTRIBUTES,
    JitterRange,
    measure_attributes,
)
from rankpipe.pipeline.datasets.photo_tasks.counting import (
    PlacementConfig,
    counts,
    place_cutouts,
)
from rankpipe.pipeline.datasets.photo_tasks.distortions import (
    DISTORTIONS,
    QUALITY_LABEL,
    QUALITY_QUERY,
)
from rankpipe.pipeline.datasets.photo_tasks.recipes import MIXED, RECIPES_FILE, Recipe, render
from rankpipe.pipeline.datasets.photo_tasks.sources import (
    BasePhoto,
    PhotoSources,
    SourcesConfig,
    find_sources,
)

logger = logging.getLogger(__name__)

DATASET_NAME = "photo-tasks"
RECORD_FILE = "photo_tasks.json"
GROUPS = ("quality", "attributes", "counting", MIXED)
# The distortion of the mixed images.
MIXED_DISTORTION = "blur"
# Images per group for each --size (a group left out has none).
SIZES: dict[str, dict[str, int]] = {
    "small": {"quality": 160, "attributes": 80, "counting": 160},
    "full": {"quality": 2000, "attributes": 1000, "counting": 2400},
    # Every query's test split has >= 200 images, with the built-in photos too (docs/photo-tasks.md).
    "bench": {"quality": 3200, "attributes": 300, "counting": 720, MIXED: 720},
    # Mixed images only: every image has every label but the other distortions'.
    "steering": {MIXED: 1200},
}
# Split fractions of base photos where a size differs from PhotoTasksConfig's: the bench sizes give
# test a larger share, so paired comparisons have enough test images per query.
SIZE_SPLITS: dict[str, tuple[float, float, float]] = {"bench": (0.5, 0.2, 0.3), "steering": (0.5, 0.2, 0.3)}


@dataclasses.dataclass(frozen=True)
class PhotoTasksConfig:
    """What to build."""

    # Images per group: {"quality": n, "attributes": n, "counting": n, "mixed": n}; a group left out has none.
    images: dict[str, int]
    # Output side in pixels (images are square).
    image_size: int = 224
    # Seeds every random choice: the same seed and sources give the same dataset.
    seed: int = 0
    # Fractions of base photos (of each kind: counting backgrounds and the others) in train, val, test.
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # Crop side as a fraction of the photo's shorter side: (min, max); never below image_size where
    # the photo is large enough, so crops are not upscaled (which would add blur of its own).
    crop_fraction: tuple[float, float] = (0.3, 0.9)
    # Counting categories held out of training (chosen by the seed).
    held_out_categories: int = 2
    # Target cut-outs per counting image: uniform in 0..max_count.
    max_count: int = 8
    # Distractor cut-outs (other categories) per counting image: uniform in 0..max_distractors.
    max_distractors: int = 3
    # Layouts (crop and placements) tried per counting image before giving up.
    layout_tries: int = 20
    # How cut-outs are scaled and placed.
    placement: PlacementConfig = PlacementConfig()
    # Photometric jitter of the attribute images.
    jitter: JitterRange = JitterRange()
    # Where photos and cut-outs come from.
    sources: SourcesConfig = SourcesConfig()
    # Samples per tar.
    samples_per_tar: int = 500

    def __post_init__(self) -> None:
        if not set(self.images) <= set(GROUPS) or any(n < 0 for n in self.images.values()):
            raise ValueError(f"images must give non-negative counts for groups among {GROUPS}, got {self.images}")
        if self.held_out_categories < 0:
            raise ValueError(f"held_out_categories must be >= 0, got {self.held_out_categories}")


def config_for_size(size: str, seed: int = 0, sources: str = "auto") -> PhotoTasksConfig:
    """The configuration of a named size ("small" or "full")."""
    if size not in SIZES:
        raise InputError(f"unknown size {size!r}; use one of {', '.join(SIZES)}")
    splits = SIZE_SPLITS.get(size, PhotoTasksConfig.split_fractions)
    return PhotoTasksConfig(images=dict(SIZES[size]), seed=seed, split_fractions=splits,
                            sources=SourcesConfig(mode=sources))


@dataclasses.dataclass(frozen=True)
class PhotoTasksResult:
    """What a build wrote."""

    # The shards, index and manifest.
    shards: ShardsResult
    # Where photos and cut-outs came from.
    sources: PhotoSources
    # Counting categories held out of training.
    held_out: tuple[str, ...]

    def summary(self) -> str:
        """One line for the user: what was written and from which sources."""
        photos = ", ".join(self.sources.photo_sources)
        cutouts = ", ".join(self.sources.cutout_sources)
        held = ", ".join(self.held_out) or "none"
        return f"{self.shards.summary()} Photos: {photos}; cut-outs: {cutouts}; held-out categories: {held}."


def build_photo_tasks(out_dir: str | Path, config: PhotoTasksConfig,
                      progress: Callable[[int], None] | None = None) -> PhotoTasksResult:
    """Make every image, write the tars and manifest, then the build record and recipes.

    Args:
        out_dir: Output folder (created if needed).
        config: What to build.
        progress: Called with 1 after each image is made.

    Raises:
        InputError: too few photos or categories for the requested splits and held-out categories.
    """
    out_dir = Path(out_dir)
    sources = find_sources(config.sources)
    categories = sorted(sources.cutouts)
    rng = np.random.default_rng([config.seed, 0])
    split_of = assign_splits(sources.photos, config.split_fractions, rng)
    if config.held_out_categories >= len(categories):
        raise InputError(f"cannot hold out {config.held_out_categories} of {len(categories)} counting categories; "
                         "hold out fewer")
    held_out = tuple(sorted(rng.choice(categories, size=config.held_out_categories, replace=False).tolist()))
    labels = _label_specs(categories, sources.nouns)
    cutouts = {(c.category, c.name): c for items in sources.cutouts.values() for c in items}
    if _count(config, "counting") + _count(config, MIXED) and not any(p.counting for p in sources.photos):
        raise InputError("none of the base photos may be a counting background; install the photo packages of "
                         "docs/photo-tasks.md or pass --sources builtin")
    photos = {photo.name: photo.loader() for photo in sources.photos}
    recipes: list[dict] = []

    def records() -> Iterator[SampleRecord]:
        # A generator, so write_shards packs each image as it is made and the PNGs never pile up in memory.
        for group in GROUPS:
            pool = [p.name for p in sources.photos if group not in ("counting", MIXED) or p.counting]
            pool = [pool[i] for i in rng.permutation(len(pool))]
            for index in range(_count(config, group)):
                name = pool[index % len(pool)]
                image_rng = np.random.default_rng([config.seed, GROUPS.index(group) + 1, index])
                recipe, label_values = _make(group, name, split_of[name], photos[name], sources, held_out, config,
                                             image_rng)
                pixels = render(recipe, photos[name], cutouts, config.image_size)
                label_values.update(measure_attributes(pixels))
                record = SampleRecord(
                    row=len(recipes) + 1, source=f"{name}/{group}-{index:05d}.png", path=None, labels=label_values,
                    split=recipe.split, data=_png(pixels), extension="png",
                )
                recipes.append({"key": sample_key(record), **recipe.to_json()})
                yield record

    shards = write_shards(records(), out_dir, DATASET_NAME, labels, samples_per_tar=config.samples_per_tar,
                          progress=progress)
    write_text_atomic(out_dir / RECIPES_FILE, "".join(json.dumps(entry) + "\n" for entry in recipes))
    record = _build_record(config, sources, split_of, categories, held_out, labels)
    write_text_atomic(out_dir / RECORD_FILE, json.dumps(record, indent=1) + "\n")
    result = PhotoTasksResult(shards, sources, held_out)
    logger.info("%s", result.summary())
    return result


def assign_splits(photos: Sequence[BasePhoto], fractions: tuple[float, float, float],
                  rng: np.random.Generator) -> dict[str, str]:
    """Each photo's split: counting backgrounds and other photos are dealt separately, so each split gets both.

    Within a kind, a seeded shuffle deals round(fraction·n) photos (at least one) to val and to test.
    """
    split_of = {}
    for counting in (True, False):
        names = [p.name for p in photos if p.counting == counting]
        if not names:
            continue
        if len(names) < len(SPLIT_ROLES):
            raise InputError(f"only {len(names)} {'counting' if counting else 'other'} base photos; "
                             f"at least {len(SPLIT_ROLES)} are needed, one per split")
        split_of.update(deal_splits([names[i] for i in rng.permutation(len(names))], fractions))
    return split_of


def _count(config: PhotoTasksConfig, group: str) -> int:
    return config.images.get(group, 0)


def count_label(category: str) -> str:
    """Label name of a counting category."""
    return f"count_{category}"


def _label_specs(categories: Sequence[str], nouns: dict[str, str]) -> tuple[LabelSpec, ...]:
    specs = [LabelSpec(d.name, d.query) for d in DISTORTIONS.values()]
    specs.append(LabelSpec(QUALITY_LABEL, QUALITY_QUERY))
    specs += [LabelSpec(a.name, a.query) for a in ATTRIBUTES]
    specs += [LabelSpec(count_label(c), f"Sort images by the number of {nouns[c]}.") for c in categories]
    return tuple(specs)


def _make(group: str, photo_name: str, split: str, photo: np.ndarray, sources: PhotoSources,
          held_out: tuple[str, ...], config: PhotoTasksConfig, rng: np.random.Generator) -> tuple[Recipe, dict]:
    """One image's recipe and the labels known from making it (attributes are measured afterwards)."""
    size = config.image_size
    if group == "quality":
        distortion = list(DISTORTIONS.values())[int(rng.integers(len(DISTORTIONS)))]
        parameter = distortion.parameter(float(rng.uniform(0.0, 1.0)), size)
        recipe = Recipe(group, photo_name, split, _crop(photo, size, config, rng), distortion=distortion.name,
                        parameter=parameter, noise_seed=int(rng.integers(2**31)))
        return recipe, {distortion.name: distortion.label(parameter), QUALITY_LABEL: -distortion.severity(parameter)}
    if group == "attributes":
        return Recipe(group, photo_name, split, _crop(photo, size, config, rng), jitter=config.jitter.draw(rng)), {}
    recipe, labels = _counting(group, photo_name, split, photo, sources, held_out, config, rng)
    if group == MIXED:
        blur = DISTORTIONS[MIXED_DISTORTION]
        parameter = blur.parameter(float(rng.uniform(0.0, 1.0)), size)
        recipe = dataclasses.replace(recipe, jitter=config.jitter.draw(rng), distortion=blur.name, parameter=parameter,
                                     noise_seed=int(rng.integers(2**31)))
        labels[blur.name] = blur.label(parameter)
    return recipe, labels


def _counting(group: str, photo_name: str, split: str, photo: np.ndarray, sources: PhotoSources,
              held_out: tuple[str, ...], config: PhotoTasksConfig, rng: np.random.Generator) -> tuple[Recipe, dict]:
    """A counting image's recipe (target and distractor cut-outs on a crop) and its count labels."""
    size = config.image_size
    allowed = sorted(c for c in sources.cutouts if split != "train" or c not in held_out)
    target = allowed[int(rng.integers(len(allowed)))]
    others = [c for c in allowed if c != target]
    k = int(rng.integers(0, config.max_count + 1))
    n_distractors = int(rng.integers(0, config.max_distractors + 1)) if others else 0
    chosen = [target] * k + [others[int(rng.integers(len(others)))] for _ in range(n_distractors)]
    chosen = [chosen[i] for i in rng.permutation(len(chosen))]
    pasted = [sources.cutouts[c][int(rng.integers(len(sources.cutouts[c])))] for c in chosen]
    for _ in range(config.layout_tries):
        crop = _crop(photo, size, config, rng)
        placements = place_cutouts(size, pasted, rng, config.placement)
        if placements is not None:
            n = counts(placements)
            recipe = Recipe(group, photo_name, split, crop, target=target, placements=tuple(placements))
            return recipe, {count_label(c): float(n[c]) for c in allowed}
    raise RuntimeError(f"could not place {len(pasted)} cut-outs without overlap in {config.layout_tries} layouts "
                       f"at {size} px; lower PlacementConfig.long_side or max_count")


def _crop(photo: np.ndarray, size: int, config: PhotoTasksConfig, rng: np.random.Generator) -> tuple[int, int, int]:
    height, width = photo.shape[:2]
    shorter = min(height, width)
    side = max(int(shorter * rng.uniform(*config.crop_fraction)), min(shorter, size))
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _build_record(config: PhotoTasksConfig, sources: PhotoSources, split_of: dict[str, str],
                  categories: list[str], held_out: tuple[str, ...], labels: tuple[LabelSpec, ...]) -> dict:
    held_labels = [count_label(c) for c in held_out]
    return {
        "name": DATASET_NAME,
        "seed": config.seed,
        "image_size": config.image_size,
        "images": config.images,
        "sources": {"photos": sources.photo_sources, "cutouts": sources.cutout_sources},
        "photo_splits": {role: sorted(n for n, s in split_of.items() if s == role) for role in SPLIT_ROLES},
        "counting": {"categories": categories, "held_out": list(held_out), "held_out_labels": held_labels},
        # What `rankpipe train --label ...` should train on: every label but the held-out counts.
        "train_labels": [spec.name for spec in labels if spec.name not in held_labels],
        "queries": {spec.name: spec.query for spec in labels},
    }
