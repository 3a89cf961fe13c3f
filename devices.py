"""Which torch device a job runs on, and the compute dtype it uses there.

The user names a device with `--device` (`cpu`, `cuda`, `cuda:1`) or leaves it out to take the GPU
when there is one. Every command resolves that name here, so an unknown or absent device gets the
same one-sentence error everywhere.
"""

from __future__ import annotations

import contextlib

import torch

from rankpipe.errors import InputError


def cuda_available() -> bool:
    """Whether this process sees a CUDA GPU."""
    return torch.cuda.is_available()


def default_device(device: str | None) -> str:
    """`device`, or "cuda" when it is None and a GPU is available, else "cpu"."""
    if device is not None:
        return device
    return "cuda" if cuda_available() else "cpu"


def torch_device_for(device: str) -> torch.device:
    """The torch device named by a --device value.

    Raises:
        InputError: an unknown device, an unsupported kind, or CUDA asked for where there is none.
    """
    try:
        torch_device = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r}; use cpu or cuda") from e
    if torch_device.type == "cuda" and not cuda_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if torch_device.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use cpu or cuda")
    return torch_device


def autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, plain fp32 elsewhere (CPU runs stay bit-reproducible)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
