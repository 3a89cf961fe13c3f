"""The whole `rankpipe eval` command as one library call: evaluate one checkpoint or k folds, then write
results, ranking exports and the report; nothing is written unless every input checks out."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from rankpipe.adapter.evaluation import folds
from rankpipe.adapter.evaluation.evaluate import (
    EvalConfig,
    EvalResults,
    evaluate,
    report_sections,
    results_table,
    results_text,
    write_results,
)
from rankpipe.adapter.evaluation.exports import export_format
from rankpipe.adapter.evaluation.query_rankings import write_rankings
from rankpipe.adapter.evaluation.report import ReportConfig, write_report
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.devices import torch_device_for
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """One `rankpipe eval` run: inputs, settings and where each output goes."""

    # The token store and the checkpoint (a .pt file or a run folder meaning its best.pt).
    store: Path
    checkpoint: Path
    # Split, labels, bootstrap and batch settings.
    config: EvalConfig = EvalConfig()
    # Folder for results.json and results.md; None = the checkpoint's folder.
    out_dir: Path | None = None
    # Ranking files to write; the suffix picks the format (.csv, .jsonl, .h5).
    exports: tuple[Path, ...] = ()
    # Folder of the HTML report; None = no report.
    report_dir: Path | None = None
    # Contents and sizes of the report.
    report: ReportConfig = ReportConfig()
    # Where the adapter runs: "cpu" or "cuda[:i]".
    device: str = "cpu"
    # Checkpoints of the further folds of a k-fold protocol (the first fold's is `checkpoint`); with any,
    # each fold is evaluated on its own split and the metrics are summarised as mean ± std over folds.
    fold_checkpoints: tuple[Path, ...] = ()
    # Manifests giving the split roles of each checkpoint, paired in order with `checkpoints`; empty =
    # the store's manifest for one checkpoint, the split roles each fold was trained with for several.
    manifests: tuple[Path, ...] = ()

    @property
    def checkpoints(self) -> tuple[Path, ...]:
        """Every checkpoint, one per fold."""
        return (self.checkpoint, *self.fold_checkpoints)


@dataclasses.dataclass(frozen=True)
class EvalOutputs:
    """What a run computed and the files it wrote."""

    # One checkpoint's results, or the folds and their summary for several checkpoints.
    results: EvalResults | folds.FoldResults
    # results.json, results.md, then the exports, then the report's index.html.
    files: tuple[Path, ...]
    # What the terminal shows: the metrics table(s) and notes.
    text: str = ""


def run_evaluation(request: EvalRequest) -> EvalOutputs:
    """Evaluate, then write results, exports and report; nothing is written unless everything is valid.

    Raises:
        InputError: a missing store, checkpoint or manifest, a store from another backbone, an unknown
            split or label, an export path with an unknown suffix, as many manifests as checkpoints
            not given, or an unknown or unavailable device.
    """
    device = torch_device_for(request.device)
    for path in request.exports:
        export_format(path)
    if request.manifests and len(request.manifests) != len(request.checkpoints):
        raise InputError(
            f"got {len(request.checkpoints)} checkpoint(s) and {len(request.manifests)} manifest(s); "
            "pass one --manifest per --checkpoint, in the same order, or none"
        )
    loaded = [load_checkpoint(path, device) for path in request.checkpoints]
    manifests = [load_manifest(path) for path in request.manifests]
    store = _open_store(request.store)
    out_dir = request.out_dir if request.out_dir is not None else loaded[0].path.parent
    if len(loaded) == 1:
        results = evaluate(loaded[0], store, request.config, manifests[0] if manifests else None)
        files = list(write_results(results, out_dir))
        rankings = [q.ranking for q in results.queries]
        text = results_text(results)
    else:
        results = folds.evaluate_folds(loaded, store, request.config, manifests or None)
        files = list(folds.write_fold_results(results, out_dir))
        rankings = results.rankings()
        text = folds.folds_markdown(results)
    files += [write_rankings(path, rankings) for path in request.exports]
    if request.report_dir is not None:
        if len(loaded) == 1:
            files.append(_write_report(results, store.tar_urls(), request.report_dir, request.report))
        else:
            files.append(folds.write_fold_report(results, store.tar_urls(), request.report_dir, request.report))
    return EvalOutputs(results, tuple(files), text)


def _open_store(path: Path):
    from rankpipe.pipeline.store import TokenStore

    return TokenStore.open(path)


def _write_report(results: EvalResults, tar_urls: Sequence[str], out_dir: Path, config: ReportConfig) -> Path:
    header, rows = results_table(results)
    sections = report_sections(results)
    details = [
        ("checkpoint", f"{results.checkpoint} (step {results.step})"),
        ("store", results.store),
        ("split", f"{results.split} ({', '.join(results.split_values)})"),
        ("intervals", f"{results.metric_config.confidence:.0%} bootstrap, {results.metric_config.bootstrap} resamples"),
    ]
    return write_report(out_dir, f"rankpipe evaluation: {results.split}", header, rows, sections, tar_urls, config, details)
