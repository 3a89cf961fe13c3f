"""How an image becomes the backbone's input: the resize mode, its geometry, and the CPU (PIL) path.

Two modes, recorded in a store's provenance (`resize`):

- `squash` (the paper's, §4.2: "resized to the backbone's resolution without cropping"): both sides
  are scaled to the backbone's image size, whatever the aspect ratio; nothing is cut off.
- `crop` (the model's own eval transform in open_clip): the shortest side is scaled to the image
  size, then the centre is cut out. Stores made before the mode was recorded were made this way.

`resize_geometry` is the one place the size to resize to and the window to keep are computed; the
PIL path here and the GPU path (gpu_decode.py) both call it, so they differ only by resampling
rounding. For `crop` it reproduces torchvision's `Resize(int)` + `CenterCrop` (and open_clip's
keep-ratio resize for non-square targets), so a crop store made by this module has the bytes of one
made with open_clip's own transform.
"""

from __future__ import annotations

import dataclasses

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

SQUASH, CROP = "squash", "crop"
RESIZE_MODES = (SQUASH, CROP)
# The paper's choice, the default of `rankpipe embed`.
PAPER_RESIZE = SQUASH
# The name open_clip's preprocess config gives each mode (its `resize_mode`).
OPEN_CLIP_RESIZE_MODE = {SQUASH: "squash", CROP: "shortest"}


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where an image's pixels go: resize to `size`, then keep the image-size window at `top`, `left`."""

    # (h, w) the whole image is resized to.
    size: tuple[int, int]
    # Top-left corner of the kept window in the resized image ((0, 0) when nothing is cut off).
    top: int
    left: int


def resize_geometry(height: int, width: int, image_size: tuple[int, int], resize: str) -> Geometry:
    """The resize and crop of an image of `height` x `width` for a backbone of `image_size` (H, W).

    Raises:
        ValueError: an unknown resize mode (a bug: modes are checked where they are chosen).
    """
    H, W = image_size
    if resize == SQUASH:
        return Geometry((H, W), 0, 0)
    if resize != CROP:
        raise ValueError(f"unknown resize mode {resize!r}")
    if H == W:
        # torchvision's Resize(int): the short side becomes H, the long side is truncated, not rounded.
        if width <= height:
            size = (int(H * height / width), H)
        else:
            size = (H, int(H * width / height))
    else:
        # open_clip's keep-ratio resize for a non-square target: scale by the smaller ratio, rounded.
        ratio = min(height / H, width / W)
        size = (round(height / ratio), round(width / ratio))
    # torchvision's CenterCrop offsets.
    return Geometry(size, int(round((size[0] - H) / 2.0)), int(round((size[1] - W) / 2.0)))


def interpolation_mode(name: str) -> InterpolationMode:
    """torchvision's interpolation for an open_clip preprocess config's `interpolation`."""
    return InterpolationMode.BILINEAR if name == "bilinear" else InterpolationMode.BICUBIC


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """RGB PIL image -> [3, H, W] normalised float32 tensor: the CPU path (picklable for decoding workers)."""

    # (H, W) fed to the backbone.
    image_size: tuple[int, int]
    # "squash" or "crop".
    resize: str
    # Per-channel normalisation of the backbone.
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    # "bicubic" or "bilinear".
    interpolation: str

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        geometry = resize_geometry(image.height, image.width, self.image_size, self.resize)
        image = TF.resize(image, list(geometry.size), interpolation=interpolation_mode(self.interpolation))
        image = TF.crop(image, geometry.top, geometry.left, *self.image_size)
        pixels = TF.to_tensor(image.convert("RGB"))  # [3, H, W] in [0, 1]
        return TF.normalize(pixels, list(self.mean), list(self.std))
