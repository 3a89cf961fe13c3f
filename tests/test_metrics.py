"""Ranking metrics against scipy.stats and brute-force references, including ties and constant inputs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from rankpipe.adapter.evaluation import metrics as m


def _pair(kind: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind == "continuous":
        pred = rng.normal(size=n)
        return pred, pred + rng.normal(size=n)
    if kind == "ties":
        # Few distinct values in both arrays: many tied pairs, some tied in both.
        pred = rng.integers(0, 4, n).astype(float)
        return pred, rng.integers(0, 3, n) + 0.5 * pred
    if kind == "anti":
        pred = rng.normal(size=n)
        return pred, -3.0 * pred + 0.1 * rng.normal(size=n)
    raise AssertionError(kind)


def _brute_pair_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    score = total = 0.0
    for i, j in itertools.combinations(range(len(pred)), 2):
        if true[i] == true[j]:
            continue
        total += 1
        agree = np.sign(pred[i] - pred[j]) * np.sign(true[i] - true[j])
        score += 1.0 if agree > 0 else 0.5 if agree == 0 else 0.0
    return score / total


@pytest.mark.parametrize("kind", ["continuous", "ties", "anti"])
@pytest.mark.parametrize("n", [2, 7, 60])
def test_correlations_match_scipy(kind: str, n: int) -> None:
    pred, true = _pair(kind, n, seed=n)
    if np.all(pred == pred[0]) or np.all(true == true[0]):
        pytest.skip("drew a constant input; covered by test_constant_inputs_give_nan")
    assert m.plcc(pred, true) == pytest.approx(stats.pearsonr(pred, true)[0], abs=1e-12)
    assert m.srcc(pred, true) == pytest.approx(stats.spearmanr(pred, true)[0], abs=1e-12)
    assert m.krcc(pred, true) == pytest.approx(stats.kendalltau(pred, true)[0], abs=1e-12)


@pytest.mark.parametrize("kind", ["continuous", "ties", "anti"])
def test_pairwise_accuracy_matches_brute_force(kind: str) -> None:
    pred, true = _pair(kind, 40, seed=3)
    assert m.pairwise_accuracy(pred, true) == pytest.approx(_brute_pair_accuracy(pred, true), abs=1e-12)


def test_pairwise_accuracy_counts_prediction_ties_half() -> None:
    # Pairs with distinct labels: (0,1) tied prediction -> 1/2, (0,2) right, (1,2) right; (2,3) tied label: skipped.
    true = np.array([0.0, 1.0, 2.0, 2.0])
    pred = np.array([5.0, 5.0, 9.0, 1.0])
    # (0,3): 5 > 1 but label 0 < 2 -> wrong; (1,3): wrong. Score = (0.5 + 1 + 1 + 0 + 0) / 5.
    assert m.pairwise_accuracy(pred, true) == pytest.approx(2.5 / 5)
    assert m.pairwise_accuracy(true, true) == 1.0
    assert m.pairwise_accuracy(-true, true) == 0.0


@pytest.mark.parametrize("constant", ["pred", "true", "both"])
def test_constant_inputs_give_nan(constant: str) -> None:
    varying = np.array([0.3, 0.1, 0.7, 0.2])
    flat = np.full(4, 0.1)  # 0.1 is not exactly representable: the mean differs from it by rounding
    pred = flat if constant in ("pred", "both") else varying
    true = flat if constant in ("true", "both") else varying
    with pytest.warns(stats.ConstantInputWarning):
        assert math.isnan(stats.pearsonr(pred, true)[0])
    for metric in (m.plcc, m.srcc, m.krcc):
        assert math.isnan(metric(pred, true)), metric.__name__
    result = m.compute_metrics(pred, true, config=m.MetricConfig(bootstrap=50))
    assert math.isnan(result.estimates["plcc"].value)
    assert result.notes, "a NaN correlation must come with a note"
    assert math.isfinite(result.estimates["mae"].value)


def test_nan_labels_are_excluded_and_counted() -> None:
    pred, true = _pair("continuous", 30, seed=1)
    holed = true.copy()
    holed[[0, 5, 9]] = np.nan
    result = m.compute_metrics(pred, holed, config=m.MetricConfig(bootstrap=0))
    keep = np.isfinite(holed)
    assert (result.n, result.n_missing) == (27, 3)
    assert result.estimates["srcc"].value == pytest.approx(stats.spearmanr(pred[keep], true[keep])[0])
    assert math.isnan(result.estimates["srcc"].low)


def test_all_labels_missing_gives_nan_not_crash() -> None:
    result = m.compute_metrics(np.arange(3.0), np.full(3, np.nan))
    assert result.n == 0 and result.n_missing == 3
    assert all(math.isnan(e.value) for e in result.estimates.values())


def test_non_finite_prediction_is_an_error() -> None:
    with pytest.raises(ValueError, match="not finite"):
        m.compute_metrics(np.array([1.0, np.nan]), np.array([1.0, 2.0]))


def test_ordinal_metrics_round_to_nearest_class() -> None:
    classes = (1930.0, 1940.0, 1950.0, 1960.0)
    true = np.array([1930.0, 1940.0, 1950.0, 1960.0, 1960.0])
    pred = np.array([1934.0, 1951.0, 1945.0, 1930.0, 2000.0])
    # nearest classes: 1930 (right), 1950 (1 off), 1940 (1 off, halfway rounds down), 1930 (3 off), 1960 (right)
    assert m.class_accuracy(pred, true, classes) == pytest.approx(2 / 5)
    assert m.class_mae(pred, true, classes) == pytest.approx((0 + 1 + 1 + 3 + 0) / 5)
    result = m.compute_metrics(pred, true, classes=classes, config=m.MetricConfig(bootstrap=20))
    assert set(result.estimates) == set(m.METRICS)
    plain = m.compute_metrics(pred, true, config=m.MetricConfig(bootstrap=0))
    assert "class_acc" not in plain.estimates


@pytest.mark.parametrize("block_elements", [7, 1 << 22])
def test_batched_pair_counts_match_per_resample(block_elements: int) -> None:
    pred, true = _pair("ties", 25, seed=4)
    rng = np.random.default_rng(0)
    index = rng.integers(0, 25, size=(6, 25))
    weights = np.stack([np.bincount(row, minlength=25) for row in index])
    counts = m.pair_counts(pred, true, weights, block_elements=block_elements)
    taus = m.kendall_from_counts(counts)
    accs = m.pair_accuracy_from_counts(counts)
    for b, row in enumerate(index):
        assert taus[b] == pytest.approx(stats.kendalltau(pred[row], true[row])[0], abs=1e-12)
        assert accs[b] == pytest.approx(_brute_pair_accuracy(pred[row], true[row]), abs=1e-12)


def test_bootstrap_interval_is_seeded_and_covers_the_estimate() -> None:
    pred, true = _pair("continuous", 80, seed=2)
    config = m.MetricConfig(bootstrap=300, seed=5, block_elements=1000)
    first = m.compute_metrics(pred, true, config=config)
    again = m.compute_metrics(pred, true, config=config)
    other = m.compute_metrics(pred, true, config=m.MetricConfig(bootstrap=300, seed=6))
    assert first == again
    assert first.estimates["plcc"] != other.estimates["plcc"]
    for name, estimate in first.estimates.items():
        assert estimate.low < estimate.value < estimate.high, name
    # The pair-count path and the gather path must agree on what a resample is: compare with a loop.
    rng = np.random.default_rng(5)
    index = rng.integers(0, 80, size=(300, 80))
    loop = [stats.kendalltau(pred[row], true[row])[0] for row in index]
    assert first.estimates["krcc"].low == pytest.approx(np.percentile(loop, 2.5), abs=1e-12)
    assert first.estimates["krcc"].high == pytest.approx(np.percentile(loop, 97.5), abs=1e-12)


def test_metric_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        m.MetricConfig(bootstrap=-1)
    with pytest.raises(ValueError):
        m.MetricConfig(confidence=1.0)
