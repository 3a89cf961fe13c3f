"""Ranking metrics with bootstrap confidence intervals, as pure functions of (prediction, label) arrays.

Every metric is written once, batched over bootstrap resamples: the point estimate is the same code
run on the one "resample" that is the data itself. Resamples are drawn with replacement; rank and
correlation metrics gather the resampled values, the pair-counting metrics (Kendall's tau-b and
pairwise ordering accuracy) instead weight each sample by how often it was drawn, so that one
O(n²) pass of matrix products serves all resamples at once (`pair_counts`).

Conventions:
- Correlations (PLCC, SRCC, KRCC) are NaN when either input is constant; `compute_metrics` adds a note.
- SRCC ranks ties by their average rank; KRCC is tau-b (ties corrected), both as `scipy.stats`.
- Pairwise ordering accuracy counts the unordered pairs whose labels differ; a pair scores 1 when the
  prediction orders it like the label, 0 when reversed and 1/2 when the two predictions are equal
  (a tie is a coin flip). Equals (1 + tau_a') / 2 with tau_a' = (C - D) / (pairs with distinct labels).
- Ordinal labels: a prediction is rounded to the nearest class value (halfway rounds to the lower
  class); accuracy is the fraction of exact classes, class MAE the mean distance in class steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

CORRELATIONS = ("plcc", "srcc", "krcc")
# Metric name -> (table heading, higher is better) in the order tables show them.
METRICS: dict[str, tuple[str, bool]] = {
    "plcc": ("PLCC", True),
    "srcc": ("SRCC", True),
    "krcc": ("KRCC", True),
    "mae": ("MAE", False),
    "pair_acc": ("Pair acc", True),
    "class_acc": ("Class acc", True),
    "class_mae": ("Class MAE", False),
}


@dataclasses.dataclass(frozen=True)
class MetricConfig:
    """How metrics and their confidence intervals are computed."""

    # Bootstrap resamples for the intervals; 0 skips the intervals (low/high are NaN).
    bootstrap: int = 1000
    # Seed of the resampling generator, so intervals are reproducible.
    seed: int = 0
    # Coverage of the percentile interval (0.95: 2.5th to 97.5th percentile).
    confidence: float = 0.95
    # Upper bound on the elements of one temporary [resamples, samples] block; bounds peak memory.
    block_elements: int = 1 << 22

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"bootstrap must be >= 0, not {self.bootstrap}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), not {self.confidence}")
        if self.block_elements < 1:
            raise ValueError(f"block_elements must be >= 1, not {self.block_elements}")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """One metric on the full sample with its bootstrap percentile interval."""

    # The metric on all samples (NaN when undefined, e.g. a correlation with a constant input).
    value: float
    # Lower and upper ends of the bootstrap interval (NaN without bootstrap or when undefined).
    low: float
    high: float


@dataclasses.dataclass(frozen=True)
class QueryMetrics:
    """All metrics of one query (one label) on one split."""

    # Samples with a finite label, used by every metric.
    n: int
    # Samples skipped because their label is NaN.
    n_missing: int
    # Metric name (keys of METRICS) -> estimate; ordinal metrics only for ordinal labels.
    estimates: dict[str, Estimate]
    # Why a metric is NaN or otherwise needs a word of explanation.
    notes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- batched primitives
# Batched functions take [B, n] arrays (B resamples of n values) and return [B] results.


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair; NaN where a row is constant. x, y: [B, n] -> [B]."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=1, keepdims=True)  # [B, n]
    yc = y - y.mean(axis=1, keepdims=True)  # [B, n]
    num = np.einsum("bn,bn->b", xc, yc)
    den = np.sqrt(np.einsum("bn,bn->b", xc, xc) * np.einsum("bn,bn->b", yc, yc))
    # Test constancy exactly: the mean of equal floats need not equal them, so den can be a tiny non-zero.
    constant = np.all(x == x[:, :1], axis=1) | np.all(y == y[:, :1], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation (average ranks for ties) of each row pair. x, y: [B, n] -> [B]."""
    return pearson_rows(rankdata(x, axis=1), rankdata(y, axis=1))


def pair_counts(pred: np.ndarray, true: np.ndarray, weights: np.ndarray, block_elements: int = 1 << 22) -> dict[str, np.ndarray]:
    """Weighted pair statistics for Kendall's tau-b and pairwise accuracy, for many weightings at once.

    A bootstrap resample that draws sample i w_i times contains w_i·w_j copies of the pair (i, j), and
    copies of one sample are tied in both arrays, so every count below is a quadratic form
    Σ_{i<j} w_i w_j M_ij = ½ wᵀ M w with M symmetric and zero on the diagonal.

    The sign matrix is built one block of rows at a time and applied with a float32 matrix product;
    peak memory is about 3 · rows · n + B · rows values with rows · max(n, B) ≤ block_elements, and the
    time O(B · n²). The distinct-pair counts need no n × n matrix: they are all pairs minus the pairs
    inside groups of equal values.

    Args:
        pred, true: [n] predictions and labels.
        weights: [B, n] how often each sample is drawn in each of B resamples (all ones: the data itself).
        block_elements: bound on the elements of one temporary block.

    Returns:
        [B] arrays: "sign" Σ sign(Δpred)·sign(Δtrue) = concordant − discordant pairs, "pred_distinct"
        and "true_distinct" the pairs whose predictions (labels) differ.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    B, n = weights.shape
    # Every partial sum of the product below is an integer of magnitude <= Σ_j w_j = n, which float32
    # holds exactly below 2**24: the float32 product is exact and twice as fast as float64.
    product_dtype = np.float32 if n < 2**24 else np.float64
    weights_low = weights.astype(product_dtype)
    rows = max(1, block_elements // max(n, B))
    sign = np.zeros(B)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        concordance = np.sign(pred[start:stop, None] - pred[None, :]) * np.sign(true[start:stop, None] - true[None, :])  # [r, n]
        # (W Mᵀ)[b, r] = Σ_j w_bj M_rj, then weight by w_br: this block's slice of wᵀ M w per resample.
        partial = weights_low @ concordance.T.astype(product_dtype)  # [B, r]
        sign += np.einsum("br,br->b", weights[:, start:stop], partial.astype(np.float64))
    return {
        "sign": sign / 2.0,
        "pred_distinct": _distinct_pairs(pred, weights),
        "true_distinct": _distinct_pairs(true, weights),
    }


def _distinct_pairs(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_{i<j} w_i w_j [v_i ≠ v_j] = ½ ((Σ w)² − Σ_groups (Σ_{i in group} w_i)²). values [n], weights [B, n] -> [B]."""
    _, group = np.unique(values, return_inverse=True)  # [n] index of each value's group of equals
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    group_weight = np.add.reduceat(weights[:, order], starts, axis=1)  # [B, G]
    total = weights.sum(axis=1)
    return (total**2 - np.sum(group_weight**2, axis=1)) / 2.0


def kendall_from_counts(counts: dict[str, np.ndarray]) -> np.ndarray:
    """Kendall's tau-b from `pair_counts`: (C − D) / sqrt(pairs untied in pred · pairs untied in label)."""
    den = np.sqrt(counts["pred_distinct"] * counts["true_distinct"])
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = np.where(den > 0, counts["sign"] / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(tau, -1.0, 1.0)


def pair_accuracy_from_counts(counts: dict[str, np.ndarray]) -> np.ndarray:
    """Pairwise ordering accuracy from `pair_counts`; prediction ties count half (module docstring)."""
    distinct = counts["true_distinct"]
    # Among label-distinct pairs: correct + ½·pred-tied = ½·distinct + ½·(C − D); pairs with tied labels add 0 to C − D.
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(distinct > 0, 0.5 + counts["sign"] / (2.0 * np.where(distinct > 0, distinct, 1.0)), np.nan)


def nearest_class(values: np.ndarray, classes: Sequence[float]) -> np.ndarray:
    """Index of the nearest class value for each value (halfway rounds to the lower class). [...] -> [...]."""
    classes = np.asarray(sorted(classes), dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    distance = np.abs(values[..., None] - classes)  # [..., K]
    return np.argmin(distance, axis=-1)


# ---------------------------------------------------------------------------- single-sample metrics


def plcc(pred: np.ndarray, true: np.ndarray) -> float:
    """Pearson's linear correlation; NaN when either input is constant."""
    return float(pearson_rows(np.asarray(pred)[None], np.asarray(true)[None])[0])


def srcc(pred: np.ndarray, true: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either input is constant."""
    return float(spearman_rows(np.asarray(pred)[None], np.asarray(true)[None])[0])


def krcc(pred: np.ndarray, true: np.ndarray) -> float:
    """Kendall's tau-b; NaN when either input is constant."""
    return float(kendall_from_counts(pair_counts(pred, true, np.ones((1, len(pred)))))[0])


def pairwise_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    """Fraction of label-distinct pairs the prediction orders correctly (ties count half); NaN if no such pair."""
    return float(pair_accuracy_from_counts(pair_counts(pred, true, np.ones((1, len(pred)))))[0])


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute error in label units."""
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64))))


def class_accuracy(pred: np.ndarray, true: np.ndarray, classes: Sequence[float]) -> float:
    """Fraction of predictions whose nearest class is the label's class."""
    return float(np.mean(nearest_class(pred, classes) == nearest_class(true, classes)))


def class_mae(pred: np.ndarray, true: np.ndarray, classes: Sequence[float]) -> float:
    """Mean distance, in class steps, between the prediction's nearest class and the label's class."""
    return float(np.mean(np.abs(nearest_class(pred, classes) - nearest_class(true, classes))))


# ---------------------------------------------------------------------------- all metrics with intervals


def compute_metrics(
    pred: np.ndarray,
    true: np.ndarray,
    classes: Sequence[float] | None = None,
    config: MetricConfig = MetricConfig(),
) -> QueryMetrics:
    """Every metric of one query with bootstrap intervals; NaN labels are excluded and counted.

    Args:
        pred: [n] predicted scores in label units (must be finite).
        true: [n] labels in label units, NaN where missing.
        classes: the ordered class values of an ordinal label (adds class accuracy and class MAE).
        config: resamples, seed and interval coverage.

    Returns:
        QueryMetrics with the estimates, the sample counts and notes on undefined metrics.
    """
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    if pred.shape != true.shape or pred.ndim != 1:
        raise ValueError(f"pred and true must be 1-D of equal length, got {pred.shape} and {true.shape}")
    if not np.all(np.isfinite(pred)):
        raise ValueError(f"{int(np.sum(~np.isfinite(pred)))} predictions are not finite")
    keep = np.isfinite(true)
    pred, true = pred[keep], true[keep]
    n = len(true)
    notes = _notes(pred, true)
    names = [name for name in METRICS if classes is not None or not name.startswith("class_")]
    if n == 0:
        nan = Estimate(math.nan, math.nan, math.nan)
        return QueryMetrics(0, int(np.sum(~keep)), {name: nan for name in names}, notes)

    values = _batched_metrics(pred, true, np.arange(n)[None], classes, config.block_elements)
    draws = _bootstrap(pred, true, classes, config)
    tail = 100.0 * (1.0 - config.confidence) / 2.0
    estimates = {}
    for name in names:
        low = high = math.nan
        if draws is not None and np.any(np.isfinite(draws[name])):
            low, high = (float(q) for q in np.nanpercentile(draws[name], [tail, 100.0 - tail]))
        estimates[name] = Estimate(float(values[name][0]), low, high)
    return QueryMetrics(n, int(np.sum(~keep)), estimates, notes)


def _batched_metrics(
    pred: np.ndarray, true: np.ndarray, index: np.ndarray, classes: Sequence[float] | None, block_elements: int
) -> dict[str, np.ndarray]:
    """All metrics for B resamples given as sample indices. index: [B, n] -> {name: [B]}."""
    B, n = index.shape
    p, t = pred[index], true[index]  # [B, n] each
    # Draw counts per sample: weights[b, i] = how often resample b drew sample i.
    offsets = (index + n * np.arange(B)[:, None]).ravel()
    weights = np.bincount(offsets, minlength=B * n).reshape(B, n)  # [B, n]
    counts = pair_counts(pred, true, weights, block_elements)
    out = {
        "plcc": pearson_rows(p, t),
        "srcc": spearman_rows(p, t),
        "krcc": kendall_from_counts(counts),
        "mae": np.mean(np.abs(p - t), axis=1),
        "pair_acc": pair_accuracy_from_counts(counts),
    }
    if classes is not None:
        pc, tc = nearest_class(p, classes), nearest_class(t, classes)  # [B, n] class indices
        out["class_acc"] = np.mean(pc == tc, axis=1)
        out["class_mae"] = np.mean(np.abs(pc - tc), axis=1)
    return out


def _bootstrap(
    pred: np.ndarray, true: np.ndarray, classes: Sequence[float] | None, config: MetricConfig
) -> dict[str, np.ndarray] | None:
    """Metrics on config.bootstrap resamples, in blocks of resamples that bound memory. -> {name: [R]}."""
    if config.bootstrap == 0:
        return None
    n = len(pred)
    rng = np.random.default_rng(config.seed)
    index = rng.integers(0, n, size=(config.bootstrap, n))  # [R, n]
    per_block = max(1, config.block_elements // n)
    parts = [
        _batched_metrics(pred, true, index[start : start + per_block], classes, config.block_elements)
        for start in range(0, config.bootstrap, per_block)
    ]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def _notes(pred: np.ndarray, true: np.ndarray) -> tuple[str, ...]:
    notes = []
    if len(true) < 2:
        notes.append(f"only {len(true)} labelled sample(s): correlations and pairwise accuracy are undefined")
    else:
        if np.all(pred == pred[0]):
            notes.append("all predictions are equal: correlations are undefined (NaN)")
        if np.all(true == true[0]):
            notes.append("all labels are equal: correlations and pairwise accuracy are undefined (NaN)")
    return tuple(notes)
