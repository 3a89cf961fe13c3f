"""JPEG decoding and CLIP preprocessing on the GPU (nvjpeg through torchvision).

PIL decoding reaches about 120 images/s per core for 640x480 JPEGs, far below what a GPU backbone
consumes; decoding and resizing on the GPU keeps it fed. The steps mirror open_clip's eval transform
(resize the shortest side or squash, centre crop, scale to [0, 1], normalise) with antialiased
interpolation, so features differ from the PIL path only by resampling rounding.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode

logger = logging.getLogger(__name__)

# open_clip resize modes this module reproduces; others ("longest") use the CPU path.
GPU_RESIZE_MODES = ("shortest", "squash")


class GpuPreprocess:
    """Raw JPEG bytes -> normalised [k, 3, H, W] float images on the GPU."""

    def __init__(self, preprocess_cfg: dict[str, Any], image_size: tuple[int, int], device: torch.device) -> None:
        """
        Args:
            preprocess_cfg: open_clip preprocess config (mean, std, interpolation, resize_mode).
            image_size: (H, W) fed to the backbone.
            device: a CUDA device.
        """
        if preprocess_cfg["resize_mode"] not in GPU_RESIZE_MODES:
            raise ValueError(f"resize mode {preprocess_cfg['resize_mode']!r} has no GPU path")
        self.device = device
        self.image_size = image_size
        self.resize_mode = preprocess_cfg["resize_mode"]
        bilinear = preprocess_cfg["interpolation"] == "bilinear"
        self.interpolation = InterpolationMode.BILINEAR if bilinear else InterpolationMode.BICUBIC
        self.mean = torch.tensor(preprocess_cfg["mean"], device=device).view(1, 3, 1, 1)  # [1, 3, 1, 1]
        self.std = torch.tensor(preprocess_cfg["std"], device=device).view(1, 3, 1, 1)  # [1, 3, 1, 1]

    @staticmethod
    def supports(preprocess_cfg: dict[str, Any]) -> bool:
        return preprocess_cfg["resize_mode"] in GPU_RESIZE_MODES

    def __call__(self, jpegs: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[int], list[str]]:
        """Decode and preprocess.

        Returns:
            images [k, 3, H, W] float32 (None when k = 0), the indices into `jpegs` that decoded, and
            for those that did not, the error of each (in the order of the failed indices).
        """
        decoded, ok, failures = self._decode(jpegs)
        if not decoded:
            return None, ok, failures
        images = torch.stack([self._resize(image) for image in decoded])  # [k, 3, H, W] uint8
        images = images.float().div_(255.0).sub_(self.mean).div_(self.std)  # [k, 3, H, W]
        return images, ok, failures

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
        """[3, h, w] uint8 -> [3, H, W] uint8, as open_clip's eval transform."""
        H, W = self.image_size
        if self.resize_mode == "squash":
            return TF.resize(image, [H, W], interpolation=self.interpolation, antialias=True)
        if H == W:
            # A one-element size scales the shortest side, exactly as open_clip's Resize(int).
            size = [H]
        else:
            # A non-square target: scale so the image covers it, then crop.
            _, h, w = image.shape
            scale = max(H / h, W / w)
            size = [max(H, round(h * scale)), max(W, round(w * scale))]
        image = TF.resize(image, size, interpolation=self.interpolation, antialias=True)
        return TF.center_crop(image, [H, W])
