"""`rankpipe shards`: pack images and labels into WebDataset tars with a manifest."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from rankpipe.cli.params import NonEmptyPath
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import METRIC_FAMILIES
from rankpipe.pipeline.data.shards import ShardsConfig, prepare_shards
from rankpipe.settings import split_assignment


def _role_value(text: str) -> tuple[str, str]:
    role, value = split_assignment(text, "ROLE=VALUE, e.g. val=holdout", "--split-value")
    if not value:
        raise InputError(f"--split-value {text!r} is not of the form ROLE=VALUE, e.g. val=holdout")
    return role, value


@click.command()
@click.argument("input_path", metavar="INPUT", type=NonEmptyPath(path_type=Path))
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Output folder for the tars, index.json, manifest.yaml and skipped.csv.")
@click.option("--label", "labels", multiple=True,
              help="Numeric label column (repeat for several labels); leave out to pack an unlabelled collection.")
@click.option("--query", "queries", multiple=True,
              help="Sentence to rank by, one per --label in the same order.")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRIC_FAMILIES),
              help="Once for all labels or once per label [default: correlation]. Ordinal classes are the "
                   "distinct values found.")
@click.option("--image-col", default="path", show_default=True, help="Column with image paths.")
@click.option("--split-col", default=None,
              help="Column with split values; without it a seeded 80/10/10 split is hashed from the image paths.")
@click.option("--split-value", "split_values", multiple=True, metavar="ROLE=VALUE",
              help="Name a non-standard split value, e.g. val=holdout "
                   "(train/training, val/valid/validation/dev, test/testing are known).")
@click.option("--name", default=None, help="Dataset name and tar prefix [default: the --out folder's name].")
@click.option("--samples-per-tar", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Samples per tar; the last tar holds the rest.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the hashed split.")
def shards(
    input_path: Path, out_dir: Path, labels: tuple[str, ...], queries: tuple[str, ...], metrics: tuple[str, ...],
    image_col: str, split_col: str | None, split_values: tuple[str, ...], name: str | None,
    samples_per_tar: int, split_seed: int,
) -> None:
    """Pack images and labels into WebDataset tars with a manifest.

    \b
    INPUT is one of:
      - a .csv, .tsv or .jsonl table: an image path column (--image-col), the --label columns
        and optionally a --split-col; relative paths start at the table's folder;
      - a folder holding labels.csv, labels.tsv or labels.jsonl: read as that table;
      - a folder of label sub-folders, FOLDER/<value>/image or FOLDER/<split>/<value>/image
        (top-level folders named train/val/test...): the folder name is the value of the one --label.

    \b
    Without --label the images form an unlabelled collection, to be embedded and then ranked by
    `rankpipe rank --store` (nothing can train on it). INPUT is then a table of image paths, a
    folder (every file in it, recursively), or existing WebDataset tars in brace notation,
    e.g. 'crawl/part-{00000..00099}.tar' (each sample's jpg, jpeg, png or webp member).

    \b
    Writes OUT/<name>-000000.tar ... (each sample: its image bytes as on disk and a json with
    labels, split and source path), OUT/index.json, OUT/manifest.yaml and OUT/skipped.csv, which
    lists every sample left out (missing, undecodable or non-JPEG/PNG/WebP image, non-numeric
    label) with the reason.
    Empty label cells are missing values; a row with no label value is skipped.

    \b
    Examples:
      rankpipe shards koniq.csv --image-col path --label mos --split-col split \\
          --query "Sort images by image quality." --out shards/koniq
      rankpipe shards photos/ --out shards/archive
    """
    config = ShardsConfig(
        input=input_path, out_dir=out_dir, labels=labels, queries=queries, metrics=metrics,
        image_col=image_col, split_col=split_col, name=name, samples_per_tar=samples_per_tar,
        split_seed=split_seed, split_values=tuple(_role_value(v) for v in split_values),
    )
    plan = prepare_shards(config)
    with tqdm(total=len(plan.records), desc="shards", unit="img", leave=False) as bar:
        result = plan.write(progress=bar.update)
    click.echo(result.summary())
