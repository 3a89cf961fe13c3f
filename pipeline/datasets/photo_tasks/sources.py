"""Where the photo tasks get their pixels: base photographs and transparent cut-outs.

Base photos come from Debian wallpaper packages when they are installed (lomiri-wallpapers,
mate-backgrounds, plasma-workspace-wallpapers), else from scikit-image's bundled sample photos.
Which files are used, and which may be counting backgrounds, is listed in `catalog`.

Cut-outs come from tuxpaint-stamps-default (photographs with an alpha channel, sorted into category
folders). Without it, simple coloured shapes are drawn with transparency instead (`shapes`); those
are synthetic and the build's record says so.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from rankpipe.pipeline.datasets.demo_data import load_photo
from rankpipe.pipeline.datasets.photo_tasks.catalog import (
    DEBIAN_PHOTOS,
    SCIKIT_PHOTOS,
    TUXPAINT_CATEGORIES,
    TUXPAINT_STAMPS,
)
from rankpipe.pipeline.datasets.photo_tasks.shapes import (
    SHAPE_CATEGORIES,
    SHAPE_COLORS,
    draw_shape,
)

logger = logging.getLogger(__name__)

SCIKIT_IMAGE = "scikit-image"
SYNTHETIC_SHAPES = "synthetic-shapes"
TUXPAINT = "tuxpaint-stamps-default"


@dataclasses.dataclass(frozen=True)
class SourcesConfig:
    """Where to look for installed photos and cut-outs, and how large to keep them in memory."""

    # "auto": Debian packages when installed, scikit-image otherwise; "builtin": scikit-image and
    # synthetic shapes only (the same dataset on every machine).
    mode: str = "auto"
    # Root of the installed file system; tests point it at an empty folder to force the fallback.
    root: Path = Path("/")
    # Photos are downscaled on load so their shorter side is at most this many pixels (crops are
    # resized to the output size anyway; this keeps decoding large wallpapers cheap).
    max_photo_side: int = 768
    # Cut-outs are downscaled so their longer side is at most this many pixels.
    max_cutout_side: int = 256
    # A tuxpaint category is used only when its folders hold at least this many cut-outs.
    min_cutouts: int = 6
    # Debian photos are used only when at least this many are installed (enough for three splits of
    # counting and non-counting photos); fewer fall back to scikit-image.
    min_photos: int = 8

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "builtin"):
            raise ValueError(f"sources mode must be 'auto' or 'builtin', not {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class BasePhoto:
    """One base photograph; every image made from it lands in the photo's split."""

    # Stable id, "<source>/<file stem>", used in recipes and sample sources.
    name: str
    # The package (or "scikit-image") it came from.
    source: str
    # Whether it may be a counting background (shows no countable objects of its own).
    counting: bool
    # Returns the pixels as RGB [H, W, 3] uint8.
    loader: Callable[[], np.ndarray] = dataclasses.field(compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Cutout:
    """A transparent cut-out of one object."""

    # Category name, e.g. "birds".
    category: str
    # Stable id within its category (file stem or shape variant).
    name: str
    # RGBA [h, w, 4] uint8, trimmed to the opaque bounding box.
    rgba: np.ndarray = dataclasses.field(compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class PhotoSources:
    """What a build draws from, and where it came from."""

    # Base photos in a stable order.
    photos: tuple[BasePhoto, ...]
    # Cut-outs by category (category names sorted).
    cutouts: dict[str, tuple[Cutout, ...]]
    # Plural noun of each category, for its query.
    nouns: dict[str, str]
    # Provenance: {package or source name: version or None} for photos and cut-outs.
    photo_sources: dict[str, str | None]
    cutout_sources: dict[str, str | None]


def find_sources(config: SourcesConfig = SourcesConfig()) -> PhotoSources:
    """Find base photos and cut-outs: Debian packages when installed (and mode is "auto"), else built-ins."""
    photos = _debian_photos(config) if config.mode == "auto" else []
    if len(photos) < config.min_photos:
        if photos:
            logger.warning("only %d Debian photos installed (< %d): using scikit-image's photos instead",
                           len(photos), config.min_photos)
        photos = []
    if photos:
        photo_sources = {source: package_version(source) for source in sorted({p.source for p in photos})}
    else:
        photos = _scikit_photos(config)
        photo_sources = {SCIKIT_IMAGE: _scikit_version()}
    cutouts, nouns = _tuxpaint_cutouts(config) if config.mode == "auto" else ({}, {})
    if cutouts:
        cutout_sources = {TUXPAINT: package_version(TUXPAINT)}
    else:
        cutouts, nouns = synthetic_cutouts(), dict(SHAPE_CATEGORIES)
        cutout_sources = {SYNTHETIC_SHAPES: None}
    logger.info("photo sources: %s; cut-out sources: %s", photo_sources, cutout_sources)
    return PhotoSources(tuple(photos), cutouts, nouns, photo_sources, cutout_sources)


def package_version(package: str) -> str | None:
    """The installed version of a Debian package, or None when dpkg does not know it."""
    try:
        done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                              check=False)
    except OSError:
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _scikit_version() -> str:
    import skimage

    return skimage.__version__


def _debian_photos(config: SourcesConfig) -> list[BasePhoto]:
    photos = []
    for package, entries in DEBIAN_PHOTOS.items():
        for relative, counting in entries.items():
            path = config.root / relative
            if path.is_dir():
                path = _plasma_image(path, config.max_photo_side)
            if path is None or not path.is_file():
                continue
            stem = Path(relative).stem if Path(relative).suffix else Path(relative).name
            loader = functools.partial(_load_file, path, config.max_photo_side)
            photos.append(BasePhoto(f"{package}/{stem}", package, counting, loader))
    return photos


def _plasma_image(folder: Path, max_side: int) -> Path | None:
    """The smallest "<W>x<H>" picture of a plasma wallpaper whose shorter side reaches max_side (else the largest)."""
    images = folder / "contents" / "images"
    if not images.is_dir():
        return None
    sized = []
    for path in images.iterdir():
        match = re.fullmatch(r"(\d+)x(\d+)\.(jpg|jpeg|png)", path.name.lower())
        if match:
            sized.append((int(match[1]), int(match[2]), path))
    if not sized:
        return None
    sized.sort(key=lambda item: (item[0] * item[1], item[2].name))
    large_enough = [item for item in sized if min(item[0], item[1]) >= max_side]
    return (large_enough[0] if large_enough else sized[-1])[2]


def _load_file(path: Path, max_side: int) -> np.ndarray:
    with Image.open(path) as image:
        image.draft("RGB", (max_side, max_side))  # JPEG decodes at a reduced scale directly
        rgb = image.convert("RGB")
        return np.asarray(_shrink(rgb, max_side, shorter=True))


def _shrink(image: Image.Image, max_side: int, shorter: bool) -> Image.Image:
    """Downscale so the shorter (or longer) side is at most max_side; smaller images stay as they are."""
    side = min(image.size) if shorter else max(image.size)
    if side <= max_side:
        return image
    scale = max_side / side
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _scikit_photos(config: SourcesConfig) -> list[BasePhoto]:
    def loader(name: str) -> np.ndarray:
        return np.asarray(_shrink(Image.fromarray(load_photo(name)), config.max_photo_side, shorter=True))

    return [BasePhoto(f"{SCIKIT_IMAGE}/{name}", SCIKIT_IMAGE, counting, functools.partial(loader, name))
            for name, counting in SCIKIT_PHOTOS.items()]


def _tuxpaint_cutouts(config: SourcesConfig) -> tuple[dict[str, tuple[Cutout, ...]], dict[str, str]]:
    stamps = config.root / TUXPAINT_STAMPS
    cutouts, nouns = {}, {}
    for category, spec in sorted(TUXPAINT_CATEGORIES.items()):
        paths = sorted(p for folder in spec.folders if (stamps / folder).is_dir()
                       for p in (stamps / folder).glob("*.png"))
        items = [c for c in (_load_cutout(category, p, config.max_cutout_side) for p in paths) if c is not None]
        if len(items) >= config.min_cutouts:
            cutouts[category] = tuple(items)
            nouns[category] = spec.noun
        elif items:
            logger.info("cut-out category %s has %d cut-outs (< %d): not used", category, len(items),
                        config.min_cutouts)
    return cutouts, nouns


def _load_cutout(category: str, path: Path, max_side: int) -> Cutout | None:
    """A stamp as a trimmed RGBA cut-out; None (logged) when it has no transparency to cut along."""
    with Image.open(path) as image:
        if image.mode not in ("RGBA", "LA") and "transparency" not in image.info:
            logger.info("skipping cut-out %s: no alpha channel", path)
            return None
        rgba = image.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        logger.info("skipping cut-out %s: fully transparent", path)
        return None
    rgba = _shrink(rgba.crop(box), max_side, shorter=False)
    return Cutout(category, path.stem, _frozen(np.asarray(rgba)))


def synthetic_cutouts() -> dict[str, tuple[Cutout, ...]]:
    """Drawn shapes with transparency, one cut-out per (shape, colour): used when tuxpaint is absent."""
    return {
        category: tuple(Cutout(category, f"{category}_{color}", _frozen(draw_shape(category, rgb)))
                        for color, rgb in SHAPE_COLORS.items())
        for category in sorted(SHAPE_CATEGORIES)
    }


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(array)
    array.setflags(write=False)
    return array
