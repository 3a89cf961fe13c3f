"""Rank axis: one direction of the pooled image embedding, fitted from the k lowest and k highest train images.

"On the rankability of visual embeddings" (Sonthalia, Uselis, Oh, arXiv 2507.03683) finds that a
single linear direction of a frozen embedding, the rank axis, often orders an attribute, and that a
few labelled extremes suffice to find it. For each label, with x̂ the unit-normalised embeddings:

- `k: N` — the axis is mean(x̂ of the N highest-target train images) − mean(x̂ of the N lowest);
  N = 1 is the paper's "two extreme examples". Ties in the target are broken by train-split order:
  at either end the earlier image is taken first.
- `k: all` — the paper's full-data fit, a linear regression on every train image: here the ridge of
  the linear probe (its penalty chosen on val), whose weight vector is the axis.

The score is the projection x̂ · axis / |axis|, mapped to label units by a least-squares affine fit
(prompts.fit_affine) on the images the axis was fitted from only, so `k: N` learns from 2N labels.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.base import Baseline
from rankpipe.adapter.baselines.data import LabelSplits
from rankpipe.adapter.baselines.linear_probe import LinearProbe, LinearProbeConfig
from rankpipe.adapter.baselines.prompts import PromptEncoder, fit_affine
from rankpipe.errors import InputError

log = logging.getLogger(__name__)

ALL = "all"


@dataclasses.dataclass(frozen=True)
class RankAxisConfig:
    """How many labelled images per end fix the axis, and the embedding geometry."""

    # Images per end: the axis joins the means of the k lowest and k highest train targets;
    # "all" regresses on the whole train split instead (the linear probe's ridge, penalty chosen on val).
    k: int | Literal["all"] = 1
    # Unit-normalise the embeddings first (CLIP compares embeddings by cosine, as the paper's axes do).
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.k != ALL and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"k must be a positive integer or 'all', not {self.k!r}")


def unit_rows(embed: np.ndarray) -> np.ndarray:
    """[n, E] embeddings scaled to unit length, float64 (a zero row stays zero)."""
    x = np.asarray(embed, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [n, 1]
    return x / np.where(norms > 0, norms, 1.0)


def extreme_rows(targets: np.ndarray, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the k lowest and the k highest targets, two disjoint sets.

    Ties go to the earlier position at either end, the low end first: the high end is drawn from the
    positions the low end left, so with many equal targets (t = [1, 1, 1, 2], k = 2: low [0, 1], high
    [3, 2]) no image sits at both ends.

    Args:
        targets: [n] train targets.
        k: images per end.
        what: names the label in errors.

    Returns:
        (low, high): [k] positions each, most extreme first.

    Raises:
        InputError: fewer than 2k targets (the two ends would share images).
    """
    t = np.asarray(targets, dtype=np.float64)
    if 2 * k > t.size:
        raise InputError(f"{what}: k={k} needs 2k = {2 * k} train images but the train split has {t.size}; "
                         f"set k to at most {t.size // 2} or k=all")
    low = np.argsort(t, kind="stable")[:k]
    rest = np.setdiff1d(np.arange(t.size), low)  # ascending: ties keep train order
    high = rest[np.argsort(-t[rest], kind="stable")[:k]]
    return low, high


@register_method("rank-axis")
class RankAxis(Baseline):
    """Projection on a rank axis of the pooled embedding, from k extremes per end or a full regression."""

    config_class = RankAxisConfig

    @classmethod
    def fit(cls, config: RankAxisConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> RankAxis:
        params: dict[str, dict[str, Any]] = {}
        for split in data:
            what = f"rank-axis {split.name}"
            x = cls._geometry(config, split.train_embed)  # [n, E]
            if config.k == ALL:
                axis, used, extra = cls._regression_axis(config, split, x)
            else:
                low, high = extreme_rows(split.train_targets, config.k, what)
                axis = x[high].mean(axis=0) - x[low].mean(axis=0)  # [E]
                used = np.concatenate([low, high])
                extra = {"low_rows": low.tolist(), "high_rows": high.tolist()}
            norm = float(np.linalg.norm(axis))
            if not norm > 0:
                raise InputError(f"{what}: the axis is zero (the images fixing it have identical embeddings); "
                                 "set a larger k or k=all")
            axis = axis / norm
            slope, intercept = fit_affine(x[used] @ axis, split.train_targets[used], what)
            log.info("%s: axis from %d train image(s), target = %.4g * projection + %.4g", what, used.size, slope, intercept)
            params[split.name] = {"axis": torch.from_numpy(axis), "slope": slope, "intercept": intercept,  # axis [E] float64
                                  "fit_images": int(used.size), **extra}
        return cls(config, params)

    @staticmethod
    def _geometry(config: RankAxisConfig, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings as the axis sees them: float64, unit rows when `normalize`."""
        return unit_rows(embed) if config.normalize else np.asarray(embed, dtype=np.float64)

    @classmethod
    def _regression_axis(cls, config: RankAxisConfig, split: LabelSplits, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """The linear probe's ridge weights on the (normalised) embeddings, every train position, its penalty."""
        seen = dataclasses.replace(split, train_embed=x, val_embed=cls._geometry(config, split.val_embed))
        probe = LinearProbe.fit(LinearProbeConfig(), [seen], prompts=None).params[split.name]
        return probe["weights"].numpy(), np.arange(x.shape[0]), {"penalty": probe["penalty"]}

    def projection(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n] projection on the label's unit axis (before the affine map)."""
        return self._geometry(self.config, embed) @ self.label_params(label)["axis"].numpy()

    def predict(self, label: str, embed: np.ndarray) -> np.ndarray:
        p = self.label_params(label)
        return p["slope"] * self.projection(label, embed) + p["intercept"]
