"""Synthetic cut-outs: flat coloured shapes with a dark outline on a transparent ground.

They stand in for photographic cut-outs when tuxpaint-stamps-default is not installed, so the counting
task can still be built anywhere. They are drawn, not photographed, and the build record says so.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# Category -> plural noun used in its query. Each shape is drawn in every colour of SHAPE_COLORS.
SHAPE_CATEGORIES: dict[str, str] = {
    "triangles": "triangles", "squares": "squares", "circles": "circles", "crosses": "crosses", "stars": "stars",
}
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "yellow": (245, 200, 20), "blue": (30, 80, 220), "green": (40, 170, 60),
    "white": (245, 245, 245),
}
# Side of a drawn shape in pixels, and the supersampling factor that smooths its edges.
SHAPE_SIDE = 128
SHAPE_SUPERSAMPLE = 4
# Outline colour and width (in SHAPE_SIDE pixels).
OUTLINE = (20, 20, 20, 255)
OUTLINE_WIDTH = 4
# Inner radius of a star as a fraction of its outer radius; half-width of a cross's arms.
STAR_INNER = 0.45
CROSS_ARM = 0.15


def draw_shape(category: str, rgb: tuple[int, int, int]) -> np.ndarray:
    """One shape filled with `rgb`: RGBA [h, w, 4] uint8 trimmed to its opaque bounding box."""
    big = SHAPE_SIDE * SHAPE_SUPERSAMPLE
    width = OUTLINE_WIDTH * SHAPE_SUPERSAMPLE
    lo, hi, mid = width, big - width, big / 2
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    style = {"fill": (*rgb, 255), "outline": OUTLINE, "width": width}
    if category == "triangles":
        draw.polygon([(mid, lo), (hi, hi), (lo, hi)], **style)
    elif category == "squares":
        draw.rectangle([lo, lo, hi, hi], **style)
    elif category == "circles":
        draw.ellipse([lo, lo, hi, hi], **style)
    elif category == "crosses":
        a, b = big * (0.5 - CROSS_ARM), big * (0.5 + CROSS_ARM)
        draw.polygon([(a, lo), (b, lo), (b, a), (hi, a), (hi, b), (b, b), (b, hi), (a, hi), (a, b), (lo, b),
                      (lo, a), (a, a)], **style)
    elif category == "stars":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5  # 5 outer and 5 inner corners, alternating
        radii = np.where(np.arange(10) % 2 == 0, mid - lo, (mid - lo) * STAR_INNER)
        draw.polygon([(mid + r * np.cos(t), mid - r * np.sin(t)) for r, t in zip(radii, angles)], **style)
    else:
        raise ValueError(f"no drawing for shape category {category!r}; known: {', '.join(SHAPE_CATEGORIES)}")
    small = image.resize((SHAPE_SIDE, SHAPE_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(small.crop(small.getchannel("A").getbbox()))
