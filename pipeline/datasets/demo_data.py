"""The built-in demo dataset: real photographs with labels that are exact by construction.

Each image is a random square crop of one of scikit-image's bundled sample photos, resized, scaled in
brightness, with k ∈ 0..6 small red discs pasted where they stand out. Its three labels are
computed on the pixels a reader will see, i.e. the decoded JPEG:

- `red_discs`: k, the number of discs pasted;
- `brightness`: mean ITU-R BT.601 luma, 0..255;
- `colorfulness`: the Hasler & Süsstrunk (2003) colourfulness metric.

Every base photo goes entirely to one split, so no photo is seen in training and testing.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import skimage.data
from PIL import Image

from rankpipe.pipeline.data.manifest import SPLIT_ROLES, manifest_from_dict
from rankpipe.pipeline.data.shard_writer import write_shards
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.embed.decode import to_rgb
from rankpipe.settings import parse_yaml

logger = logging.getLogger(__name__)


def _stereo_left() -> np.ndarray:
    left, _right, _disparity = skimage.data.stereo_motorcycle()
    return left


# Photos that ship inside the scikit-image wheel (no download). Grayscale ones are used as RGB.
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "coffee": skimage.data.coffee,
    "chelsea": skimage.data.chelsea,
    "rocket": skimage.data.rocket,
    "hubble_deep_field": skimage.data.hubble_deep_field,
    "immunohistochemistry": skimage.data.immunohistochemistry,
    "retina": skimage.data.retina,
    "motorcycle": _stereo_left,
    "camera": skimage.data.camera,
    "coins": skimage.data.coins,
    "moon": skimage.data.moon,
    "brick": skimage.data.brick,
    "grass": skimage.data.grass,
    "gravel": skimage.data.gravel,
}


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """How demo images are made. Sizes are fractions of the output side so any image_size works."""

    # Base photos (keys of PHOTOS); each ends up wholly in one split.
    photos: tuple[str, ...] = tuple(PHOTOS)
    # Fractions of the photos that go to train, val and test (each split gets at least one).
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # Crop side as a fraction of the photo's shorter side: (min, max).
    crop_fraction: tuple[float, float] = (0.35, 0.9)
    # Brightness jitter: pixel values are multiplied by a factor drawn from (min, max).
    brightness_factor: tuple[float, float] = (0.5, 1.5)
    # Discs per image are drawn uniformly from 0..max_discs.
    max_discs: int = 6
    # Disc radius as a fraction of the image side: (min, max).
    disc_radius: tuple[float, float] = (0.045, 0.075)
    # Pixels kept free between two discs, so they stay separate blobs after JPEG.
    disc_gap: float = 3.0
    # Disc colour, RGB.
    disc_color: tuple[int, int, int] = (220, 20, 20)
    # A covered pixel "looks like the disc" when its RGB distance to disc_color is below this.
    disc_contrast: float = 90.0
    # A disc may cover at most this fraction of disc-like pixels, so every disc stays visible.
    max_similar_fraction: float = 0.05
    # Positions tried per disc, and crops tried per image, before giving up.
    placement_tries: int = 200
    crop_tries: int = 20
    # JPEG quality of the stored images.
    jpeg_quality: int = 95
    # Samples per tar.
    samples_per_tar: int = 100

    def __post_init__(self) -> None:
        unknown = [p for p in self.photos if p not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown demo photos {unknown}; choose from {', '.join(PHOTOS)}")
        if len(self.photos) < len(SPLIT_ROLES):
            raise ValueError(f"need at least {len(SPLIT_ROLES)} photos, one per split, got {len(self.photos)}")


@dataclasses.dataclass(frozen=True)
class DemoImage:
    """One generated image and how it was made (enough to re-render it without discs)."""

    # Base photo name (key of PHOTOS).
    photo: str
    # Split role of the base photo.
    split: str
    # Square crop in photo pixels: (top, left, side).
    crop: tuple[int, int, int]
    # Brightness factor applied to the resized crop.
    factor: float
    # Pasted discs: (centre row, centre column, radius) in output pixels.
    discs: tuple[tuple[float, float, float], ...]
    # The image as stored: JPEG bytes.
    jpeg: bytes


def luma_mean(rgb: np.ndarray) -> float:
    """Mean ITU-R BT.601 luma of an RGB image [H, W, 3] with values 0..255."""
    rgb = rgb.astype(np.float64)
    return float(np.mean(0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]))


def colorfulness(rgb: np.ndarray) -> float:
    """Hasler & Süsstrunk (2003) colourfulness of an RGB image [H, W, 3] with values 0..255.

    With rg = R - G and yb = (R + G)/2 - B: sqrt(σ_rg² + σ_yb²) + 0.3·sqrt(μ_rg² + μ_yb²).
    """
    rgb = rgb.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an RGB array [H, W, 3] uint8, as a reader of the tars would."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(to_rgb(image))


@functools.cache
def load_photo(name: str) -> np.ndarray:
    """A bundled sample photo as RGB [H, W, 3] uint8, read-only; cached, so each photo is decoded once."""
    pixels = PHOTOS[name]()
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)  # [H, W] -> [H, W, 3]
    pixels = np.ascontiguousarray(pixels[..., :3].astype(np.uint8))
    pixels.setflags(write=False)
    return pixels


def render_background(photo: np.ndarray, crop: tuple[int, int, int], factor: float, size: int) -> np.ndarray:
    """Crop, resize to [size, size, 3] and scale brightness; the image before any disc is pasted."""
    top, left, side = crop
    patch = Image.fromarray(photo[top:top + side, left:left + side]).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.rint(np.asarray(patch, dtype=np.float64) * factor), 0, 255).astype(np.uint8)


def disc_mask(size: int, disc: tuple[float, float, float]) -> np.ndarray:
    """Boolean [size, size] mask of the pixels whose centres lie inside the disc."""
    cy, cx, r = disc
    rows, cols = np.ogrid[:size, :size]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= r**2


def paint_discs(background: np.ndarray, discs: Sequence[tuple[float, float, float]],
                color: tuple[int, int, int]) -> np.ndarray:
    """A copy of `background` [S, S, 3] with the discs filled in `color`."""
    pixels = background.copy()
    for disc in discs:
        pixels[disc_mask(pixels.shape[0], disc)] = color
    return pixels


def generate_demo_images(
    n_images: int = 240, image_size: int = 96, seed: int = 0, config: DemoConfig = DemoConfig()
) -> list[DemoImage]:
    """Make the demo images; the same arguments always give the same images.

    Photos are dealt to splits by a seeded shuffle, then images cycle through the photos so every
    photo gets about the same number of images.
    """
    rng = np.random.default_rng(seed)
    order = [config.photos[i] for i in rng.permutation(len(config.photos))]
    split_of = deal_splits(order, config.split_fractions)
    photos = {name: load_photo(name) for name in order}
    images = []
    for index in range(n_images):
        name = order[index % len(order)]
        image_rng = np.random.default_rng([seed, index])
        images.append(_make_image(name, split_of[name], photos[name], image_size, image_rng, config))
    return images


def build_demo_dataset(out_dir: Path, n_images: int = 240, image_size: int = 96, seed: int = 0,
                       config: DemoConfig = DemoConfig()) -> Path:
    """Write the demo dataset's tars and manifest to `out_dir`.

    Returns:
        The path of the written manifest.yaml.
    """
    template_file = importlib.resources.files("rankpipe") / "manifests" / "demo.yaml"
    template = manifest_from_dict(parse_yaml(template_file.read_text(), "the demo manifest"))
    records = []
    for index, image in enumerate(generate_demo_images(n_images, image_size, seed, config)):
        pixels = decode_rgb(image.jpeg)
        labels = {
            "red_discs": float(len(image.discs)),
            "brightness": luma_mean(pixels),
            "colorfulness": colorfulness(pixels),
        }
        missing = [label.name for label in template.labels if label.name not in labels]
        if missing:
            raise ValueError(f"demo.yaml names labels {missing} that the demo builder does not compute")
        records.append(SampleRecord(
            row=index + 1, source=f"{image.photo}/{index:05d}.jpg", path=None, labels=labels,
            split=image.split, data=image.jpeg, extension="jpg",
        ))
    result = write_shards(records, out_dir, template.name, template.labels,
                          samples_per_tar=config.samples_per_tar, splits=template.splits)
    logger.info("demo dataset: %s", result.summary())
    return result.manifest_path


def deal_splits(order: Sequence[str], fractions: tuple[float, float, float]) -> dict[str, str]:
    """Deal photos to splits in order: val and test get round(fraction·n) photos (at least one), train the rest."""
    n = len(order)
    n_val = max(1, round(fractions[1] * n))
    n_test = max(1, round(fractions[2] * n))
    roles = ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test
    return dict(zip(order, roles))


def _make_image(name: str, split: str, photo: np.ndarray, size: int, rng: np.random.Generator,
                config: DemoConfig) -> DemoImage:
    height, width = photo.shape[:2]
    k = int(rng.integers(0, config.max_discs + 1))
    for _ in range(config.crop_tries):
        side = int(min(height, width) * rng.uniform(*config.crop_fraction))
        crop = (int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1)), side)
        factor = float(rng.uniform(*config.brightness_factor))
        background = render_background(photo, crop, factor, size)
        discs = _place_discs(background, k, rng, config)
        if discs is not None:
            pixels = paint_discs(background, discs, config.disc_color)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=config.jpeg_quality)
            return DemoImage(name, split, crop, factor, discs, buffer.getvalue())
    raise RuntimeError(f"could not place {k} visible discs on {config.crop_tries} crops of photo {name!r}")


def _place_discs(background: np.ndarray, k: int, rng: np.random.Generator,
                 config: DemoConfig) -> tuple[tuple[float, float, float], ...] | None:
    """k non-overlapping discs, each on pixels unlike the disc colour; None if they do not fit."""
    size = background.shape[0]
    # Per-pixel distance to the disc colour [S, S]: where a disc would be hard to see.
    distance = np.linalg.norm(background.astype(np.float64) - np.array(config.disc_color), axis=-1)
    similar = distance < config.disc_contrast
    discs: list[tuple[float, float, float]] = []
    for _ in range(k):
        for _ in range(config.placement_tries):
            r = float(rng.uniform(*config.disc_radius) * size)
            cy, cx = (float(v) for v in rng.uniform(r, size - r, size=2))
            apart = all(np.hypot(cy - y, cx - x) >= r + s + config.disc_gap for y, x, s in discs)
            if apart and similar[disc_mask(size, (cy, cx, r))].mean() <= config.max_similar_fraction:
                discs.append((cy, cx, r))
                break
        else:
            return None
    return tuple(discs)
