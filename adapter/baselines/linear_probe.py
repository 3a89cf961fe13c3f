"""Linear probe: ridge regression from the pooled image embedding to the target, penalty chosen on val.

For each label, with X the [n, E] train embeddings and y the train targets (both centred on their
train means), the weights solve (XᵀX + λ I) w = Xᵀy and the bias restores the means. λ is
α · tr(XᵀX) / E (α times the mean eigenvalue of XᵀX, so the grid does not depend on the backbone's
embedding scale), with α on a log-spaced grid; the α with the best val SRCC is kept (or the
lowest val MSE with `select_by: mse`), ties going to the larger penalty.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import scipy.stats
import torch

from rankpipe.adapter.baselines import register_method
from rankpipe.adapter.baselines.base import Baseline
from rankpipe.adapter.baselines.data import LabelSplits
from rankpipe.adapter.baselines.prompts import PromptEncoder

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LinearProbeConfig:
    """The ridge penalty grid and how its value is chosen."""

    # Smallest relative penalty α (λ = α · tr(XᵀX) / E).
    min_penalty: float = 1e-4
    # Largest relative penalty α.
    max_penalty: float = 1e4
    # Grid points, log-spaced from min_penalty to max_penalty.
    num_penalties: int = 17
    # Keep the penalty with the highest val Spearman correlation ("srcc") or the lowest val mean squared error ("mse").
    select_by: Literal["srcc", "mse"] = "srcc"

    def __post_init__(self) -> None:
        if not 0 < self.min_penalty <= self.max_penalty:
            raise ValueError(f"need 0 < min_penalty <= max_penalty, got {self.min_penalty}, {self.max_penalty}")
        if self.num_penalties < 1:
            raise ValueError(f"num_penalties must be >= 1, not {self.num_penalties}")
        if self.select_by not in ("srcc", "mse"):
            raise ValueError(f"select_by must be 'srcc' or 'mse', not {self.select_by!r}")

    def grid(self) -> np.ndarray:
        """[num_penalties] relative penalties, largest first (ties keep the first, the most regularised)."""
        return np.geomspace(self.max_penalty, self.min_penalty, self.num_penalties)


def ridge(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, float]:
    """Closed-form ridge regression with an unpenalised bias.

    Args:
        x: [n, E] features.
        y: [n] targets.
        penalty: λ, added to the diagonal of the centred Gram matrix.

    Returns:
        weights [E] float64 and bias.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc = x - x_mean  # [n, E]
    gram = xc.T @ xc  # [E, E]
    weights = np.linalg.solve(gram + penalty * np.eye(gram.shape[0]), xc.T @ (y - y_mean))  # [E]
    return weights, float(y_mean - x_mean @ weights)


def _selection_score(pred: np.ndarray, truth: np.ndarray, select_by: str) -> float:
    """Higher is better; an undefined SRCC (constant predictions) ranks last."""
    if select_by == "mse":
        return -float(np.mean((pred - truth) ** 2))
    with np.errstate(invalid="ignore"):
        value = float(scipy.stats.spearmanr(pred, truth).statistic)
    return value if np.isfinite(value) else -np.inf


@register_method("linear-probe")
class LinearProbe(Baseline):
    """Ridge regression on the pooled embedding; the only baseline here that learns from the labels."""

    config_class = LinearProbeConfig

    @classmethod
    def fit(cls, config: LinearProbeConfig, data: Sequence[LabelSplits], prompts: PromptEncoder) -> LinearProbe:
        params: dict[str, dict[str, Any]] = {}
        for split in data:
            x = np.asarray(split.train_embed, dtype=np.float64)
            xc = x - x.mean(axis=0)
            scale = float(np.sum(xc * xc)) / x.shape[1]  # tr(XᵀX) / E
            scale = scale if scale > 0 else 1.0
            best: tuple[float, float, np.ndarray, float] | None = None
            scores = []
            for alpha in config.grid():
                weights, bias = ridge(x, split.train_targets, alpha * scale)
                pred = split.val_embed.astype(np.float64) @ weights + bias
                score = _selection_score(pred, split.val_targets, config.select_by)
                scores.append(score)
                if best is None or score > best[0]:
                    best = (score, float(alpha), weights, bias)
            _, alpha, weights, bias = best
            log.info("linear-probe %s: relative penalty %.3g (val %s %.4f)", split.name, alpha, config.select_by, best[0])
            params[split.name] = {
                "weights": torch.from_numpy(weights),  # [E] float64
                "bias": bias,
                "penalty": alpha * scale,
                "relative_penalty": alpha,
                "grid": [float(a) for a in config.grid()],
                "grid_val_scores": [float(s) for s in scores],
            }
        return cls(config, params)

    def predict(self, label: str, embed: np.ndarray) -> np.ndarray:
        p = self.label_params(label)
        return np.asarray(embed, dtype=np.float64) @ p["weights"].numpy() + p["bias"]
