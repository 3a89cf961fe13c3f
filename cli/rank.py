"""`rankpipe rank`: rank new images, or a whole token store, by one or more queries with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from rankpipe.adapter.evaluation.exports import export_format
from rankpipe.adapter.evaluation.rank import RankConfig, rank_images
from rankpipe.adapter.evaluation.rank_outputs import format_table, query_lines, write_contact_sheets, write_ranking
from rankpipe.adapter.evaluation.ranking import Ranking
from rankpipe.cli.params import NonEmptyPath
from rankpipe.devices import default_device
from rankpipe.errors import InputError

# Options that only one of --images / --store reads.
_IMAGES_ONLY = ("workers",)
_STORE_ONLY = ("memory_mb", "work_dir", "cluster", "scheduler")


@click.command("rank")
@click.option("--checkpoint", required=True, type=NonEmptyPath(path_type=Path),
              help="Checkpoint .pt written by `rankpipe train`, or its run folder (meaning best.pt).")
@click.option("--images", default=None, type=NonEmptyPath(),
              help="New images: a folder (searched recursively for jpg/jpeg/png/webp) or tars in brace notation, "
                   "e.g. shards/x-{000000..000009}.tar. They run through the checkpoint's backbone.")
@click.option("--store", "store_path", default=None, type=NonEmptyPath(path_type=Path),
              help="A token store (.zarr) embedded with the checkpoint's backbone, labelled or not: every valid image "
                   "is ranked from its cached tokens, with no backbone forward pass.")
@click.option("--query", "queries", required=True, multiple=True,
              help="Ranking sentence, e.g. \"Sort images by image quality.\"; repeat to combine several.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each --query in the combined score, in the same order [default: equal weights].")
@click.option("--combine", type=click.Choice(["product", "sum"]), default="product", show_default=True,
              help="How several queries combine (see below and docs/rank.md).")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="Images shown in the printed table and on each contact sheet of --report.")
@click.option("--out", "out", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None,
              help="Write every image's scores and rank to this file; .csv, .jsonl, .h5 or .parquet picks the format.")
@click.option("--report", "report_dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="Write contact sheets of the top and bottom images (top.png, bottom.png) into this folder.")
@click.option("--device", default=None, help="Where the backbone and adapter run: cpu or cuda[:i] [default: the GPU "
                                             "when there is one]; with --cluster/--scheduler, the kind each worker uses.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: 64 with --images, 256 with --store].")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="--images only: image decoding processes (0 decodes in the main process).")
@click.option("--memory-mb", type=float, default=1024.0, show_default=True,
              help="--store only: megabytes of cached features held in memory at once (the store streams through).")
@click.option("--work-dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="--store only: folder for the per-tar scores that let a killed run resume (workers must reach it) "
                   "[default: <store>.rank-<id> beside the store; removed when the run ends].")
@click.option("--cluster", default=None, help="--store only: local:N scores the store's tars on a dask LocalCluster of "
                                               "N worker processes (one GPU each with a CUDA --device).")
@click.option("--scheduler", default=None, help="--store only: address of a running dask scheduler (tcp://host:8786) "
                                                "whose workers score the tars; they must reach the store at its path.")
@click.option("--backbone-weights", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None,
              help="Weights file of the checkpoint's backbone, when it was embedded from a local file "
                   "(checked against the recorded SHA-256) or from a pretrained tag that cannot be loaded here. "
                   "With --store it is only needed for a query the checkpoint was not trained on.")
@click.pass_context
def rank(ctx: click.Context, checkpoint: Path, images: str | None, store_path: Path | None, queries: tuple[str, ...],
         weights: tuple[float, ...], combine: str, top: int, out: Path | None, report_dir: Path | None,
         device: str | None, batch_size: int | None, workers: int, memory_mb: float, work_dir: Path | None,
         cluster: str | None, scheduler: str | None, backbone_weights: Path | None) -> None:
    """Rank new images, or every image of a token store, by one or more queries with a trained checkpoint.

    \b
    --images: the images run through the frozen CLIP recorded in the checkpoint (random weights are
    recreated from the recorded seed), then the adapter scores them for each query.
    --store: the store's cached tokens are scored directly (it must be embedded with the
    checkpoint's backbone); the store streams through in tars, and with --cluster/--scheduler
    its tars are scored on dask workers. A rerun with the same arguments skips tars already scored.
    A query the checkpoint was trained on scores in its label units; any other sentence is encoded
    with the backbone's text tower and scores as raw adapter output (no normalisation is known).
    Several queries combine into one score from z_q = (s_q - mean(s_q)) / std(s_q), query q's
    standardised scores over the ranked images, and w_q its --weight (default 1/Q):
        product (default, as the paper):  score = sum_q w_q * log sigmoid(z_q)
                                          (the log of prod_q sigmoid(z_q)^w_q)
        sum:                              score = sum_q w_q * z_q
    With one query the score is that query's score. Unreadable images (invalid store rows) are
    skipped and listed.
    """
    _check_sources(ctx, images, store_path)
    if out is not None:
        export_format(out)  # refuse a bad suffix before the long work
    batch = batch_size or (64 if images is not None else 256)
    config = RankConfig(queries=queries, weights=weights, combine=combine, batch_size=batch, workers=workers)
    device = default_device(device)
    if images is not None:
        ranking = rank_images(checkpoint, images, config, device=device, backbone_weights=backbone_weights, progress=True)
        summary = f"ranked {len(ranking.keys)} images of {images}; skipped {len(ranking.skipped)} unreadable"
    else:
        ranking, summary = _rank_store(checkpoint, store_path, config, memory_mb, top, out is not None, work_dir,
                                       device, backbone_weights, cluster, scheduler)
    _show(ranking, summary, top, out, report_dir)


def _check_sources(ctx: click.Context, images: str | None, store_path: Path | None) -> None:
    """Exactly one of --images and --store, and only the options that one reads."""
    if (images is None) == (store_path is None):
        raise InputError("give either --images (new images) or --store (a token store), not both or neither")
    unread, mode = (_STORE_ONLY, "--images") if images is not None else (_IMAGES_ONLY, "--store")
    for name in unread:
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            flag = "--" + name.replace("_", "-")
            raise InputError(f"{flag} does not apply to {mode}; leave it out (see rankpipe rank --help)")


def _rank_store(checkpoint: Path, store_path: Path, config: RankConfig, memory_mb: float, top: int, full: bool,
                work_dir: Path | None, device: str, backbone_weights: Path | None, cluster: str | None,
                scheduler: str | None) -> tuple[Ranking, str]:
    from rankpipe.adapter.evaluation.store_rank import StoreReadConfig, rank_store
    from rankpipe.pipeline.cluster import open_client, parse_cluster

    read = StoreReadConfig(memory_mb=memory_mb, keep=top, full=full, work_dir=work_dir)
    spec = parse_cluster(cluster, scheduler)
    if spec is None:
        result = rank_store(checkpoint, store_path, config, read, device, backbone_weights, progress=True)
    else:
        with open_client(spec, device) as client:
            result = rank_store(checkpoint, store_path, config, read, device, backbone_weights, client, progress=True)
    summary = f"ranked {result.ranked} images of store {store_path}; {result.invalid} samples hold no image"
    if result.images_scored:
        summary += f"; scored {result.images_scored} at {result.score_rate:,.0f} img/s"
    if result.blocks_reused:
        summary += f" ({result.blocks_reused} of {result.blocks_reused + result.blocks_scored} tars scored by an earlier run)"
    return result.ranking, summary


def _show(ranking: Ranking, summary: str, top: int, out: Path | None, report_dir: Path | None) -> None:
    for line in query_lines(ranking):
        click.echo(line)
    click.echo(format_table(ranking, top))
    click.echo(summary)
    for skipped in ranking.skipped[:_SKIPPED_SHOWN]:
        click.echo(f"  skipped {skipped.key or '(tar)'} in {skipped.path}: {skipped.reason}", err=True)
    if len(ranking.skipped) > _SKIPPED_SHOWN:
        more = len(ranking.skipped) - _SKIPPED_SHOWN
        where = f"; --out {out} lists them all" if out is not None else "; pass --out FILE to list them all"
        click.echo(f"  ... and {more} more{where}", err=True)
    if out is not None:
        click.echo(f"wrote {write_ranking(out, ranking)}")
    if report_dir is not None:
        for path in write_contact_sheets(report_dir, ranking, top):
            click.echo(f"wrote {path}")


# Skipped images listed on the terminal; the --out file lists every one.
_SKIPPED_SHOWN = 20
