"""Training targets: the manifest's target transform, then a per-query normalisation.

The adapter regresses a normalised target (mean 0, std 1 on the query's training split) so that one
loss weight suits every query whatever its label units. The transform and the normalisation travel
with the checkpoint, and predictions are mapped back: for an "identity" target they come out in
label units, for a "distance" target in target units (-|label - reference|, higher = closer).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import TargetTransform


def transform_target(raw: np.ndarray, transform: TargetTransform) -> np.ndarray:
    """The ranking target of raw labels: the label itself, or -|label - reference| (closest ranks highest).

    Args:
        raw: [N] labels in label units (NaN stays NaN).
        transform: the label's TargetTransform from the manifest.

    Returns:
        [N] float64 targets.
    """
    raw = np.asarray(raw, dtype=np.float64)
    if transform.kind == "identity":
        return raw
    if transform.kind == "distance":
        return -np.abs(raw - float(transform.reference))
    raise ValueError(f"unknown target transform kind {transform.kind!r}")


@dataclasses.dataclass(frozen=True)
class TargetScale:
    """A query's target transform and the mean/std of its targets on the training split."""

    # How the raw label becomes the target.
    transform: TargetTransform
    # Mean of the training targets (target units).
    mean: float
    # Standard deviation of the training targets (target units), > 0.
    std: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"mean must be finite and std positive, got mean={self.mean}, std={self.std}")

    def normalise(self, raw: np.ndarray) -> np.ndarray:
        """Raw labels -> normalised targets, the values the adapter is trained to regress."""
        return (transform_target(raw, self.transform) - self.mean) / self.std

    def to_target_units(self, scores: np.ndarray) -> np.ndarray:
        """Adapter scores -> target units (label units for an identity transform)."""
        return np.asarray(scores, dtype=np.float64) * self.std + self.mean

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            "kind": self.transform.kind,
            "reference": self.transform.reference,
            "mean": float(self.mean),
            "std": float(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetScale:
        """Inverse of `to_dict`."""
        transform = TargetTransform(kind=data["kind"], reference=data["reference"])
        return cls(transform=transform, mean=float(data["mean"]), std=float(data["std"]))


def fit_target_scale(raw_train: np.ndarray, transform: TargetTransform, label: str) -> TargetScale:
    """Fit the normalisation of one query on its training labels.

    Args:
        raw_train: [N] finite training labels in label units.
        transform: the label's target transform.
        label: the label's name, for error messages.

    Raises:
        InputError: fewer than two training labels, or all targets equal (nothing to rank).
    """
    target = transform_target(raw_train, transform)
    if target.size < 2:
        raise InputError(
            f"label {label!r} has {target.size} training image(s) with a value; at least 2 are needed, "
            "check the manifest's train split values"
        )
    std = float(target.std())
    if not std > 0:
        raise InputError(
            f"label {label!r} has the same target for every training image; there is nothing to rank, "
            "check the labels or the target transform's reference"
        )
    return TargetScale(transform=transform, mean=float(target.mean()), std=std)
