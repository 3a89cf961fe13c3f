"""Image distortions with a continuous, recorded strength: the quality task's ground truth.

Each distortion maps a normalised strength t ∈ [0, 1] to its own parameter (blur sigma, JPEG
quality, noise sigma, pixelation factor), rounded to what can actually be applied, so the recorded
parameter reproduces the stored image exactly. Its label is the parameter in natural units
("amount of X", larger = more distorted), and `severity` maps the applied parameter back to [0, 1]:
the overall quality label is −severity (docs/photo-tasks.md).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image
from scipy import ndimage


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Blur:
    """Gaussian blur of each channel (scipy.ndimage, reflected borders)."""

    # Label name and its query.
    name: str = "blur"
    query: str = "Sort images by the amount of blur."
    # Sigma in output pixels at strength 1 (strength 0 leaves the image as it is).
    max_sigma: float = 4.0

    def parameter(self, strength: float, size: int) -> float:
        return strength * self.max_sigma

    def apply(self, pixels: np.ndarray, parameter: float, seed: int) -> np.ndarray:
        if parameter == 0:
            return pixels.copy()
        blurred = ndimage.gaussian_filter(pixels.astype(np.float64), sigma=(parameter, parameter, 0), mode="reflect")
        return _to_uint8(blurred)

    def label(self, parameter: float) -> float:
        return parameter

    def severity(self, parameter: float) -> float:
        return parameter / self.max_sigma


@dataclasses.dataclass(frozen=True)
class JpegCompression:
    """A JPEG round trip (PIL, 4:2:0 chroma subsampling) at an integer quality."""

    name: str = "jpeg"
    query: str = "Sort images by the amount of JPEG compression."
    # JPEG quality at strength 0 and at strength 1.
    best_quality: int = 95
    worst_quality: int = 5

    def parameter(self, strength: float, size: int) -> float:
        return float(round(self.best_quality - strength * (self.best_quality - self.worst_quality)))

    def apply(self, pixels: np.ndarray, parameter: float, seed: int) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(parameter))
        with Image.open(buffer) as image:
            return np.asarray(image.convert("RGB"))

    def label(self, parameter: float) -> float:
        # Compression amount: 100 − quality, so a larger label means a more degraded image.
        return 100.0 - parameter

    def severity(self, parameter: float) -> float:
        return (self.best_quality - parameter) / (self.best_quality - self.worst_quality)


@dataclasses.dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise in 0..255 units, drawn from the recorded seed."""

    name: str = "noise"
    query: str = "Sort images by the amount of noise."
    # Noise standard deviation at strength 1.
    max_sigma: float = 40.0

    def parameter(self, strength: float, size: int) -> float:
        return strength * self.max_sigma

    def apply(self, pixels: np.ndarray, parameter: float, seed: int) -> np.ndarray:
        noise = np.random.default_rng(seed).normal(0.0, parameter, size=pixels.shape)  # [H, W, 3]
        return _to_uint8(pixels.astype(np.float64) + noise)

    def label(self, parameter: float) -> float:
        return parameter

    def severity(self, parameter: float) -> float:
        return parameter / self.max_sigma


@dataclasses.dataclass(frozen=True)
class Pixelation:
    """Box downscale to S/f pixels and nearest-neighbour upscale back to S."""

    name: str = "pixelation"
    query: str = "Sort images by the amount of pixelation."
    # Pixelation factor at strength 1 (1 = untouched).
    max_factor: float = 12.0

    def parameter(self, strength: float, size: int) -> float:
        # Only whole reduced sides exist: ceil keeps the realised factor S/n at or below the drawn one.
        drawn = 1.0 + strength * (self.max_factor - 1.0)
        return size / math.ceil(size / drawn)

    def apply(self, pixels: np.ndarray, parameter: float, seed: int) -> np.ndarray:
        height, width = pixels.shape[:2]
        small = (max(1, round(width / parameter)), max(1, round(height / parameter)))
        image = Image.fromarray(pixels).resize(small, Image.Resampling.BOX)
        return np.asarray(image.resize((width, height), Image.Resampling.NEAREST))

    def label(self, parameter: float) -> float:
        return parameter

    def severity(self, parameter: float) -> float:
        return (parameter - 1.0) / (self.max_factor - 1.0)


Distortion = Blur | JpegCompression | GaussianNoise | Pixelation

DISTORTIONS: dict[str, Distortion] = {d.name: d for d in (Blur(), JpegCompression(), GaussianNoise(), Pixelation())}

QUALITY_LABEL = "quality"
QUALITY_QUERY = "Sort images by the image quality."


def get_distortion(name: str) -> Distortion:
    """The registered distortion called `name`."""
    try:
        return DISTORTIONS[name]
    except KeyError:
        raise ValueError(f"unknown distortion {name!r}; known: {', '.join(DISTORTIONS)}") from None
