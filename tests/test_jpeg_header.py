"""The nvjpeg check from JPEG markers says what the PIL-opening check says, without opening the image."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rankpipe.pipeline.embed.gpu_decode import (
    ORIENTATION_TAG,
    _pil_gpu_decodable,
    gpu_decodable_jpeg,
    jpeg_header_verdict,
)


def jpeg(mode: str = "RGB", orientation: int | None = None, big_endian: bool = False, **save) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (24, 32, len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        exif[0x010F] = "camera maker"  # a second IFD entry, so the orientation is not the only one
        save["exif"] = exif.tobytes()
        if big_endian:
            exif.endian = ">"
            save["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85, **save)
    return buffer.getvalue()


def with_exif_twice(data: bytes) -> bytes:
    """The file with its APP1 Exif segment repeated (PIL joins the two)."""
    start = data.index(b"\xff\xe1")
    end = start + 2 + int.from_bytes(data[start + 2:start + 4], "big")
    return data[:end] + data[start:end] + data[end:]


def other_format(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


XMP = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><rdf:Description tiff:Orientation="%d"/>'
       b"</rdf:RDF></x:xmpmeta>")

# name -> (file, what nvjpeg should get)
FILES = {
    "baseline": (jpeg(), True),
    "baseline 4:4:4": (jpeg(subsampling=0), True),
    "optimized": (jpeg(optimize=True), True),
    "progressive": (jpeg(progressive=True), True),
    "greyscale": (jpeg("L"), True),
    "progressive greyscale": (jpeg("L", progressive=True), True),
    "cmyk": (jpeg("CMYK"), False),
    "exif upright": (jpeg(orientation=1), True),
    "exif rotated": (jpeg(orientation=6), False),
    "exif mirrored": (jpeg(orientation=2), False),
    "exif rotated, big-endian": (jpeg(orientation=3, big_endian=True), False),
    "exif upright, big-endian": (jpeg(orientation=1, big_endian=True), True),
    "exif without orientation": (jpeg(exif=Image.Exif().tobytes()), True),
    "exif twice, rotated": (with_exif_twice(jpeg(orientation=6)), False),
    "icc profile": (jpeg(icc_profile=b"\x00" * 300), True),
    "comment": (jpeg(comment=b"a comment"), True),
    "xmp rotated": (jpeg(xmp=XMP % 8), False),
    "xmp upright": (jpeg(xmp=XMP % 1), True),
    "png": (other_format("PNG"), False),
    "gif": (other_format("GIF"), False),
    "webp": (other_format("WEBP"), False),
    "text": (b"plain text, no image", False),
    "empty": (b"", False),
    "jpeg magic then text": (b"\xff\xd8\xff\xe0 this is not a jpeg", False),
    "cut in the header": (jpeg()[:100], False),
    "cut after the header": (jpeg()[:700], True),
}


@pytest.mark.parametrize("name", list(FILES))
def test_the_marker_check_agrees_with_opening_the_file_in_pil(name):
    data, expected = FILES[name]
    assert _pil_gpu_decodable(data) == expected  # the reference itself, on this file
    assert gpu_decodable_jpeg(data) == expected
    assert gpu_decodable_jpeg(memoryview(data)) == expected


# Left to PIL: files whose headers PIL reads its own way.
LEFT_TO_PIL = ("cut in the header", "jpeg magic then text", "exif twice, rotated")


def test_unusual_headers_are_left_to_pil():
    assert all(jpeg_header_verdict(FILES[name][0]) is None for name in LEFT_TO_PIL)


@pytest.mark.parametrize("name", [n for n in FILES if n not in LEFT_TO_PIL])
def test_common_files_are_decided_without_pil(name):
    data, expected = FILES[name]
    assert jpeg_header_verdict(data) == expected


def test_lossless_and_arithmetic_frames_go_to_the_cpu():
    # nvjpeg decodes Huffman-coded sequential and progressive frames only (SOF0/1/2); PIL opens the others.
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    for marker in (0xC3, 0xC9):
        data[sof + 1] = marker
        assert jpeg_header_verdict(bytes(data)) is False
    data[sof + 1] = 0xC1  # extended sequential Huffman: nvjpeg takes it
    assert jpeg_header_verdict(bytes(data)) is True


def test_twelve_bit_and_two_component_frames_are_refused_as_pil_refuses_them():
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = 12  # precision
    assert jpeg_header_verdict(bytes(data)) is False and _pil_gpu_decodable(bytes(data)) is False
