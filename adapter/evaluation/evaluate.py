"""Evaluate a trained adapter on one split of a token store: per-query metrics and rankings.

The ground truth each score is compared with is the query's ranking target in the units the
checkpoint predicts in: the label itself for an "identity" target, -|label - reference| for a
"distance" target (the transform is the checkpoint's, so scores and truth always agree).

Every image of the split is scored, with or without a label; images without one appear in the
rankings and are left out of (and counted by) the metrics.

Several checkpoints are the folds of a k-fold protocol: each is evaluated on its own test split and
the metrics are summarised over folds (adapter/evaluation/folds.py). The whole `rankpipe eval` command — files,
exports, report — is adapter/evaluation/command.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rankpipe.adapter.evaluation.metrics import (
    METRICS,
    MetricConfig,
    QueryMetrics,
    compute_metrics,
)
from rankpipe.adapter.evaluation.query_rankings import QueryRanking
from rankpipe.adapter.evaluation.report import ReportSection
from rankpipe.adapter.evaluation.scoring import (
    LoadedCheckpoint,
    check_compatible,
    predict_labels,
)
from rankpipe.adapter.training.targets import transform_target
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import SPLIT_ROLES, LabelSpec, Manifest, SplitSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and how."""

    # Split role to evaluate: "train", "val" or "test" (mapped to split values by the store's manifest).
    split: str = "test"
    # Labels (queries) to evaluate; empty = every checkpoint label the store also has.
    labels: tuple[str, ...] = ()
    # Bootstrap resamples, seed and interval coverage of the metrics.
    metrics: MetricConfig = MetricConfig()
    # Images per adapter forward pass.
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.split not in SPLIT_ROLES:
            raise InputError(f"unknown split {self.split!r}; use one of {', '.join(SPLIT_ROLES)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """The evaluation of one query."""

    # Label name in the store.
    label: str
    # The manifest's metric family of the label: "correlation" or "ordinal".
    family: str
    # Metrics with bootstrap intervals.
    metrics: QueryMetrics
    # Scores and ground truth (target units) of every image of the split.
    ranking: QueryRanking


@dataclasses.dataclass(frozen=True)
class EvalResults:
    """Everything `rankpipe eval` reports."""

    # Where the store and checkpoint were read from.
    store: str
    checkpoint: str
    # Optimiser steps the checkpoint was trained for.
    step: int
    # The split role evaluated and the split values it stands for.
    split: str
    split_values: tuple[str, ...]
    # The configuration of the metrics.
    metric_config: MetricConfig
    # One entry per evaluated query, in order.
    queries: tuple[QueryResult, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain data for results.json; NaN becomes null."""
        return {
            "store": self.store,
            "checkpoint": self.checkpoint,
            "step": self.step,
            "split": self.split,
            "split_values": list(self.split_values),
            "bootstrap": {
                "resamples": self.metric_config.bootstrap,
                "seed": self.metric_config.seed,
                "confidence": self.metric_config.confidence,
            },
            "queries": [
                {
                    "label": q.label,
                    "query": q.ranking.query,
                    "family": q.family,
                    "n": q.metrics.n,
                    "n_missing_label": q.metrics.n_missing,
                    "metrics": {
                        name: {"value": json_float(e.value), "low": json_float(e.low), "high": json_float(e.high)}
                        for name, e in q.metrics.estimates.items()
                    },
                    "notes": list(q.metrics.notes),
                }
                for q in self.queries
            ],
        }


def select_labels(loaded: LoadedCheckpoint, store, requested: Sequence[str]) -> list[str]:
    """The labels to evaluate: the requested ones, or every checkpoint label the store has.

    Raises:
        InputError: an unlabelled store, a requested label unknown to the checkpoint or the store, or
            no label shared.
    """
    if not store.label_names:
        raise InputError(
            f"store {store.path} holds an unlabelled collection: there is no ground truth to evaluate against; "
            "rank it with rankpipe rank --store, or evaluate on a store embedded from labelled shards"
        )
    for name in requested:
        if name not in loaded.labels:
            raise InputError(f"checkpoint {loaded.path} was not trained on label {name!r}; its labels are {', '.join(loaded.labels)}")
        if name not in store.label_names:
            raise InputError(f"store {store.path} has no label {name!r} to evaluate against; its labels are {', '.join(store.label_names)}")
    if requested:
        return list(dict.fromkeys(requested))
    shared = [name for name in loaded.labels if name in store.label_names]
    if not shared:
        raise InputError(
            f"store {store.path} has none of the labels checkpoint {loaded.path} was trained on "
            f"({', '.join(loaded.labels)}); evaluate on a store that carries them"
        )
    return shared


def split_rows(store, role: str, splits: SplitSpec | None = None) -> tuple[tuple[str, ...], np.ndarray]:
    """The split values of a role and the store rows of its valid images (labelled or not).

    Args:
        store: an open TokenStore.
        role: "train", "val" or "test".
        splits: the split roles to use; None = the store manifest's.

    Raises:
        InputError: the split has no valid image in the store.
    """
    values = tuple((splits or store.manifest.splits).values(role))
    rows = np.asarray(store.rows(list(values)), dtype=np.int64)
    if len(rows) == 0:
        raise InputError(
            f"store {store.path} has no valid image in split {role!r} (split values {', '.join(values)}); "
            "pick another --split or map split values in the manifest"
        )
    return values, rows


def evaluate(
    loaded: LoadedCheckpoint, store, config: EvalConfig = EvalConfig(), manifest: Manifest | None = None
) -> EvalResults:
    """Score every image of a split with each query and compute the metrics.

    Args:
        loaded: a checkpoint from `load_checkpoint`.
        store: an open TokenStore embedded with the checkpoint's backbone.
        config: split, labels, metric and batch settings.
        manifest: split roles and metric families to evaluate with; None = the store's manifest.

    Raises:
        InputError: store and checkpoint from different backbones, an unknown label, an empty split,
            or a manifest whose labels do not match the store's.
    """
    manifest = manifest or store.manifest
    check_compatible(loaded.provenance, store, f"checkpoint {loaded.path}")
    labels = select_labels(loaded, store, config.labels)
    specs = {name: _label_spec(manifest, store, name) for name in labels}
    values, rows = split_rows(store, config.split, manifest.splits)
    note = store.invalid_note()
    if note:
        log.warning(note)
    keys = np.asarray(store.keys(), dtype=str)[rows]
    splits = np.asarray(store.splits(), dtype=str)[rows]
    queries = []
    all_scores = predict_labels(loaded, store, labels, rows, batch_size=config.batch_size)  # reads each row once
    for name in labels:
        spec = specs[name]
        transform = loaded.labels[name].scale.transform
        truth = transform_target(np.asarray(store.label(name), dtype=np.float64)[rows], transform)
        scores = all_scores[name]
        # Class metrics compare classes of the label itself, which a distance target no longer is.
        classes = spec.classes if spec.metric == "ordinal" and transform.kind == "identity" else None
        metrics = compute_metrics(scores, truth, classes=classes, config=config.metrics)
        notes = _class_notes(truth, classes)
        if notes:
            metrics = dataclasses.replace(metrics, notes=metrics.notes + notes)
        ranking = QueryRanking(loaded.labels[name].query, keys, scores, truth, splits)
        queries.append(QueryResult(name, spec.metric, metrics, ranking))
        log.info("%s: n=%d, %d without label", name, metrics.n, metrics.n_missing)
    return EvalResults(
        store=str(store.path), checkpoint=str(loaded.path), step=loaded.step, split=config.split,
        split_values=values, metric_config=config.metrics, queries=tuple(queries),
    )


def results_table(results: EvalResults) -> tuple[list[str], list[list[str]]]:
    """The metrics table as text cells: one row per query, 'value [low, high]' per metric."""
    shown = [name for name in METRICS if any(name in q.metrics.estimates for q in results.queries)]
    header = ["label", "query", "n (no label)"] + [METRICS[name][0] for name in shown]
    rows = []
    for q in results.queries:
        row = [q.label, q.ranking.query, f"{q.metrics.n} ({q.metrics.n_missing})"]
        for name in shown:
            e = q.metrics.estimates.get(name)
            row.append("—" if e is None else _cell(e.value, e.low, e.high, name))
        rows.append(row)
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table with columns padded to line up in a terminal."""
    cells = [list(header)] + [[c.replace("|", "\\|") for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def results_text(results: EvalResults) -> str:
    """What the terminal shows: the metrics table, then one line per note."""
    notes = [f"note ({q.label}): {note}" for q in results.queries for note in q.metrics.notes]
    return "\n".join([markdown_table(*results_table(results)), *notes])


def results_markdown(results: EvalResults) -> str:
    """results.md: a heading naming checkpoint, store and split, the table, and the notes."""
    header, rows = results_table(results)
    interval = (
        f"{results.metric_config.confidence:.0%} bootstrap intervals from {results.metric_config.bootstrap} "
        f"resamples (seed {results.metric_config.seed})"
        if results.metric_config.bootstrap else "no bootstrap intervals"
    )
    lines = [
        f"# Evaluation on split `{results.split}`",
        "",
        f"Checkpoint `{results.checkpoint}` (step {results.step}), store `{results.store}`; {interval}.",
        "",
        markdown_table(header, rows),
    ]
    notes = [f"- {q.label}: {note}" for q in results.queries for note in q.metrics.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_results(results: EvalResults, out_dir: str | Path) -> tuple[Path, Path]:
    """Write results.json and results.md into out_dir; returns their paths."""
    return write_result_files(results.to_dict(), results_markdown(results), out_dir)


def write_result_files(data: dict[str, Any], markdown: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `data` as results.json and `markdown` as results.md into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown, encoding="utf-8")
    return json_path, md_path


def _label_spec(manifest: Manifest, store, name: str) -> LabelSpec:
    """The manifest's spec of a label, refused when it asks another query than the store embedded."""
    spec = manifest.label(name)
    if manifest is not store.manifest and spec.query != store.manifest.label(name).query:
        raise InputError(
            f"manifest {manifest.path or manifest.name} asks {spec.query!r} for label {name!r} but store "
            f"{store.path} embedded {store.manifest.label(name).query!r}; use a manifest with the store's queries"
        )
    return spec


def _class_notes(truth: np.ndarray, classes: Sequence[float] | None) -> tuple[str, ...]:
    if classes is None:
        return ()
    labelled = truth[np.isfinite(truth)]
    off = int(np.sum(~np.isin(labelled, np.asarray(classes, dtype=np.float64))))
    return (f"{off} label(s) are not class values; class metrics use their nearest class",) if off else ()


def metric_text(value: float, name: str) -> str:
    """One metric value as the tables show it: MAE to 4 significant digits, the others to 3 decimals."""
    return f"{value:.4g}" if name == "mae" else f"{value:.3f}"


def json_float(value: float) -> float | None:
    """A metric value for JSON: NaN becomes None."""
    return None if math.isnan(value) else float(value)


def _cell(value: float, low: float, high: float, name: str) -> str:
    if math.isnan(value):
        return "NaN"
    text = metric_text(value, name)
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{metric_text(low, name)}, {metric_text(high, name)}]"
    return text


def report_sections(results: EvalResults, prefix: str = "") -> list[ReportSection]:
    """One report section per query: its headline metrics, scatter plot and contact sheets.

    Args:
        results: one checkpoint's evaluation.
        prefix: put before each section title (e.g. the fold).
    """
    sections = []
    for q in results.queries:
        headline = [
            f"{METRICS[name][0]} {_cell(e.value, e.low, e.high, name)}" for name, e in q.metrics.estimates.items()
        ]
        summary = f"{q.metrics.n} labelled images ({q.metrics.n_missing} without label). " + " · ".join(headline)
        sections.append(ReportSection(prefix + q.label, q.ranking, summary, q.metrics.notes))
    return sections
