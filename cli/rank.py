"""`rankpipe rank`: rank new images by one or more queries with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from rankpipe.adapter.evaluation.exports import export_format
from rankpipe.adapter.evaluation.rank import RankConfig, rank_images
from rankpipe.adapter.evaluation.rank_outputs import format_table, query_lines, write_contact_sheets, write_ranking
from rankpipe.cli.params import NonEmptyPath


@click.command("rank")
@click.option("--checkpoint", required=True, type=NonEmptyPath(path_type=Path),
              help="Checkpoint .pt written by `rankpipe train`, or its run folder (meaning best.pt).")
@click.option("--images", required=True, type=NonEmptyPath(),
              help="A folder (searched recursively for jpg/jpeg/png/webp) or tars in brace notation, "
                   "e.g. shards/x-{000000..000009}.tar.")
@click.option("--query", "queries", required=True, multiple=True,
              help="Ranking sentence, e.g. \"Sort images by image quality.\"; repeat to combine several.")
@click.option("--weight", "weights", multiple=True, type=float,
              help="Weight of each --query in the combined score, in the same order [default: equal weights].")
@click.option("--combine", type=click.Choice(["product", "sum"]), default="product", show_default=True,
              help="How several queries combine (see below and docs/rank.md).")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="Images shown in the printed table and on each contact sheet of --report.")
@click.option("--out", "out", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None,
              help="Write every image's scores and rank to this file; .csv, .jsonl or .h5 picks the format.")
@click.option("--report", "report_dir", type=NonEmptyPath(file_okay=False, path_type=Path), default=None,
              help="Write contact sheets of the top and bottom images (top.png, bottom.png) into this folder.")
@click.option("--device", default="cpu", show_default=True, help="Where the backbone and adapter run: cpu or cuda[:i].")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Image decoding processes (0 decodes in the main process).")
@click.option("--backbone-weights", type=NonEmptyPath(dir_okay=False, path_type=Path), default=None,
              help="Weights file of the checkpoint's backbone, when it was embedded from a local file "
                   "(checked against the recorded SHA-256) or from a pretrained tag that cannot be loaded here.")
def rank(checkpoint: Path, images: str, queries: tuple[str, ...], weights: tuple[float, ...], combine: str, top: int,
         out: Path | None, report_dir: Path | None, device: str, batch_size: int, workers: int,
         backbone_weights: Path | None) -> None:
    """Rank new images by one or more queries with a trained checkpoint.

    \b
    The images run through the frozen CLIP recorded in the checkpoint (random weights are recreated
    from the recorded seed), then the adapter scores them for each query.
    A query the checkpoint was trained on scores in its label units; any other sentence is encoded
    with the backbone's text tower and scores as raw adapter output (no normalisation is known).
    Several queries combine into one score from z_q = (s_q - mean(s_q)) / std(s_q), query q's
    standardised scores over the ranked images, and w_q its --weight (default 1/Q):
        product (default, as the paper):  score = sum_q w_q * log sigmoid(z_q)
                                          (the log of prod_q sigmoid(z_q)^w_q)
        sum:                              score = sum_q w_q * z_q
    With one query the score is that query's score. Unreadable images are skipped and listed.
    """
    if out is not None:
        export_format(out)  # refuse a bad suffix before the long work
    config = RankConfig(queries=queries, weights=weights, combine=combine, batch_size=batch_size, workers=workers)
    ranking = rank_images(checkpoint, images, config, device=device, backbone_weights=backbone_weights, progress=True)
    for line in query_lines(ranking):
        click.echo(line)
    click.echo(format_table(ranking, top))
    click.echo(f"ranked {len(ranking.keys)} images of {images}; skipped {len(ranking.skipped)} unreadable")
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
