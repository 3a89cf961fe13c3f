"""`rankpipe bench`: embed a task set once, then train and evaluate adapter variants over seeds into one table."""

from __future__ import annotations

from pathlib import Path

import click

from rankpipe.adapter.experiments.bench.steps import BENCH_STEPS, QUICK_STEPS
from rankpipe.adapter.experiments.bench.variants import DEFAULT_VARIANTS, variant_names
from rankpipe.cli.params import NonEmptyPath


@click.command("bench")
@click.option("--tasks", "tasks", type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Task-set folder with manifest.yaml (e.g. from `rankpipe datasets build photo-tasks`). "
                   "Left out: photo-tasks is built into OUT/photo-tasks (small with --quick, else bench).")
@click.option("--model", default="ViT-B-32", show_default=True,
              help="open_clip model name (rankpipe-tiny-vit for a quick CPU check).")
@click.option("--pretrained", default="none", show_default=True,
              help="open_clip pretrained tag, a local checkpoint file, or 'none' for random weights.")
@click.option("--variants", "variants_text", default=DEFAULT_VARIANTS,
              show_default=True,
              help=f"Comma-separated rows to train, from: {', '.join(variant_names())} (docs/bench.md).")
@click.option("--seeds", default=3, show_default=True, type=click.IntRange(min=1),
              help="Training seeds per variant (0..N-1); the table shows mean ± std over them.")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Folder for the store, the runs and results.md/results.csv; rerunning resumes it.")
@click.option("--labels", "labels_text", metavar="LABEL,...",
              help="Train and table only these labels of the task set (comma-separated), as one adapter per run; "
                   "default: the task set's train labels, with photo-tasks' held-out counting labels as unseen queries.")
@click.option("--quick", is_flag=True, help="Small adapter and few steps: the whole bench on a CPU in minutes.")
@click.option("--steps", type=click.IntRange(min=1),
              help=f"Training steps per run (default: {QUICK_STEPS} with --quick, else {BENCH_STEPS}).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Run-config override for every run, applied before each variant's own (repeatable).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Where to embed and train; default cuda when available.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(min=0),
              help="Decoding processes while embedding.")
@click.option("--embed-batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Images per backbone forward pass while embedding.")
@click.option("--reference", help="Row every other is compared with (paired bootstrap); default: `default` when "
                                   "it is among --variants, else the first variant.")
@click.option("--metric", type=click.Choice(["srcc", "plcc"]), default="srcc", show_default=True,
              help="Metric of the intervals and paired comparisons.")
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(min=10),
              help="Bootstrap resamples of the test images for intervals and paired differences.")
@click.option("--bootstrap-seed", default=0, show_default=True, type=int,
              help="Seed of the bootstrap resampling, so a rerun gives the same intervals.")
def bench(tasks, model, pretrained, variants_text, seeds, out_dir, labels_text, quick, steps, overrides, device, workers,
          embed_batch_size, reference, metric, resamples, bootstrap_seed) -> None:
    """Embed a task set once, then train and evaluate each variant with each seed into one table.

    \b
    Writes OUT/store.zarr, OUT/runs/<variant>/seed<k>/ and OUT/results.md + OUT/results.csv: per
    query SRCC, PLCC, KRCC and MAE as mean ± std over seeds on the test split, and a section for
    held-out counting categories the adapters never trained on; then each row's SRCC with its
    bootstrap interval and its paired difference to the reference row (better / worse / no
    difference at 95%), the query matrix (SRCC of every query's scores against every label), and
    learning curves in OUT/curves.png. Rerunning skips finished runs.
    """
    from rankpipe.adapter.experiments.bench.bootstrap import BootstrapConfig
    from rankpipe.adapter.experiments.bench.run import BenchConfig, run_bench
    from rankpipe.adapter.experiments.bench.variants import parse_variants
    from rankpipe.devices import default_device
    from rankpipe.pipeline.embed.backbone import BackboneSpec

    device = default_device(device)
    config = BenchConfig(
        out_dir=out_dir, backbone=BackboneSpec(model, pretrained), variants=tuple(parse_variants(variants_text)),
        seeds=seeds, tasks=tasks, quick=quick, labels=_labels(labels_text), steps=steps, overrides=tuple(overrides),
        device=device,
        embed_batch_size=embed_batch_size, workers=workers, reference=reference, metric=metric,
        bootstrap=BootstrapConfig(resamples=resamples, seed=bootstrap_seed),
    )
    result = run_bench(config, on_stage=click.echo)
    click.echo(result.markdown)
    click.echo(f"{result.trained} run(s) trained, {result.reused} reused; table in {result.results_md} and {result.results_csv}")
    if result.curves_png is not None:
        click.echo(f"learning curves in {result.curves_png}")


def _labels(text: str | None) -> tuple[str, ...] | None:
    """--labels as a tuple, each once in order; None when left out."""
    return None if text is None else tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
