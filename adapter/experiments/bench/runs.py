"""Evaluating one bench run: its trained queries, and held-out queries it never trained on.

Trained queries go through `rankpipe.adapter.evaluation.evaluate` (scores in label units, so MAE means
something). A held-out counting query is scored with its text tokens from the token store; those
scores stay in the adapter's normalised units, since the label was never normalised in training, so
only the rank and linear correlations (SRCC, KRCC, PLCC) are kept for it.

Every query's scores of every test image, and the truth they were compared with, are kept beside
the run's metrics in SCORES_FILE: the bench's intervals, paired comparisons and query matrix are
computed from them, and need neither the checkpoint nor another forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankpipe.adapter.evaluation.evaluate import EvalConfig, evaluate, split_rows
from rankpipe.adapter.evaluation.metrics import (
    MetricConfig,
    QueryMetrics,
    compute_metrics,
)
from rankpipe.adapter.evaluation.scoring import (
    check_compatible,
    query_tokens,
    store_scores,
)
from rankpipe.adapter.experiments.bench.table import BENCH_METRICS
from rankpipe.files import atomic_target

# Point estimates per run: intervals come later, from the saved scores of all seeds together.
NO_BOOTSTRAP = MetricConfig(bootstrap=0)
SCORES_FILE = "scores.npz"


@dataclasses.dataclass(frozen=True)
class RunScores:
    """One run's scores on its evaluation split."""

    # (N,) store rows of the split's images, in the order of every array below.
    rows: np.ndarray
    # Label -> (N,) scores under its query, higher = ranked higher.
    scores: dict[str, np.ndarray]
    # Label -> (N,) the truth its metrics compare with (target units; NaN where unlabelled).
    truth: dict[str, np.ndarray]

    def save(self, path: Path) -> None:
        arrays = {"rows": self.rows}
        for label in self.scores:
            arrays[f"score/{label}"] = self.scores[label]
            arrays[f"truth/{label}"] = self.truth[label]
        with atomic_target(path) as target, open(target, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> RunScores:
        with np.load(path) as data:
            labels = [key.split("/", 1)[1] for key in data.files if key.startswith("score/")]
            return cls(data["rows"], {label: data[f"score/{label}"] for label in labels},
                       {label: data[f"truth/{label}"] for label in labels})


def evaluate_run(loaded, store, unseen: Sequence[str], split: str = "test",
                 batch_size: int = 256) -> tuple[list[dict], RunScores]:
    """Metrics records of a checkpoint on a split: every trained label, then each label of `unseen`.

    Args:
        loaded: an adapter checkpoint from `load_checkpoint`.
        store: the TokenStore it was trained on.
        unseen: labels of the store the checkpoint was not trained on.
        split: split role to evaluate.
        batch_size: images per forward pass.

    Returns:
        One dict per query: label, query, unseen, n (labelled images) and metrics {srcc, plcc, krcc, mae}
        (None where undefined; MAE always None for an unseen query); and the scores of every query.
    """
    results = evaluate(loaded, store, EvalConfig(split=split, metrics=NO_BOOTSTRAP, batch_size=batch_size))
    queries = [_query_record(q.label, q.ranking.query, False, q.metrics) for q in results.queries]
    scores = {q.label: np.asarray(q.ranking.scores, dtype=np.float64) for q in results.queries}
    truths = {q.label: np.asarray(q.ranking.labels, dtype=np.float64) for q in results.queries}
    _, rows = split_rows(store, split)
    for name in unseen:
        truths[name] = np.asarray(store.label(name), dtype=np.float64)[rows]
        scores[name] = score_unseen(loaded, store, name, rows, batch_size)
        metrics = compute_metrics(scores[name], truths[name], config=NO_BOOTSTRAP)
        queries.append(_query_record(name, store.query(name), True, metrics))
    return queries, RunScores(rows, scores, truths)


def score_unseen(loaded, store, label: str, rows: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Regression scores of the images at `rows` for a query the adapter was not trained on.

    The query's text tokens come from the store (up to and including end-of-text, as training uses
    them); the scores stay in the adapter's normalised units, since the label was never normalised.

    Args:
        loaded: an adapter checkpoint from `load_checkpoint`.
        store: a TokenStore of the checkpoint's backbone that has `label`.
        label: the label whose query to score by.
        rows: [n] store rows.
        batch_size: images per forward pass.

    Returns:
        [n] float64 scores, higher = ranked higher by the query.
    """
    check_compatible(loaded.provenance, store, f"checkpoint {loaded.path}")
    query = loaded.ranker.unseen_query(store.query(label), query_tokens(store.text(label), loaded.device))  # [L, Dt] tokens
    return store_scores(loaded.ranker, store, [query], rows, batch_size)[query.sentence]


def _query_record(label: str, query: str, unseen: bool, metrics: QueryMetrics) -> dict:
    values = {}
    for name in BENCH_METRICS:
        estimate = metrics.estimates.get(name)
        value = None if estimate is None or unseen and name == "mae" else estimate.value
        values[name] = None if value is None or not np.isfinite(value) else float(value)
    return {"label": label, "query": query, "unseen": unseen, "n": metrics.n, "metrics": values}
