"""The bench's evidence: bootstrap intervals, paired differences, the query matrix and learning curves,
checked against direct computations on synthetic scores whose truth is known."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy import stats

from rankpipe.adapter.experiments.bench.bootstrap import (
    BETTER,
    SAME,
    WORSE,
    BootstrapConfig,
    Estimate,
    Run,
    paired_difference,
    pearson,
    row_estimate,
    spearman,
    verdict,
)
from rankpipe.adapter.experiments.bench.compare import _verdict, compare_rows, summary_lines
from rankpipe.adapter.experiments.bench.curves import curves_markdown, mean_curve, plot_curves, read_curve
from rankpipe.adapter.experiments.bench.query_matrix import truth_matrix, variant_matrix
from rankpipe.adapter.experiments.bench.runs import RunScores

N = 300
CONFIG = BootstrapConfig(resamples=400, seed=1)


def noisy_runs(truth: np.ndarray, noise: float, seeds: int, offset: int) -> list[Run]:
    """Runs whose scores are the truth plus Gaussian noise: less noise, higher SRCC."""
    return [Run(truth + noise * np.random.default_rng(offset + s).normal(size=len(truth)), truth) for s in range(seeds)]


@pytest.fixture
def truth() -> np.ndarray:
    return np.random.default_rng(0).normal(size=N)


def test_vectorised_correlations_match_scipy(truth):
    scores = truth + np.random.default_rng(1).normal(size=N)
    assert spearman(scores, truth) == pytest.approx(stats.spearmanr(scores, truth).statistic, abs=1e-12)
    assert pearson(scores, truth) == pytest.approx(stats.pearsonr(scores, truth).statistic, abs=1e-12)
    ties = np.round(scores)  # average ranks for ties, as scipy
    assert spearman(ties, truth) == pytest.approx(stats.spearmanr(ties, truth).statistic, abs=1e-12)
    batch = np.stack([scores, -scores])  # (2, N): one value per leading index
    np.testing.assert_allclose(spearman(batch, np.broadcast_to(truth, batch.shape)),
                               [stats.spearmanr(scores, truth).statistic, -stats.spearmanr(scores, truth).statistic])
    assert spearman(np.ones(N), truth) == 0.0  # a constant ranking carries no order


def test_row_estimate_is_the_mean_over_seeds_and_its_interval_contains_it(truth):
    runs = noisy_runs(truth, 1.0, seeds=3, offset=10)
    estimate = row_estimate(runs, "srcc", CONFIG)
    direct = np.mean([stats.spearmanr(run.scores, run.truth).statistic for run in runs])
    assert estimate.value == pytest.approx(direct, abs=1e-12)
    assert estimate.low < estimate.value < estimate.high
    assert estimate.high - estimate.low < 0.2  # 300 images pin a correlation of about 0.7 to within ±0.1
    assert row_estimate(runs, "srcc", CONFIG) == estimate  # seeded: the same interval every time


def test_interval_matches_a_direct_paired_bootstrap(truth):
    """scipy's percentile interval agrees with a plain loop resampling images once for both rows."""
    runs, reference = noisy_runs(truth, 0.5, 2, 20), noisy_runs(truth, 1.0, 2, 30)
    estimate = paired_difference(runs, reference, "srcc", BootstrapConfig(resamples=1000, seed=3))
    rng = np.random.default_rng(99)
    differences = []
    for _ in range(1000):
        i = rng.integers(0, N, N)
        mine = np.mean([stats.spearmanr(r.scores[i], r.truth[i]).statistic for r in runs])
        theirs = np.mean([stats.spearmanr(r.scores[i], r.truth[i]).statistic for r in reference])
        differences.append(mine - theirs)
    low, high = np.percentile(differences, [2.5, 97.5])
    assert estimate.low == pytest.approx(low, abs=0.02) and estimate.high == pytest.approx(high, abs=0.02)


def test_a_clearly_better_row_is_better_and_the_reference_worse_against_it(truth):
    better, reference = noisy_runs(truth, 0.3, 2, 40), noisy_runs(truth, 1.5, 2, 50)
    difference = paired_difference(better, reference, "srcc", CONFIG)
    direct = (np.mean([stats.spearmanr(r.scores, r.truth).statistic for r in better])
              - np.mean([stats.spearmanr(r.scores, r.truth).statistic for r in reference]))
    assert difference.value == pytest.approx(direct, abs=1e-12) and difference.low > 0
    assert verdict(difference) == BETTER
    assert verdict(paired_difference(reference, better, "plcc", CONFIG)) == WORSE


def test_identical_rows_tie_with_a_zero_interval(truth):
    runs = noisy_runs(truth, 1.0, 2, 60)
    difference = paired_difference(runs, list(runs), "srcc", CONFIG)
    assert difference.value == 0.0
    # Every resample differs by 0: scipy's percentile interval is [0, 0], or NaN where a scipy release
    # calls the degenerate bootstrap distribution undefined. Either way the rows do not differ.
    interval = (difference.low, difference.high)
    assert interval == (0.0, 0.0) or np.isnan(interval).all(), interval
    assert verdict(difference) == SAME
    assert _verdict(difference) == SAME


def test_a_zero_difference_without_an_interval_is_no_difference():
    assert _verdict(Estimate(0.0, float("nan"), float("nan"))) == SAME
    # A difference that is not 0 cannot be judged without its interval; too few images give no value.
    assert _verdict(Estimate(0.1, float("nan"), float("nan"))) is None
    assert _verdict(Estimate(float("nan"), float("nan"), float("nan"))) is None
    assert _verdict(None) is None


def test_pairing_sees_a_small_consistent_gain_that_separate_intervals_miss(truth):
    """Both rows share most of their noise; the gain is small against it, but the same on every image."""
    shared = 1.0 * np.random.default_rng(70).normal(size=N)
    gain = 0.15 * np.random.default_rng(71).normal(size=N)
    base = [Run(truth + shared + gain, truth)]
    improved = [Run(truth + 0.8 * shared + gain, truth)]
    a, b = row_estimate(improved, "srcc", CONFIG), row_estimate(base, "srcc", CONFIG)
    assert a.low < b.high  # the separate intervals overlap …
    assert verdict(paired_difference(improved, base, "srcc", CONFIG)) == BETTER  # … the paired one does not


def test_images_without_a_label_are_left_out(truth):
    labelled = truth.copy()
    labelled[::3] = np.nan
    runs = [Run(run.scores, labelled) for run in noisy_runs(truth, 1.0, 2, 80)]
    keep = np.isfinite(labelled)
    direct = np.mean([stats.spearmanr(run.scores[keep], truth[keep]).statistic for run in runs])
    assert row_estimate(runs, "srcc", CONFIG).value == pytest.approx(direct, abs=1e-12)


def test_compare_rows_counts_wins_ties_and_losses(truth):
    rows = np.arange(N)

    def scores(noise: dict[str, float], seed: int) -> RunScores:
        made = {label: truth + level * np.random.default_rng([seed, i]).normal(size=N)
                for i, (label, level) in enumerate(noise.items())}
        return RunScores(rows, made, {label: truth for label in noise})

    runs = {("ref", s): scores({"a": 1.0, "b": 0.3, "c": 1.0}, s) for s in range(2)}
    runs |= {("new", s): scores({"a": 0.3, "b": 1.5, "c": 1.0}, s + 10) for s in range(2)}
    runs[("new", 0)].scores["c"][:] = runs[("ref", 0)].scores["c"]  # the same scores on c: a tie
    runs[("new", 1)].scores["c"][:] = runs[("ref", 1)].scores["c"]
    table = compare_rows(runs, {"a": False, "b": False, "c": True}, ["ref", "new"], "ref", "srcc", CONFIG)
    verdicts = {(row.label, row.variant): row.verdict for row in table}
    assert verdicts == {("a", "ref"): None, ("a", "new"): BETTER, ("b", "ref"): None, ("b", "new"): WORSE,
                        ("c", "ref"): None, ("c", "new"): SAME}
    assert all(row.n == N and row.seeds == 2 for row in table)
    assert summary_lines(table, ["ref", "new"], "ref") == [
        "- `new` vs `ref`: 1 better, 1 no difference, 1 worse (of 3 queries)"]


def test_n_counts_the_images_the_estimates_use(truth):
    rows = np.arange(N)

    def scores(seed: int, unlabelled: list[int]) -> RunScores:
        labels = truth.copy()
        labels[unlabelled] = np.nan
        return RunScores(rows, {"a": truth + np.random.default_rng(seed).normal(size=N)}, {"a": labels})

    # The first run of `new` has every label; its second lacks image 0 and the reference lacks image 1.
    runs = {("new", 0): scores(0, []), ("new", 1): scores(1, [0]), ("ref", 0): scores(2, [1])}
    table = {row.variant: row for row in compare_rows(runs, {"a": False}, ["ref", "new"], "ref", "srcc", CONFIG)}
    assert table["ref"].n == N - 1
    assert table["new"].n == N - 2  # Δ is resampled over the images labelled in all three runs
    mask = np.isfinite(runs[("new", 1)].truth["a"]) & np.isfinite(runs[("ref", 0)].truth["a"])
    direct = np.mean([stats.spearmanr(runs[("new", s)].scores["a"][mask], truth[mask]).statistic for s in (0, 1)])
    direct -= stats.spearmanr(runs[("ref", 0)].scores["a"][mask], truth[mask]).statistic
    assert table["new"].difference.value == pytest.approx(direct, abs=1e-12)


def test_query_matrix_diagonal_dominates_only_when_the_query_steers():
    rng = np.random.default_rng(5)
    labels = {name: rng.normal(size=200) for name in ("blur", "brightness", "count")}
    rows = np.arange(200)
    steered = RunScores(rows, {name: values + 0.5 * rng.normal(size=200) for name, values in labels.items()}, {})
    blind_scores = labels["brightness"] + 0.5 * rng.normal(size=200)
    blind = RunScores(rows, {name: blind_scores for name in labels}, {})  # every query ranks alike

    matrix = variant_matrix("steered", [steered], labels)
    for i, query in enumerate(matrix.labels):
        for j, label in enumerate(matrix.labels):
            assert matrix.srcc[i, j] == pytest.approx(stats.spearmanr(steered.scores[query], labels[label]).statistic)
    off = np.abs(matrix.srcc[~np.eye(3, dtype=bool)])
    assert matrix.dominance == pytest.approx(np.diag(matrix.srcc).mean() - off.mean())
    assert matrix.dominance > 0.7
    flat = variant_matrix("blind", [blind], labels)
    assert np.allclose(flat.srcc, flat.srcc[0])  # every row the same: the text changes nothing
    assert flat.dominance < 0.3

    truth = truth_matrix(labels, matrix.labels)
    np.testing.assert_allclose(np.diag(truth.srcc), 1.0)
    assert truth.srcc[0, 1] == pytest.approx(stats.spearmanr(labels["blur"], labels["brightness"]).statistic)


def test_query_matrix_uses_only_images_with_the_label():
    rng = np.random.default_rng(6)
    blur = rng.normal(size=50)
    count = np.where(np.arange(50) < 20, np.nan, rng.normal(size=50))
    run = RunScores(np.arange(50), {"blur": blur, "count": np.nan_to_num(count)}, {})
    matrix = variant_matrix("v", [run], {"blur": blur, "count": count})
    has = np.isfinite(count)
    assert matrix.srcc[0, 1] == pytest.approx(stats.spearmanr(blur[has], count[has]).statistic)


def test_learning_curves_read_history_and_plot(tmp_path):
    histories = {0: [(10, 0.1), (20, 0.3), (30, 0.4)], 1: [(20, 0.5), (10, 0.2), (30, 0.6)]}
    curves = []
    for seed, points in histories.items():
        path = tmp_path / f"history{seed}.jsonl"
        path.write_text("".join(json.dumps({"step": s, "mean_val_srcc": v, "loss": 1.0}) + "\n" for s, v in points))
        curves.append(read_curve("default", seed, path))
    assert curves[1].steps == (10, 20, 30) and curves[1].mean_srcc == (0.2, 0.5, 0.6)  # sorted by step
    steps, means = mean_curve(curves)
    assert steps == [10, 20, 30] and means == pytest.approx([0.15, 0.4, 0.5])
    table = curves_markdown(curves)
    assert re.search(r"\| default +\| 0\.150 +\| 0\.400 +\| 0\.500 +\|", table), table
    plot_curves(curves, tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
