"""Reading tars into batches of images for the backbone, in DataLoader worker processes.

Each worker reads whole tars (one at a time; local ones by member offset, `tar_reader.py`, as
webdataset groups them), so every batch belongs to one tar and covers a contiguous run of its samples. A batch carries the per-sample metadata of that run (key,
split, labels, or why the sample is unusable) plus the usable images, either decoded and
preprocessed on the CPU, or as raw JPEG bytes for decoding on the GPU.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rankpipe.errors import InputError
from rankpipe.pipeline.data.tar_reader import FILE_OFFSETS, tar_samples
from rankpipe.pipeline.data.tars import is_remote
from rankpipe.pipeline.embed.gpu_decode import gpu_decodable_jpeg

logger = logging.getLogger(__name__)

# Image entries looked for in a sample, in order of preference.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_JPEG_EXTENSIONS = ("jpg", "jpeg")


@dataclasses.dataclass(frozen=True)
class TarTask:
    """One tar for a worker to read."""

    # Index of the tar in the store.
    index: int
    # A local path or a URL webdataset reads.
    url: str
    # Samples the store allocated for it.
    count: int


@dataclasses.dataclass(frozen=True)
class JpegSource:
    """Where a batch's JPEG files lie in a local tar: the range from `offset` holds them."""

    path: str
    offset: int
    # (inode, size, modification time in ns) of the tar when the batch's samples were read: the
    # bytes read later must come from that same file, or they would not be the ones its labels and
    # header checks were taken from.
    identity: tuple[int, int, int]

    def read(self, length: int) -> torch.Tensor:
        """[length] uint8: the range's bytes, read straight into the tensor.

        Raises:
            InputError: the tar changed, moved or shrank since its samples were read, or cannot be read.
        """
        data = torch.empty(length, dtype=torch.uint8)
        view = memoryview(data.numpy())
        try:
            with open(self.path, "rb", buffering=0) as file:
                if file_identity(os.fstat(file.fileno())) != self.identity:
                    raise self._changed("it is not the file its samples were read from")
                file.seek(self.offset)
                done = 0
                while done < length:
                    n = file.readinto(view[done:])
                    if not n:
                        raise self._changed(f"it ends before byte {self.offset + length}")
                    done += n
        except OSError as e:
            raise self._changed(e.strerror or str(e)) from e
        return data

    def _changed(self, why: str) -> InputError:
        return InputError(f"{self.path} changed while it was being embedded ({why}); put the original tar back "
                          "and rerun the same command, or rerun with --mode overwrite to embed the tars as they are")


def file_identity(stat: os.stat_result) -> tuple[int, int, int]:
    """(inode, size, modification time in ns): what tells one version of a file from another."""
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclasses.dataclass
class DecodedBatch:
    """A contiguous run of samples of one tar and the usable images among them."""

    # Index of the tar in the store.
    tar: int
    # Position (within the tar) of the first sample of the run.
    start: int
    # Per sample of the run: key, split value, source path ("" when its json names none), and why it
    # is unusable ("" when usable).
    keys: list[str]
    splits: list[str]
    sources: list[str]
    errors: list[str]
    # [n, n_labels] float32 raw labels, NaN where missing.
    labels: np.ndarray
    # [k, 3, H, W] float32 images decoded on the CPU, and their positions within the tar.
    images: torch.Tensor | None
    image_positions: np.ndarray
    # Raw JPEG files left for GPU decoding: one uint8 tensor holding them all (one shared-memory
    # transfer per batch instead of one per file), each file's [k, 2] (start, stop) in it, and their
    # positions.
    jpeg_bytes: torch.Tensor
    jpeg_spans: np.ndarray
    jpeg_positions: np.ndarray
    # True on a tar's final batch.
    last: bool = False
    # On the final batch: the error that ended the tar early ("" when it was read to its end).
    tar_error: str = ""
    # Where jpeg_bytes is still to be read from, jpeg_bytes empty until then (see
    # `_BatchBuilder._jpegs_in_tar`); None when jpeg_bytes holds the files.
    jpeg_source: JpegSource | None = None

    @property
    def num_images(self) -> int:
        return len(self.image_positions) + len(self.jpeg_positions)

    def load_jpegs(self) -> None:
        """Bring the JPEG files into jpeg_bytes, reading them from the tar where the batch names it."""
        if self.jpeg_source is None:
            return
        self.jpeg_bytes = self.jpeg_source.read(int(self.jpeg_spans[-1, 1]))
        self.jpeg_source = None

    def jpegs(self) -> list[torch.Tensor]:
        """The JPEG files as 1-D uint8 views into jpeg_bytes."""
        self.load_jpegs()
        return [self.jpeg_bytes[start:stop] for start, stop in self.jpeg_spans.tolist()]

    def pin_memory(self) -> DecodedBatch:
        # Called by the DataLoader's pinning thread when pin_memory=True: the JPEGs left in the tar
        # are read there too, off the threads that decode and encode.
        if self.images is not None:
            self.images = self.images.pin_memory()
        self.load_jpegs()
        return self


class TarBatches(torch.utils.data.IterableDataset):
    """Batches of decoded samples from a list of tars; each worker reads every num_workers-th tar."""

    def __init__(self, tasks: Sequence[TarTask], label_names: Sequence[str], batch_size: int,
                 preprocess: Callable[[Image.Image], torch.Tensor], jpeg_on_gpu: bool) -> None:
        """
        Args:
            tasks: the tars to read, in order.
            label_names: labels to read from each sample's json, in store order.
            batch_size: usable images per batch (the last batch of a tar may hold fewer).
            preprocess: PIL image -> [3, H, W] tensor (the backbone's `resize.ImagePreprocess`).
            jpeg_on_gpu: leave JPEGs undecoded for the GPU; other formats are still decoded here.
        """
        super().__init__()
        self.tasks = list(tasks)
        self.label_names = list(label_names)
        self.batch_size = batch_size
        self.preprocess = preprocess
        self.jpeg_on_gpu = jpeg_on_gpu

    def __iter__(self) -> Iterator[DecodedBatch]:
        info = torch.utils.data.get_worker_info()
        mine = self.tasks if info is None else self.tasks[info.id::info.num_workers]
        for task in mine:
            yield from self.read_tar(task)

    def read_tar(self, task: TarTask) -> Iterator[DecodedBatch]:
        """Batches of one tar; the last has last=True and names any read error that cut it short."""
        tar_errors: list[str] = []

        def record(exn: Exception) -> bool:
            # A damaged tar ends its stream; the samples read so far are kept.
            tar_errors.append(tar_error_text(exn))
            logger.warning("reading %s: %s", task.url, tar_errors[-1])
            return True

        identity = None  # the tar as its samples are read, where JPEGs may be left in it
        if torch.utils.data.get_worker_info() is not None and self.jpeg_on_gpu and not is_remote(task.url):
            try:
                identity = file_identity(os.stat(task.url))
            except OSError:
                pass  # the reader reports it
        samples = tar_samples(task.url, record)
        builder = _BatchBuilder(task, identity, 0, len(self.label_names))
        position = 0
        for position, sample in enumerate(samples):
            if position >= task.count:
                raise InputError(f"{task.url} holds more than the {task.count} samples its index.json "
                                 f"lists; fix or delete the index.json and embed again with --mode overwrite")
            self._add_sample(builder, position, sample)
            if builder.num_images >= self.batch_size:
                yield builder.build()
                builder = _BatchBuilder(task, identity, position + 1, len(self.label_names))
        batch = builder.build()
        batch.last = True
        batch.tar_error = tar_errors[-1] if tar_errors else ""
        yield batch

    def _add_sample(self, builder: _BatchBuilder, position: int, sample: dict[str, Any]) -> None:
        key = str(sample.get("__key__", ""))
        json_data = sample.get("json")  # bytes, or a memoryview from the offset reader
        meta = parse_json(None if json_data is None else bytes(json_data), self.label_names)
        error = meta.error
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if not error and ext is None:
            error = f"no image (expected one of {', '.join(IMAGE_EXTENSIONS)})"
        if error:
            builder.add_meta(key, meta, error)
            return
        data = sample[ext]
        if self.jpeg_on_gpu and ext in _JPEG_EXTENSIONS and gpu_decodable_jpeg(data):
            builder.add_meta(key, meta, "")
            builder.add_jpeg(position, data, sample.get(FILE_OFFSETS, {}).get(ext))
            return
        try:
            image = decode_image(data, self.preprocess)
        except Exception as e:  # PIL raises many types for damaged files; the reason is kept per row
            builder.add_meta(key, meta, unreadable_reason(e))
            return
        builder.add_meta(key, meta, "")
        builder.add_image(position, image)


# How every decoder turns an image file into 8-bit RGB pixels; recorded in the provenance (its
# preprocess.pixels), so stores and checkpoints of another rule are not mixed with this one.
PIXEL_RULE = "rgb8: EXIF orientation applied, alpha over white, high bit depth scaled to 8 bits"
# Transparent pixels are shown over this colour, as a viewer on a white page shows them.
ALPHA_BACKGROUND = (255, 255, 255)


def decode_image(data: bytes, preprocess: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Encoded image bytes -> [3, H, W] preprocessed tensor (fully decodes, so truncation raises)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return preprocess(to_rgb(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as people see it, as 8-bit RGB (`PIXEL_RULE`).

    PIL's own convert("RGB") ignores the EXIF orientation, keeps the colour hidden under transparent
    pixels, and clips 16-bit greyscale to white; each is undone here.
    """
    image = ImageOps.exif_transpose(image)  # [H, W] as displayed
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)  # [H, W] 0..65535
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        values = np.asarray(image, dtype=np.float64)  # [H, W], 0..1 by convention
        image = Image.fromarray(np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def unreadable_reason(error: Exception) -> str:
    """Why an image could not be decoded, the same in every run.

    PIL's "cannot identify image file" message names the address of its in-memory buffer, which
    would make the recorded reason (and so the store's bytes) differ from run to run.
    """
    if isinstance(error, UnidentifiedImageError):
        return "unreadable image: not an image format PIL can identify"
    return f"unreadable image: {type(error).__name__}: {error}"


def tar_error_text(error: Exception) -> str:
    """How a tar read error that webdataset hands to its handler is recorded: type and first argument."""
    return f"{type(error).__name__}: {error.args[0] if error.args else error}"


@dataclasses.dataclass(frozen=True)
class SampleMeta:
    """What a sample's json says, and whether the sample is usable."""

    # The split value ("" when none).
    split: str
    # [n_labels] raw labels, NaN where missing (float32 once a batch stacks them: a list is several
    # times cheaper to make per sample than a small array).
    labels: list[float]
    # The image's original path as `rankpipe shards` recorded it ("" when none).
    source: str
    # Why the sample is unusable, "" when it is usable.
    error: str


def parse_json(data: bytes | None, label_names: Sequence[str]) -> SampleMeta:
    """A sample's json -> its split, labels and source, and why it is unusable.

    With labels, a sample is unusable when its json is missing or unreadable, a label value is not a
    number, or it has none of the labels; a sample that lacks only some labels keeps NaN for those.
    An unlabelled collection needs no json at all: one that is missing, unreadable or of another
    layout (a crawl's captions, say) only leaves the split and source empty.
    """
    labels = [math.nan] * len(label_names)
    try:
        meta = json.loads(data) if data is not None else None
    except (ValueError, UnicodeDecodeError) as e:
        return SampleMeta("", labels, "", f"unreadable json: {e}" if label_names else "")
    meta = meta if isinstance(meta, dict) else {}
    source = meta.get("source") if isinstance(meta.get("source"), str) else ""
    split = meta.get("split", "")
    if not label_names:
        return SampleMeta(split if isinstance(split, str) else "", labels, source, "")
    if data is None:
        return SampleMeta("", labels, "", "missing json")
    if not isinstance(meta.get("labels"), dict):
        return SampleMeta("", labels, source, "json has no 'labels' object")
    if not isinstance(split, str):
        return SampleMeta("", labels, source, f"split is not a string: {split!r}")
    values = meta["labels"]
    found = False
    for i, name in enumerate(label_names):
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return SampleMeta(split, labels, source, f"label {name!r} is not a number: {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float, e.g. 10**400
            number = math.inf
        if math.isnan(number):
            return SampleMeta(split, labels, source, f"label {name!r} is not a number: {value!r}")
        if math.isinf(number):
            return SampleMeta(split, labels, source, f"label {name!r} is not finite: {str(value)[:24]}")
        labels[i] = number
        found = True
    if not found:
        return SampleMeta(split, labels, source, f"no value for any label ({', '.join(label_names)})")
    return SampleMeta(split, labels, source, "")


# A batch read from a local tar in a DataLoader worker leaves its JPEG files in the tar when the
# file range that holds them has no more other bytes (headers, json, images decoded on the CPU, all
# read with them) than the JPEGs' own plus this; otherwise the JPEGs are copied alone.
JPEG_RANGE_EXTRA_BYTES = 1 << 20


class _BatchBuilder:
    """Collects one batch's samples."""

    def __init__(self, task: TarTask, identity: tuple[int, int, int] | None, start: int, num_labels: int) -> None:
        """
        Args:
            task: the tar.
            identity: `file_identity` of the local tar as its samples are read in a DataLoader worker
                (where its JPEGs may be left in it); None: the JPEGs are copied.
            start: position of the batch's first sample in the tar.
            num_labels: labels per sample.
        """
        self.task, self.identity, self.start, self.num_labels = task, identity, start, num_labels
        self.keys: list[str] = []
        self.splits: list[str] = []
        self.sources: list[str] = []
        self.errors: list[str] = []
        self.labels: list[list[float]] = []
        self.images: list[torch.Tensor] = []
        self.image_positions: list[int] = []
        self.jpegs: list[bytes | memoryview] = []
        # Byte offset of each JPEG file in the tar (None where the tar was not read by offset).
        self.jpeg_file_offsets: list[int | None] = []
        self.jpeg_positions: list[int] = []

    @property
    def num_images(self) -> int:
        return len(self.images) + len(self.jpegs)

    def add_meta(self, key: str, meta: SampleMeta, error: str) -> None:
        self.keys.append(key)
        self.splits.append(meta.split)
        self.sources.append(meta.source)
        self.labels.append(meta.labels)
        self.errors.append(error)

    def add_image(self, position: int, image: torch.Tensor) -> None:
        self.images.append(image)
        self.image_positions.append(position)

    def add_jpeg(self, position: int, data: bytes | memoryview, file_offset: int | None) -> None:
        self.jpegs.append(data)
        self.jpeg_file_offsets.append(file_offset)
        self.jpeg_positions.append(position)

    def build(self) -> DecodedBatch:
        labels = np.array(self.labels, dtype=np.float32).reshape(len(self.labels), self.num_labels)
        jpeg_bytes, jpeg_spans, jpeg_source = self._jpegs_in_tar() or self._joined_jpegs()
        return DecodedBatch(
            tar=self.task.index, start=self.start, keys=self.keys, splits=self.splits, sources=self.sources,
            errors=self.errors, labels=labels,  # [n, n_labels]
            images=torch.stack(self.images) if self.images else None,  # [k, 3, H, W]
            image_positions=np.asarray(self.image_positions, dtype=np.int64),
            jpeg_bytes=jpeg_bytes, jpeg_spans=jpeg_spans, jpeg_source=jpeg_source,
            jpeg_positions=np.asarray(self.jpeg_positions, dtype=np.int64),
        )

    def _jpegs_in_tar(self) -> tuple[torch.Tensor, np.ndarray, JpegSource] | None:
        """No bytes, the JPEG files' spans within the tar range that holds them, and where that range
        starts; None where the files are to be copied instead.

        In a DataLoader worker a batch's bytes must go to the main process through shared memory, and
        fresh shared memory costs a page fault and a page of zeros per 4 KB: writing the JPEGs into
        it took longer than reading the tar. Files read by offset from a local tar are read again by
        the process that uses them, from the tar (in the page cache, since the worker just read it).
        """
        if not self.jpegs or self.identity is None or any(offset is None for offset in self.jpeg_file_offsets):
            return None
        first = self.jpeg_file_offsets[0]
        starts = np.asarray(self.jpeg_file_offsets, dtype=np.int64) - first  # [k], ascending: tar order
        spans = np.stack([starts, starts + [len(data) for data in self.jpegs]], axis=1)  # [k, 2]
        jpeg_bytes = int((spans[:, 1] - spans[:, 0]).sum())
        if spans[-1, 1] - jpeg_bytes > jpeg_bytes + JPEG_RANGE_EXTRA_BYTES:
            return None  # large other members between them
        return torch.empty(0, dtype=torch.uint8), spans, JpegSource(self.task.url, int(first), self.identity)

    def _joined_jpegs(self) -> tuple[torch.Tensor, np.ndarray, None]:
        """The JPEG files one after another in one uint8 tensor, each copied once, and their spans in it.

        In a DataLoader worker the tensor is made in shared memory to begin with: the DataLoader
        would otherwise copy it there once more to hand it to the main process.
        """
        lengths = np.asarray([len(data) for data in self.jpegs], dtype=np.int64)  # [k]
        ends = np.cumsum(lengths)  # [k]
        spans = np.stack([ends - lengths, ends], axis=1)  # [k, 2]
        joined = torch.empty(int(ends[-1]) if len(ends) else 0, dtype=torch.uint8)  # [total bytes]
        if not self.jpegs:
            return joined, spans, None
        if torch.utils.data.get_worker_info() is not None:
            joined.share_memory_()
        out = memoryview(joined.numpy())
        for data, (start, stop) in zip(self.jpegs, spans.tolist()):
            out[start:stop] = data
        return joined, spans, None
