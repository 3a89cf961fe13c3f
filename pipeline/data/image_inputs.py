"""New images to rank: a folder searched recursively, or WebDataset tars named by a brace pattern.

Unlike the tars `rankpipe embed` reads, these images need no labels and no json: a sample is its
image. Images are decoded and preprocessed in batches, optionally in DataLoader worker processes
(each worker reads every num_workers-th file or tar). An image that cannot be read is skipped and
recorded with its reason; nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import braceexpand
import torch
import webdataset as wds
from PIL import Image

from rankpipe.errors import InputError
from rankpipe.pipeline.data.tars import is_remote
from rankpipe.pipeline.embed.decode import (
    IMAGE_EXTENSIONS,
    decode_image,
    parse_json,
    tar_error_text,
    unreadable_reason,
)

logger = logging.getLogger(__name__)

# File suffixes (lower case) that count as images in a folder.
FOLDER_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)
SOURCE_KINDS = ("folder", "tars")


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Where the images to rank come from."""

    # "folder" (image files) or "tars" (WebDataset tars).
    kind: str
    # The folder or tar pattern as the user gave it.
    location: str
    # Image files (folder, sorted) or tar paths/URLs (tars, in pattern order).
    items: tuple[str, ...]
    # Folder only: the root that keys are relative to.
    root: str = ""

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {SOURCE_KINDS}, not {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class SkippedImage:
    """An image that could not be ranked."""

    # Relative path (folder) or WebDataset key (tars); "" when a whole tar failed.
    key: str
    # The file, or the tar the sample is in.
    path: str
    # Why it was skipped.
    reason: str


@dataclasses.dataclass
class ImageBatch:
    """Decoded images of one worker's run of inputs, and the ones it had to skip."""

    # Per decoded image: its key, where it was read from (file or tar), and its original path (the file,
    # or the source recorded in its tar sample's json; "" when none).
    keys: list[str]
    paths: list[str]
    sources: list[str]
    # [k, 3, H, W] float32 preprocessed images; None when none in the batch decoded.
    images: torch.Tensor | None
    # Images of this run that could not be decoded.
    skipped: list[SkippedImage]

    def pin_memory(self) -> ImageBatch:
        # Called by the DataLoader's pinning thread when pin_memory=True.
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def open_images(location: str) -> ImageSource:
    """Resolve `--images`: an existing folder, or a brace pattern of tars.

    Raises:
        InputError: a folder without images, a missing local tar, or something that is neither.
    """
    path = Path(location)
    if path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*") if p.suffix.lower() in FOLDER_SUFFIXES and p.is_file()
        )
        if not files:
            raise InputError(
                f"folder {location} holds no {'/'.join(FOLDER_SUFFIXES)} images (searched recursively); "
                "point --images at a folder of images or at tars"
            )
        return ImageSource("folder", location, tuple(files), root=str(path))
    urls = list(braceexpand.braceexpand(location))
    if not all(url.endswith(".tar") for url in urls):
        raise InputError(
            f"--images {location} is neither an existing folder nor a tar pattern; pass a folder of "
            "images or tars such as shards/x-{000000..000009}.tar"
        )
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url)]
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(urls)} tars of {location} do not exist (first: {missing[0]}); check the pattern"
        )
    return ImageSource("tars", location, tuple(urls))


class ImageBatches(torch.utils.data.IterableDataset):
    """Batches of preprocessed images from an ImageSource; each worker reads every num_workers-th item."""

    def __init__(self, source: ImageSource, preprocess: Callable[[Image.Image], torch.Tensor], batch_size: int) -> None:
        """
        Args:
            source: from `open_images`.
            preprocess: PIL image -> [3, H, W] tensor (the backbone's eval transform).
            batch_size: decoded images per batch (the last batch of a worker may hold fewer).
        """
        super().__init__()
        self.source = source
        self.preprocess = preprocess
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[ImageBatch]:
        info = torch.utils.data.get_worker_info()
        items = self.source.items if info is None else self.source.items[info.id::info.num_workers]
        batch = _Builder()
        for key, path, source, data, error in self._encoded(items):
            if not error:
                try:
                    batch.add(key, path, source, decode_image(data, self.preprocess))
                except Exception as e:  # PIL raises many types for damaged files; the reason is kept
                    error = unreadable_reason(e)
            if error:
                logger.warning("skipping %s (%s): %s", key or path, path, error)
                batch.skipped.append(SkippedImage(key, path, error))
            if len(batch.keys) >= self.batch_size:
                yield batch.build()
                batch = _Builder()
        if batch.keys or batch.skipped:
            yield batch.build()

    def _encoded(self, items: tuple[str, ...]) -> Iterator[tuple[str, str, str, bytes, str]]:
        """(key, path, source, encoded bytes, error or "") per image of `items`."""
        if self.source.kind == "folder":
            for file in items:
                key = Path(file).relative_to(self.source.root).as_posix()
                try:
                    yield key, file, file, Path(file).read_bytes(), ""
                except OSError as e:
                    yield key, file, file, b"", f"cannot read file: {e}"
            return
        for url in items:
            yield from _tar_images(url)


def _tar_images(url: str) -> Iterator[tuple[str, str, str, bytes, str]]:
    """(key, tar url, source, image bytes, error or "") per sample of one tar; a damaged tar ends early
    with an error."""
    tar_errors: list[str] = []

    def record(exn: Exception) -> bool:
        tar_errors.append(tar_error_text(exn))
        return True

    samples = wds.WebDataset(url, shardshuffle=False, handler=record, nodesplitter=None,
                             workersplitter=None, empty_check=False)
    for sample in samples:
        key = str(sample.get("__key__", ""))
        source = parse_json(sample.get("json"), []).source
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            yield key, url, source, b"", f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})"
        else:
            yield key, url, source, sample[ext], ""
    for error in tar_errors:
        yield "", url, "", b"", f"tar read error: {error}"


class _Builder:
    """Collects one batch."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.paths: list[str] = []
        self.sources: list[str] = []
        self.images: list[torch.Tensor] = []
        self.skipped: list[SkippedImage] = []

    def add(self, key: str, path: str, source: str, image: torch.Tensor) -> None:
        self.keys.append(key)
        self.paths.append(path)
        self.sources.append(source)
        self.images.append(image)

    def build(self) -> ImageBatch:
        images = torch.stack(self.images) if self.images else None  # [k, 3, H, W]
        return ImageBatch(self.keys, self.paths, self.sources, images, self.skipped)
