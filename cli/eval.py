"""`rankpipe eval`: evaluate a checkpoint on a store split — metrics, ranking exports and an HTML report."""

from __future__ import annotations

from pathlib import Path

import click

from rankpipe.adapter.evaluation.command import EvalRequest, run_evaluation
from rankpipe.adapter.evaluation.contact_sheet import SheetConfig
from rankpipe.adapter.evaluation.evaluate import EvalConfig
from rankpipe.adapter.evaluation.metrics import MetricConfig
from rankpipe.adapter.evaluation.report import ReportConfig
from rankpipe.cli.params import NonEmptyPath
from rankpipe.pipeline.data.manifest import SPLIT_ROLES


@click.command("eval")
@click.option("--store", "store", required=True, type=NonEmptyPath(exists=True, path_type=Path),
              help="Token store (.zarr) written by `rankpipe embed`.")
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=NonEmptyPath(exists=True, path_type=Path),
              help="Checkpoint .pt written by `rankpipe train`, or its run folder (meaning best.pt); "
                   "repeat for the folds of a k-fold protocol.")
@click.option("--manifest", "manifests", multiple=True, type=NonEmptyPath(exists=True, dir_okay=False, path_type=Path),
              help="Manifest whose split roles a checkpoint is evaluated with, paired in order with --checkpoint "
                   "[default: the store's for one checkpoint, the roles each fold was trained with for several].")
@click.option("--split", type=click.Choice(SPLIT_ROLES), default="test", show_default=True,
              help="Split role to evaluate, mapped to split values by the store's manifest.")
@click.option("--label", "labels", multiple=True,
              help="Label (query) to evaluate; repeat for several [default: every label of the checkpoint the store has].")
@click.option("--export", "exports", multiple=True, type=NonEmptyPath(dir_okay=False, path_type=Path),
              help="Write the rankings to this file; .csv, .jsonl, .h5 or .parquet picks the format (repeatable).")
@click.option("--report", "report_dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="Write an HTML report (index.html and PNGs) into this folder.")
@click.option("--out", "out_dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="Folder for results.json and results.md [default: the checkpoint's folder].")
@click.option("--bootstrap", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Bootstrap resamples for the 95% intervals; 0 skips them.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resampling.")
@click.option("--top-k", type=click.IntRange(min=1), default=10, show_default=True,
              help="Images on each top and bottom contact sheet of the report.")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Images per adapter forward pass.")
@click.option("--device", default="cpu", show_default=True, help="Where the adapter runs: cpu or cuda[:i].")
def eval_command(
    store: Path, checkpoints: tuple[Path, ...], manifests: tuple[Path, ...], split: str, labels: tuple[str, ...], exports: tuple[Path, ...],
    report_dir: Path | None, out_dir: Path | None, bootstrap: int, seed: int, top_k: int, batch_size: int, device: str,
) -> None:
    """Evaluate a checkpoint on a store split: metrics, exports, report.

    \b
    Per query: PLCC, SRCC, KRCC, MAE (label units) and pairwise ordering accuracy, plus class
    accuracy and class MAE for ordinal labels, each with a seeded bootstrap interval. Images without
    a label are ranked and exported but left out of the metrics (the table counts them).
    Writes results.json and results.md and prints the table.

    \b
    Several --checkpoint are the folds of a k-fold protocol: each is evaluated on its own split
    and the tables show every fold and the mean ± std (ddof=1) of each metric over folds.
    """
    request = EvalRequest(
        store=store,
        checkpoint=checkpoints[0],
        fold_checkpoints=checkpoints[1:],
        manifests=manifests,
        config=EvalConfig(split=split, labels=labels, metrics=MetricConfig(bootstrap=bootstrap, seed=seed), batch_size=batch_size),
        out_dir=out_dir,
        exports=exports,
        report_dir=report_dir,
        report=ReportConfig(top_k=top_k, sheet=SheetConfig()),
        device=device,
    )
    outputs = run_evaluation(request)
    click.echo(outputs.text)
    for path in outputs.files:
        click.echo(f"wrote {path}")
