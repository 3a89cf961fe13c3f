"""Counting images: cut-outs pasted onto a real background at recorded positions, scales and flips.

A count label is the number of pasted cut-outs of its category. For that to be what a viewer sees,
no two cut-outs share a pixel: every cut-out's non-transparent pixels are free of the others, so each
stays whole and separately visible.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from rankpipe.pipeline.datasets.photo_tasks.sources import Cutout


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one cut-out was pasted, in output pixels."""

    # Category and cut-out name (keys into the build's cut-outs).
    category: str
    cutout: str
    # Top-left corner of the scaled cut-out.
    top: int
    left: int
    # Size of the scaled cut-out.
    height: int
    width: int
    # Mirrored left-right.
    flip: bool


@dataclasses.dataclass(frozen=True)
class PlacementConfig:
    """How cut-outs are scaled and placed."""

    # The cut-out's longer side as a fraction of the image side: (min, max).
    long_side: tuple[float, float] = (0.16, 0.3)
    # At most this fraction of the image is covered by the cut-outs' bounding boxes: a crowded
    # layout is scaled down as a whole so that many cut-outs still fit without touching.
    max_coverage: float = 0.3
    # Random positions tried per cut-out before the whole layout is given up.
    tries: int = 100


def scaled_cutout(cutout: Cutout, placement: Placement) -> np.ndarray:
    """The cut-out resized to the placement's size (and mirrored): RGBA [height, width, 4] uint8."""
    image = Image.fromarray(cutout.rgba).resize((placement.width, placement.height), Image.Resampling.LANCZOS)
    if placement.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def place_cutouts(
    size: int, cutouts: Sequence[Cutout], rng: np.random.Generator, config: PlacementConfig = PlacementConfig()
) -> list[Placement] | None:
    """Placements for `cutouts` on a [size, size] image, no two sharing a pixel; None when they do not fit.

    Sizes and flips are drawn first (and shrunk together to `max_coverage`), then each cut-out tries
    random positions until its non-transparent pixels miss every earlier one.
    """
    long_sides = rng.uniform(*config.long_side, size=len(cutouts)) * size
    shapes = [c.rgba.shape[:2] for c in cutouts]
    coverage = sum(long**2 * h * w / max(h, w) ** 2 for long, (h, w) in zip(long_sides, shapes)) / size**2
    if coverage > config.max_coverage:
        long_sides = long_sides * np.sqrt(config.max_coverage / coverage)
    flips = rng.random(len(cutouts)) < 0.5
    occupied = np.zeros((size, size), dtype=bool)
    placements = []
    for cutout, long_side, (h, w), flip in zip(cutouts, long_sides, shapes, flips):
        scale = long_side / max(h, w)
        height, width = max(1, round(h * scale)), max(1, round(w * scale))
        sized = Placement(cutout.category, cutout.name, 0, 0, height, width, bool(flip))
        mask = scaled_cutout(cutout, sized)[..., 3] > 0  # [height, width]
        for _ in range(config.tries):
            top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
            window = occupied[top:top + height, left:left + width]
            if not (window & mask).any():
                window |= mask
                placements.append(dataclasses.replace(sized, top=top, left=left))
                break
        else:
            return None
    return placements


def composite(background: np.ndarray, placements: Sequence[Placement],
              cutouts: Mapping[tuple[str, str], Cutout]) -> np.ndarray:
    """Alpha-blend the placed cut-outs over `background` [S, S, 3] uint8; returns a new [S, S, 3] uint8.

    Args:
        cutouts: Cut-outs by (category, name).
    """
    pixels = background.astype(np.float64)
    for placement in placements:
        rgba = scaled_cutout(cutouts[placement.category, placement.cutout], placement).astype(np.float64)
        alpha = rgba[..., 3:] / 255.0  # [h, w, 1]
        window = pixels[placement.top:placement.top + placement.height, placement.left:placement.left + placement.width]
        window[...] = alpha * rgba[..., :3] + (1.0 - alpha) * window
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def counts(placements: Sequence[Placement]) -> Counter[str]:
    """Pasted cut-outs per category."""
    return Counter(p.category for p in placements)
