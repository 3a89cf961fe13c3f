"""k-fold evaluation: each fold's checkpoint on its own split, and mean ± std of every metric over folds.

A k-fold protocol (Adience's five folds) trains one checkpoint per fold, each testing on another part
of the same store. Each checkpoint is evaluated exactly as a single one would be, on the split roles
of its fold: the manifest given for it, or else the split roles recorded in the checkpoint when it
was trained. Per query and metric the summary is the mean over folds and the sample standard
deviation (ddof=1: the spread of the fold estimates, as k-fold results are reported). A fold where a
metric is undefined (NaN, e.g. a constant prediction) is left out of that metric's mean and std,
and the number of folds used is kept beside them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankpipe.adapter.evaluation.evaluate import (
    EvalConfig,
    EvalResults,
    evaluate,
    json_float,
    markdown_table,
    metric_text,
    report_sections,
    results_markdown,
    write_result_files,
)
from rankpipe.adapter.evaluation.metrics import METRICS
from rankpipe.adapter.evaluation.query_rankings import QueryRanking
from rankpipe.adapter.evaluation.report import ReportConfig, write_report
from rankpipe.adapter.evaluation.scoring import LoadedCheckpoint, payload_splits
from rankpipe.adapter.training.checkpoint import read_checkpoint
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import Manifest, SplitSpec

log = logging.getLogger(__name__)

# Degrees of freedom removed from the standard deviation over folds (1 = sample standard deviation).
STD_DDOF = 1


@dataclasses.dataclass(frozen=True)
class FoldStat:
    """One metric of one query summarised over folds."""

    # The metric in each fold that evaluated the query, in fold order; NaN where it is undefined.
    values: tuple[float, ...]
    # Mean over the finite values; NaN when there is none.
    mean: float
    # Standard deviation (ddof = STD_DDOF) over the finite values; NaN with fewer than two.
    std: float

    @property
    def n_folds(self) -> int:
        """Folds whose value entered the mean and std."""
        return int(np.isfinite(np.asarray(self.values, dtype=np.float64)).sum())


@dataclasses.dataclass(frozen=True)
class QuerySummary:
    """One query over the folds that evaluated it."""

    # Label name, query sentence and metric family (as in each fold's results).
    label: str
    query: str
    family: str
    # Indices of the folds that evaluated the query.
    folds: tuple[int, ...]
    # Labelled images and images without a label, summed over those folds.
    n: int
    n_missing: int
    # Every metric any of those folds computed, by name.
    metrics: dict[str, FoldStat]


@dataclasses.dataclass(frozen=True)
class FoldResults:
    """Everything a k-fold `rankpipe eval` reports."""

    # One evaluation per checkpoint, in the order given (fold i is folds[i]).
    folds: tuple[EvalResults, ...]
    # Mean ± std over folds, one entry per query.
    summary: tuple[QuerySummary, ...]

    def rankings(self) -> list[QueryRanking]:
        """Every fold's rankings, each carrying its fold index (the exports' `fold` column)."""
        return [dataclasses.replace(q.ranking, fold=i) for i, fold in enumerate(self.folds) for q in fold.queries]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for results.json: a "folds" section and a "summary" section; NaN becomes null."""
        return {
            "folds": [{"fold": i, **fold.to_dict()} for i, fold in enumerate(self.folds)],
            "summary": {
                "folds": len(self.folds),
                "std_ddof": STD_DDOF,
                "queries": [
                    {
                        "label": s.label, "query": s.query, "family": s.family, "folds": list(s.folds),
                        "n": s.n, "n_missing_label": s.n_missing,
                        "metrics": {
                            name: {
                                "mean": json_float(stat.mean), "std": json_float(stat.std),
                                "n_folds": stat.n_folds, "values": [json_float(v) for v in stat.values],
                            }
                            for name, stat in s.metrics.items()
                        },
                    }
                    for s in self.summary
                ],
            },
        }


def fold_stat(values: Sequence[float]) -> FoldStat:
    """Mean and standard deviation (ddof = STD_DDOF) of the finite per-fold values."""
    values = tuple(float(v) for v in values)
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    mean = float(finite.mean()) if len(finite) else math.nan
    std = float(finite.std(ddof=STD_DDOF)) if len(finite) > STD_DDOF else math.nan
    return FoldStat(values, mean, std)


def summarise_folds(folds: Sequence[EvalResults]) -> tuple[QuerySummary, ...]:
    """Per query (in order of first appearance), every metric's mean ± std over the folds that evaluated it."""
    by_label: dict[str, list[tuple[int, Any]]] = {}
    for i, fold in enumerate(folds):
        for q in fold.queries:
            by_label.setdefault(q.label, []).append((i, q))
    out = []
    for label, entries in by_label.items():
        first = entries[0][1]
        names = [name for name in METRICS if any(name in q.metrics.estimates for _, q in entries)]
        metrics = {
            name: fold_stat([q.metrics.estimates[name].value if name in q.metrics.estimates else math.nan for _, q in entries])
            for name in names
        }
        out.append(QuerySummary(
            label=label, query=first.ranking.query, family=first.family, folds=tuple(i for i, _ in entries),
            n=sum(q.metrics.n for _, q in entries), n_missing=sum(q.metrics.n_missing for _, q in entries),
            metrics=metrics,
        ))
    return tuple(out)


def recorded_splits(path: str | Path) -> SplitSpec | None:
    """The split roles a checkpoint was trained with, or None when it does not record them."""
    return payload_splits(read_checkpoint(path))


def fold_manifest(store, loaded: LoadedCheckpoint, manifest: Manifest | None) -> Manifest:
    """The manifest a fold is evaluated with: the one given, or the store's with the checkpoint's split roles.

    Raises:
        InputError: no manifest is given and the checkpoint does not record its split roles.
    """
    if manifest is not None:
        return manifest
    if loaded.splits is None:
        raise InputError(
            f"checkpoint {loaded.path} does not record the split roles it was trained with; "
            "pass one --manifest per --checkpoint to say each fold's splits"
        )
    return dataclasses.replace(store.manifest, splits=loaded.splits)


def evaluate_folds(
    loaded: Sequence[LoadedCheckpoint],
    store,
    config: EvalConfig = EvalConfig(),
    manifests: Sequence[Manifest] | None = None,
) -> FoldResults:
    """Evaluate each fold's checkpoint on its own split of one store and summarise over folds.

    Args:
        loaded: one checkpoint per fold, from `load_checkpoint`.
        store: an open TokenStore embedded with the checkpoints' backbone.
        config: split role, labels, metric and batch settings, the same for every fold.
        manifests: one per checkpoint giving its split roles; None = the roles each recorded in training.

    Raises:
        InputError: a manifest count that does not match, a checkpoint without recorded split roles
            and no manifest, or any error of `evaluate` for one fold (named by its checkpoint).
    """
    if manifests is not None and len(manifests) != len(loaded):
        raise InputError(f"got {len(loaded)} checkpoints and {len(manifests)} manifests; pass one manifest per checkpoint")
    chosen = [fold_manifest(store, ckpt, manifests[i] if manifests else None) for i, ckpt in enumerate(loaded)]
    _warn_on_shared_splits([m.splits.values(config.split) for m in chosen], config.split)
    folds = tuple(evaluate(ckpt, store, config, manifest) for ckpt, manifest in zip(loaded, chosen))
    return FoldResults(folds, summarise_folds(folds))


def summary_table(results: FoldResults) -> tuple[list[str], list[list[str]]]:
    """The summary as text cells: one row per query, 'mean ± std' per metric."""
    shown = [name for name in METRICS if any(name in s.metrics for s in results.summary)]
    header = ["label", "query", "folds", "n (no label)"] + [METRICS[name][0] for name in shown]
    rows = []
    for s in results.summary:
        row = [s.label, s.query, str(len(s.folds)), f"{s.n} ({s.n_missing})"]
        row += ["—" if name not in s.metrics else _stat_cell(s.metrics[name], len(s.folds), name) for name in shown]
        rows.append(row)
    return header, rows


def folds_markdown(results: FoldResults) -> str:
    """results.md of a k-fold evaluation: the summary table, then each fold's results."""
    k = len(results.folds)
    lines = [
        f"# Mean ± std over {k} folds",
        "",
        f"Standard deviation with ddof={STD_DDOF} over the folds where a metric is defined "
        "(the count is shown when a fold is missing); n sums the folds.",
        "",
        markdown_table(*summary_table(results)),
    ]
    for i, fold in enumerate(results.folds):
        body = results_markdown(fold).rstrip("\n").split("\n")
        lines += ["", f"## Fold {i}: split `{fold.split}` ({', '.join(fold.split_values)})", *body[1:]]
    return "\n".join(lines) + "\n"


def write_fold_results(results: FoldResults, out_dir: str | Path) -> tuple[Path, Path]:
    """Write results.json and results.md of a k-fold evaluation into out_dir; returns their paths."""
    return write_result_files(results.to_dict(), folds_markdown(results), out_dir)


def write_fold_report(results: FoldResults, tar_urls: Sequence[str], out_dir: Path, config: ReportConfig) -> Path:
    """The HTML report of a k-fold evaluation: the summary table, then each fold's query sections."""
    header, rows = summary_table(results)
    sections = [s for i, fold in enumerate(results.folds) for s in report_sections(fold, prefix=f"fold {i}: ")]
    first = results.folds[0]
    details = [
        (f"fold {i}", f"{fold.checkpoint} (step {fold.step}), split {fold.split} ({', '.join(fold.split_values)})")
        for i, fold in enumerate(results.folds)
    ]
    details += [
        ("store", first.store),
        ("summary", f"mean ± std (ddof={STD_DDOF}) over {len(results.folds)} folds"),
        ("intervals", f"{first.metric_config.confidence:.0%} bootstrap, {first.metric_config.bootstrap} resamples"),
    ]
    title = f"rankpipe evaluation: {first.split}, {len(results.folds)} folds"
    return write_report(out_dir, title, header, rows, sections, tar_urls, config, details)


def _warn_on_shared_splits(values: Sequence[Sequence[str]], role: str) -> None:
    # Folds that evaluate on the same images are not independent; the summary would overstate them.
    seen: dict[str, int] = {}
    for i, fold_values in enumerate(values):
        for value in fold_values:
            if value in seen:
                log.warning("folds %d and %d both evaluate split value %r as %s", seen[value], i, value, role)
            seen.setdefault(value, i)


def _stat_cell(stat: FoldStat, folds: int, name: str) -> str:
    if math.isnan(stat.mean):
        return "NaN"
    text = metric_text(stat.mean, name)
    if not math.isnan(stat.std):
        text += f" ± {metric_text(stat.std, name)}"
    if stat.n_folds < folds:
        text += f" ({stat.n_folds} of {folds} folds)"
    return text
