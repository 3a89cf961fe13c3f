"""Contact sheets: thumbnails read back from WebDataset tars by key, laid out in a grid with captions.

The token store keeps no pixels, so a report finds its images again in the tars the store was made
from. Tars are streamed once each, in order, and reading stops as soon as every wanted key is found.
A key that cannot be found or decoded gets a grey placeholder that says so, and a logged warning.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tarfile
from collections.abc import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps
from webdataset import gopen
from webdataset.tariterators import base_plus_ext

from rankpipe.pipeline.embed.decode import to_rgb

log = logging.getLogger(__name__)

# Tar member extensions (lower case) that hold the sample's image.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")


@dataclasses.dataclass(frozen=True)
class SheetConfig:
    """Layout of one contact sheet."""

    # Side of the square cell each thumbnail is fitted into, in pixels.
    thumb_px: int = 160
    # Thumbnails per row.
    columns: int = 5
    # Font size of the captions, in pixels.
    font_px: int = 13
    # Lines of caption text under each thumbnail.
    caption_lines: int = 2
    # Space between and around cells, in pixels.
    padding: int = 8

    def __post_init__(self) -> None:
        for name in ("thumb_px", "columns", "font_px", "caption_lines"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.padding < 0:
            raise ValueError(f"padding must be >= 0, not {self.padding}")


def read_thumbnails(tar_urls: Iterable[str], keys: Iterable[str], max_px: int) -> dict[str, Image.Image]:
    """Find the images of `keys` in WebDataset tars and scale each to fit max_px × max_px.

    Args:
        tar_urls: tar paths or WebDataset URLs (anything `webdataset.gopen` opens), searched in order.
        keys: WebDataset keys (the member path up to the first dot of the file name).
        max_px: the longer side of a thumbnail.

    Returns:
        key -> RGB thumbnail for every key found; missing keys are logged, not raised.
    """
    wanted = set(keys)
    found: dict[str, Image.Image] = {}
    for url in tar_urls:
        if len(found) == len(wanted):
            break
        try:
            _scan_tar(url, wanted, found, max_px)
        except (OSError, tarfile.TarError) as e:
            log.warning("cannot read thumbnails from %s: %s", url, e)
    missing = sorted(wanted - set(found))
    if missing:
        log.warning("%d image(s) not found in the store's tars, e.g. %s", len(missing), missing[:3])
    return found


def _scan_tar(url: str, wanted: set[str], found: dict[str, Image.Image], max_px: int) -> None:
    stream = gopen(url, "rb")
    try:
        # Streaming mode ("r|*") reads the tar front to back, so remote and piped URLs work too.
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = base_plus_ext(member.name)
                if parts is None:
                    continue
                key, ext = parts
                if key not in wanted or key in found or ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                data = tar.extractfile(member).read()
                try:
                    found[key] = thumbnail(Image.open(io.BytesIO(data)), max_px)
                except OSError as e:
                    log.warning("cannot decode %s in %s: %s", member.name, url, e)
                if len(found) == len(wanted):
                    return
    finally:
        stream.close()


def thumbnail(image: Image.Image, max_px: int) -> Image.Image:
    """`image` as RGB, scaled up or down to fit max_px × max_px."""
    # draft() lets JPEG decode at a reduced scale; contain() then scales up or down to fit.
    image.draft("RGB", (max_px, max_px))
    return ImageOps.contain(to_rgb(image), (max_px, max_px))


def contact_sheet(
    images: Sequence[Image.Image | None], captions: Sequence[Sequence[str]], config: SheetConfig = SheetConfig()
) -> Image.Image:
    """Lay out thumbnails in a grid with caption lines under each; None draws a 'not found' placeholder.

    Args:
        images: thumbnails in reading order (left to right, top to bottom).
        captions: for each image, up to `config.caption_lines` lines of text.
        config: cell size, columns, font and padding.

    Returns:
        An RGB image of the whole sheet.
    """
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    font = ImageFont.load_default(size=config.font_px)
    line_px = config.font_px + 3
    cell_w = config.thumb_px
    cell_h = config.thumb_px + config.caption_lines * line_px
    columns = max(1, min(config.columns, len(images)))
    rows = max(1, -(-len(images) // columns))
    pad = config.padding
    sheet = Image.new("RGB", (pad + columns * (cell_w + pad), pad + rows * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, captions)):
        x = pad + (i % columns) * (cell_w + pad)
        y = pad + (i // columns) * (cell_h + pad)
        if image is None:
            draw.rectangle((x, y, x + cell_w - 1, y + config.thumb_px - 1), fill=(200, 200, 200))
            draw.text((x + 4, y + 4), "image not found", fill="black", font=font)
        else:
            # Centre the thumbnail in its square cell whatever its aspect ratio.
            sheet.paste(image, (x + (cell_w - image.width) // 2, y + (config.thumb_px - image.height) // 2))
        for j, line in enumerate(list(lines)[: config.caption_lines]):
            draw.text((x, y + config.thumb_px + 2 + j * line_px), _fit(draw, line, font, cell_w), fill="black", font=font)
    return sheet


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """The text, cut with an ellipsis so that it fits `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
