"""JPEG decoding and CLIP preprocessing on the GPU (nvjpeg through torchvision).

PIL decoding reaches about 120 images/s per core for 640x480 JPEGs, far below what a GPU backbone
consumes; decoding and resizing on the GPU keeps it fed. The steps are those of the CPU path
(`resize.ImagePreprocess`): the same `resize_geometry` (squash, or shortest side + centre crop),
then scale to [0, 1] and normalise, with antialiased interpolation, so features differ from the PIL
path only by resampling rounding.
"""

from __future__ import annotations

import io
import logging
import re
import struct

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from rankpipe.pipeline.embed.resize import ImagePreprocess, interpolation_mode, resize_geometry

logger = logging.getLogger(__name__)


class GpuPreprocess:
    """Raw JPEG bytes -> normalised [k, 3, H, W] float images on the GPU."""

    def __init__(self, preprocess: ImagePreprocess, device: torch.device) -> None:
        """
        Args:
            preprocess: the CPU path's preprocessing (image size, resize mode, normalisation), which
                this one reproduces.
            device: a CUDA device (any device for `preprocess_decoded`).
        """
        self.device = device
        self.image_size = preprocess.image_size
        self.resize = preprocess.resize
        self.interpolation = interpolation_mode(preprocess.interpolation)
        self.mean = torch.tensor(preprocess.mean, device=device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
        self.std = torch.tensor(preprocess.std, device=device).view(1, 3, 1, 1)  # [1, 3, 1, 1]

    def __call__(self, jpegs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[int], list[str]]:
        """Decode and preprocess.

        Returns:
            images [k, 3, H, W] float32 (None when k = 0), the indices into `jpegs` that decoded, and
            for those that did not, the error of each (in the order of the failed indices).
        """
        decoded, ok, failures = self._decode(jpegs)
        if not decoded:
            return None, ok, failures
        return self.preprocess_decoded(decoded), ok, failures

    def preprocess_decoded(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Decoded [3, h, w] uint8 images (on `device`) -> [k, 3, H, W] float32, normalised."""
        resized = torch.stack([self._resize(image) for image in images])  # [k, 3, H, W] uint8
        return resized.float().div_(255.0).sub_(self.mean).div_(self.std)  # [k, 3, H, W]

    def _decode(self, jpegs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int], list[str]]:
        if not jpegs:
            return [], [], []
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device), list(range(len(jpegs))), []
        except RuntimeError:
            # One damaged file fails the whole batched call; decode one by one to find it.
            pass
        decoded, ok, failures = [], [], []
        for i, data in enumerate(jpegs):
            try:
                decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                ok.append(i)
            except RuntimeError as e:
                failures.append(f"unreadable image: {e}")
        return decoded, ok, failures

    def _resize(self, image: torch.Tensor) -> torch.Tensor:
        """[3, h, w] uint8 -> [3, H, W] uint8, with the CPU path's geometry."""
        _, h, w = image.shape
        geometry = resize_geometry(h, w, self.image_size, self.resize)
        image = TF.resize(image, list(geometry.size), interpolation=self.interpolation, antialias=True)
        return TF.crop(image, geometry.top, geometry.left, *self.image_size)


# The EXIF tag that says how a photo is rotated or mirrored (1 = upright).
ORIENTATION_TAG = 0x0112
# Start-of-frame markers of the JPEGs nvjpeg decodes: baseline, extended and progressive Huffman.
_NVJPEG_FRAMES = frozenset((0xC0, 0xC1, 0xC2))
# The other start-of-frame markers (lossless, arithmetic coding, hierarchical): decoded on the CPU.
_OTHER_FRAMES = frozenset((0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
# Segments PIL only stores or skips when it opens a JPEG: Huffman and arithmetic tables, restart
# interval, DNL/DHP/EXP, comments, and the APPn segments it does not look into.
_SKIPPED_SEGMENTS = frozenset((0xC4, 0xC8, 0xCC, 0xDC, 0xDD, 0xDE, 0xDF, 0xFE) + tuple(range(0xE3, 0xED)) + (0xEF,))
# APPn segments PIL looks into (JFIF, Exif and XMP, ICC and multi-picture, Photoshop, Adobe) that
# `jpeg_header_verdict` passes over once it has checked them.
_LOOKED_INTO_SEGMENTS = frozenset((0xE0, 0xE1, 0xE2, 0xED, 0xEE))
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')


def gpu_decodable_jpeg(data: bytes | memoryview) -> bool:
    """Whether nvjpeg can decode a JPEG file to what the CPU path shows (`decode.PIXEL_RULE`).

    nvjpeg takes baseline and progressive 8-bit JPEGs in RGB or greyscale; CMYK, a rotated or
    mirrored photo (EXIF orientation other than 1), other frame types and anything that is no JPEG
    go through the CPU path (which records any error). Decided from the markers before the image
    data; a file whose header holds anything unusual is opened with PIL instead, as before.
    """
    verdict = jpeg_header_verdict(data)
    return _pil_gpu_decodable(data) if verdict is None else verdict


def jpeg_header_verdict(data: bytes | memoryview) -> bool | None:
    """`gpu_decodable_jpeg` from the JPEG markers alone; None where PIL is needed to say it as PIL would."""
    if data[:3] != b"\xff\xd8\xff":
        return False  # not a JPEG
    pos, end = 2, len(data)
    frame = exif = xmp = None
    while True:
        if pos + 4 > end or data[pos] != 0xFF:
            return None  # truncated, or padding PIL skips its own way
        marker = data[pos + 1]
        if marker == 0xDA:  # start of scan: the header is complete
            break
        length = data[pos + 2] << 8 | data[pos + 3]
        start, pos = pos + 4, pos + 2 + length
        if length < 2 or pos > end:
            return None
        if marker in _SKIPPED_SEGMENTS:
            continue
        segment = data[start:pos]
        if marker in _NVJPEG_FRAMES or marker in _OTHER_FRAMES:
            if frame is not None or len(segment) < 6 or (len(segment) - 6) % 3:
                return None
            frame = marker, segment[0], segment[1] << 8 | segment[2], segment[3] << 8 | segment[4], segment[5]
        elif marker == 0xDB:
            if not _whole_quantization_tables(segment):
                return None
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            if exif is not None:
                return None  # PIL joins several
            exif = segment
        elif marker == 0xE1 and segment[:len(_XMP_PREFIX)] == _XMP_PREFIX:
            if xmp is not None:
                return None
            xmp = bytes(segment[len(_XMP_PREFIX):])
        elif (marker in (0xE0, 0xEE) and len(segment) < 7) or (marker == 0xE2 and (
                segment[:4] == b"MPF\x00" or (segment[:12] == b"ICC_PROFILE\x00" and len(segment) < 14))) or (
                marker == 0xED and segment[:14] == b"Photoshop 3.0\x00"):
            return None  # short JFIF/Adobe/ICC segments, multi-picture files, Photoshop blocks
        elif marker not in _LOOKED_INTO_SEGMENTS:
            return None
    if frame is None:
        return None
    marker, precision, height, width, components = frame
    if precision != 8 or components not in (1, 3) or marker not in _NVJPEG_FRAMES:
        return False
    if width == 0 or height == 0 or width * height > 2 * Image.MAX_IMAGE_PIXELS:
        return None
    orientation = _exif_orientation(exif) if exif is not None else 0
    if orientation is None:
        return None
    if orientation == 0 and xmp is not None:
        match = _XMP_ORIENTATION.search(xmp)
        orientation = int(match[2]) if match else 0
    return orientation in (0, 1)


def _whole_quantization_tables(segment: bytes | memoryview) -> bool:
    """Whether a DQT segment holds whole tables (PIL rejects the file otherwise)."""
    pos = 0
    while pos < len(segment):
        pos += 1 + (64 if segment[pos] < 16 else 128)
    return pos == len(segment)


def _exif_orientation(segment: bytes | memoryview) -> int | None:
    """The orientation in an APP1 Exif segment's first IFD (0 when absent); None for anything that is
    not a plainly readable TIFF header and IFD."""
    tiff = segment[6:]
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(bytes(tiff[:4]))
    if order is None or len(tiff) < 8:
        return None
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd < 8 or ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd + 2 + 12 * count + 4 > len(tiff):
        return None
    for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind, values = struct.unpack_from(order + "HHI", tiff, entry)
        if tag == ORIENTATION_TAG:
            if kind != 3 or values != 1:  # not one SHORT
                return None
            return struct.unpack_from(order + "H", tiff, entry + 8)[0]
    return 0


def _pil_gpu_decodable(data: bytes | memoryview) -> bool:
    """`gpu_decodable_jpeg` by opening the file's header with PIL."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # A rotated or mirrored JPEG (EXIF orientation other than 1) is turned upright on the CPU.
            upright = image.getexif().get(ORIENTATION_TAG, 1) == 1
            return image.format == "JPEG" and image.mode in ("RGB", "L") and upright
    except Exception:
        return False
