"""Bootstrap intervals over test images for a bench row, and the paired difference of two rows.

A row is one variant on one query: its runs' scores of the same test images, one array per seed,
each with the ground truth it is compared to. Its metric is the mean over seeds of the metric of
each seed's scores (pooled over seeds). Intervals come from resampling test images with replacement
(scipy.stats.bootstrap, percentile method); a paired difference resamples the images once for both
rows (`paired=True`), so what the two rows share — which images are easy, which are hard — cancels,
and only the difference between the rows is left to vary.

A correlation needs variance on both sides; a resample (or a run) whose scores or truth are
constant has no ordering information, and its correlation counts as 0 rather than undefined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

from rankpipe.adapter.evaluation.metrics import Estimate

# Verdicts of a paired difference at the bootstrap's confidence level.
BETTER, WORSE, SAME = "better", "worse", "no difference"
# Resamples evaluated per vectorised call: bounds memory at about batch × images × arrays floats.
RESAMPLE_BATCH = 100


@dataclasses.dataclass(frozen=True)
class BootstrapConfig:
    """How intervals are resampled."""

    # Resamples of the test images.
    resamples: int = 1000
    # Seeds the resampling, so a table is the same on every rerun.
    seed: int = 0
    # Two-sided confidence level of the intervals.
    confidence: float = 0.95

    def __post_init__(self) -> None:
        if self.resamples < 10:
            raise ValueError(f"resamples must be at least 10, not {self.resamples}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must lie in (0, 1), not {self.confidence}")


@dataclasses.dataclass(frozen=True)
class Run:
    """One seed's scores of a row and the truth they are compared with, over the same test images."""

    scores: np.ndarray  # (N,)
    truth: np.ndarray  # (N,), NaN where the image has no label


def pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation along the last axis; 0 where either side is constant."""
    x = x - x.mean(axis=-1, keepdims=True)  # (..., N)
    y = y - y.mean(axis=-1, keepdims=True)  # (..., N)
    denominator = np.sqrt((x * x).sum(axis=-1) * (y * y).sum(axis=-1))  # (...)
    numerator = (x * y).sum(axis=-1)
    safe = denominator > 1e-12 * np.maximum(1.0, np.abs(numerator))
    return np.where(safe, numerator / np.where(safe, denominator, 1.0), 0.0)


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation (average ranks for ties) along the last axis; 0 where a side is constant."""
    return pearson(stats.rankdata(x, axis=-1), stats.rankdata(y, axis=-1))


# Metric key (as in metrics.json) -> vectorised function of (scores, truth) along the last axis.
METRICS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"srcc": spearman, "plcc": pearson}


def row_estimate(runs: Sequence[Run], metric: str, config: BootstrapConfig) -> Estimate:
    """The metric of a row, pooled over its seeds, with its interval over resampled test images."""
    arrays = _labelled(runs)
    count = len(runs)

    def statistic(*data, axis=-1):
        return _pooled(data, 0, count, METRICS[metric])

    return _bootstrap(arrays, statistic, config)


def paired_difference(runs: Sequence[Run], reference: Sequence[Run], metric: str, config: BootstrapConfig) -> Estimate:
    """Metric of `runs` minus metric of `reference` (each pooled over seeds), on the same resampled images.

    Both rows must score the same test images in the same order; an image counts when every run of
    both rows has its label.
    """
    arrays = _labelled([*runs, *reference])
    count = len(runs)
    function = METRICS[metric]

    def statistic(*data, axis=-1):
        return _pooled(data, 0, count, function) - _pooled(data, count, len(reference), function)

    return _bootstrap(arrays, statistic, config)


def verdict(difference: Estimate) -> str:
    """Better or worse when the interval of the difference excludes 0, else no difference."""
    if difference.low > 0.0:
        return BETTER
    if difference.high < 0.0:
        return WORSE
    return SAME


def labelled_images(runs: Sequence[Run]) -> np.ndarray:
    """(N,) bool: the test images every run has a label for, the images an estimate over `runs` uses."""
    if len({len(run.scores) for run in runs} | {len(run.truth) for run in runs}) != 1:
        raise ValueError("every run must score the same test images")
    return np.logical_and.reduce([np.isfinite(run.truth) for run in runs])


def _labelled(runs: Sequence[Run]) -> list[np.ndarray]:
    """Scores and truth of every run, flattened to (scores, truth, scores, truth, …), labelled images only."""
    labelled = labelled_images(runs)  # (N,)
    return [np.asarray(a, dtype=np.float64)[labelled] for run in runs for a in (run.scores, run.truth)]


def _pooled(data: Sequence[np.ndarray], first: int, count: int, function) -> np.ndarray:
    """Mean over runs first..first+count-1 of function(scores, truth); data is flattened as in _labelled."""
    values = [function(data[2 * i], data[2 * i + 1]) for i in range(first, first + count)]  # each (...)
    return np.mean(values, axis=0)


def _bootstrap(arrays: list[np.ndarray], statistic, config: BootstrapConfig) -> Estimate:
    if len(arrays[0]) < 2:  # no correlation without two labelled images
        return Estimate(float("nan"), float("nan"), float("nan"))
    value = float(statistic(*arrays))
    result = stats.bootstrap(
        arrays, statistic, n_resamples=config.resamples, batch=RESAMPLE_BATCH, vectorized=True, paired=True,
        confidence_level=config.confidence, method="percentile", rng=np.random.default_rng(config.seed),
    )
    interval = result.confidence_interval
    return Estimate(value, float(interval.low), float(interval.high))
