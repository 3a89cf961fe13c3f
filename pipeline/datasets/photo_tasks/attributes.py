"""The paper's Table 4 attributes, measured exactly on an image's stored pixels, and the jitter that spreads them.

- brightness: mean ITU-R BT.601 luma, 0..255;
- contrast: RMS contrast, the standard deviation of BT.601 luma scaled to 0..1 (Peli 1990);
- colorfulness: Hasler & Süsstrunk (2003).

Brightness and colourfulness reuse the demo dataset's definitions so the two datasets agree.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rankpipe.pipeline.datasets.demo_data import colorfulness, luma_mean

# BT.601 luma weights of R, G, B.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One measured attribute: its label name and query (`measure_attributes` measures it)."""

    # Label name.
    name: str
    # The ranking sentence (the paper's wording for AVA attributes).
    query: str


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("colorfulness", "Sort images by the image quality of colorfulness."),
    Attribute("contrast", "Sort images by the image quality of contrast."),
    Attribute("brightness", "Sort images by the image quality of brightness."),
)


def rms_contrast(rgb: np.ndarray) -> float:
    """RMS contrast of an RGB image [H, W, 3] with values 0..255: std of BT.601 luma / 255."""
    luma = rgb.astype(np.float64) @ LUMA_WEIGHTS  # [H, W]
    return float(np.std(luma / 255.0))


def measure_attributes(rgb: np.ndarray) -> dict[str, float]:
    """All attribute labels of an RGB image [H, W, 3] uint8."""
    return {"colorfulness": colorfulness(rgb), "contrast": rms_contrast(rgb), "brightness": luma_mean(rgb)}


@dataclasses.dataclass(frozen=True)
class Jitter:
    """A photometric change applied to a crop, recorded so the image can be made again."""

    # Saturation gain: pixels move from their luma by this factor (0 = grey, 1 = unchanged).
    saturation: float
    # Contrast gain about the image's mean luma (1 = unchanged).
    contrast: float
    # Brightness gain: all values are multiplied by it (1 = unchanged).
    brightness: float

    def apply(self, rgb: np.ndarray) -> np.ndarray:
        """The jittered image [H, W, 3] uint8: saturation, then contrast, then brightness."""
        pixels = rgb.astype(np.float64)
        luma = (pixels @ LUMA_WEIGHTS)[..., None]  # [H, W, 1]
        pixels = luma + self.saturation * (pixels - luma)
        mean = float(np.mean(pixels @ LUMA_WEIGHTS))
        pixels = mean + self.contrast * (pixels - mean)
        return np.clip(np.rint(pixels * self.brightness), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class JitterRange:
    """Uniform ranges the attribute images' jitter is drawn from."""

    # (min, max) of each gain.
    saturation: tuple[float, float] = (0.0, 1.6)
    contrast: tuple[float, float] = (0.4, 1.5)
    brightness: tuple[float, float] = (0.5, 1.4)

    def draw(self, rng: np.random.Generator) -> Jitter:
        return Jitter(float(rng.uniform(*self.saturation)), float(rng.uniform(*self.contrast)),
                      float(rng.uniform(*self.brightness)))
