"""`rankpipe sweep`: train many adapter settings from one token store and tabulate them."""

from __future__ import annotations

from pathlib import Path

import click

from rankpipe.cli.params import NonEmptyPath


@click.command("sweep")
@click.option("--store", "store_path", required=True, type=NonEmptyPath(path_type=Path), help="Token store (.zarr) made by `rankpipe embed`.")
@click.option("--grid", "grid_path", required=True, type=NonEmptyPath(dir_okay=False, path_type=Path), help="Sweep YAML: set, grid, random, trials, seed (see sweeps/example.yaml).")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path), help="Sweep folder: one trial-<id>/ per trial and results.csv/.md.")
@click.option("--manifest", "manifest_path", type=NonEmptyPath(dir_okay=False, path_type=Path), help="Manifest overriding the store's split roles and target transforms (same labels).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE", help="Override a run-config field in every trial (after the file's set:); repeatable.")
@click.option("--label", "labels", multiple=True, help="Train on this label (repeatable); default: every label of the store.")
@click.option("--device", type=click.Choice(["cuda", "cpu"]), help="Where trials train; default cuda when available.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(min=1), help="Trials trained at once on this machine's device, sharing one copy of the features (a store over train.max_resident_gb is streamed, one trial at a time).")
@click.option("--fuse-max", default=16, show_default=True, type=click.IntRange(min=1), help="Most trials of the same shapes (differing only in optim.*, loss.*, seeds, lengths) trained as one fused model on this machine; 1 trains each trial alone.")
@click.option("--cluster", help="local:N: run trials on a dask LocalCluster of N worker processes (one GPU each with --device cuda).")
@click.option("--scheduler", help="Address of a running dask scheduler (tcp://host:8786) whose workers run the trials.")
@click.option("--eval-split", default="test", show_default=True, type=click.Choice(["train", "val", "test", "none"]), help="Split the best checkpoint of each trial is evaluated on ('none' skips it).")
@click.option("--bootstrap", default=0, show_default=True, type=click.IntRange(min=0), help="Bootstrap resamples for the evaluation's intervals (0: point values).")
@click.option("--retry-failed", is_flag=True, help="Run trials recorded as failed again (e.g. after an out-of-memory).")
def sweep(store_path, grid_path, out_dir, manifest_path, overrides, labels, device, concurrency, fuse_max, cluster, scheduler,
          eval_split, bootstrap, retry_failed):
    """Train one adapter per point of a grid or random search over run-config fields.

    Each trial gets a folder named by a hash of its resolved config: config.json, the training run,
    its best checkpoint's metrics and a status. Rerunning skips finished trials and continues
    unfinished ones; a failed trial is recorded with its reason and the sweep goes on. The results
    table, best validation SRCC first, is written as results.csv and results.md and printed.
    """
    from rankpipe.adapter.experiments.sweep.runner import SweepRequest, run_sweep
    from rankpipe.adapter.experiments.sweep.spec import expand_trials, load_sweep_spec
    from rankpipe.adapter.experiments.sweep.trial import DONE, TrialSettings
    from rankpipe.devices import default_device, torch_device_for
    from rankpipe.pipeline.cluster import parse_cluster
    from rankpipe.pipeline.data.manifest import load_manifest

    spec = load_sweep_spec(grid_path)
    trials = expand_trials(spec, tuple(overrides))
    cluster_spec = parse_cluster(cluster, scheduler)
    device = default_device(device)
    # Workers of a remote scheduler have their own GPUs; only this machine's can be checked here.
    if cluster_spec is None or cluster_spec.scheduler is None:
        torch_device_for(device)
    request = SweepRequest(
        store=store_path.resolve(), out_dir=out_dir.resolve(),
        manifest=load_manifest(manifest_path) if manifest_path is not None else None,
        trial=TrialSettings(labels=tuple(labels), eval_split=None if eval_split == "none" else eval_split, bootstrap=bootstrap),
        device=device, concurrency=concurrency, fuse_max=fuse_max, retry_failed=retry_failed,
    )
    click.echo(f"{len(trials)} trials in {out_dir}", err=True)

    def show(record) -> None:
        detail = f"val SRCC {record.mean_val_srcc:.4f}" if record.state == DONE else record.reason
        click.echo(f"trial {record.id}: {record.state} ({detail})", err=True)

    outcome = run_sweep(trials, request, spec.varied, cluster=cluster_spec, progress=show)
    click.echo(outcome.table)
    click.echo(f"{outcome.ran} trials run, {outcome.skipped} already done or failed; "
               f"table in {outcome.csv_path} and {outcome.md_path}")
