"""`rankpipe datasets`: build ready-made ranking datasets."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from rankpipe.cli.params import NonEmptyPath
from rankpipe.pipeline.datasets.photo_tasks.build import (
    SIZES,
    build_photo_tasks,
    config_for_size,
)
from rankpipe.pipeline.datasets.preparers import preparer_names
from rankpipe.pipeline.datasets.preparers.prepare import make_config, prepare_dataset
from rankpipe.settings import split_assignment


@click.group()
def datasets() -> None:
    """Build ready-made ranking datasets."""


@datasets.group()
def build() -> None:
    """Build a dataset's tars and manifest."""


@build.command("photo-tasks")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Output folder for the tars, manifest.yaml, photo_tasks.json and recipes.jsonl.")
@click.option("--size", type=click.Choice(sorted(SIZES)), default="small", show_default=True,
              help="small: 400 images (under a minute); full: 5,400 images; bench: 4,940 images, at least "
                   "200 test images per query (for `rankpipe bench`); steering: 1,200 mixed images, each "
                   "with a count, a blur and the attributes (for the bench's query matrix).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds crops, distortions, layouts and splits.")
@click.option("--sources", type=click.Choice(["auto", "builtin"]), default="auto", show_default=True,
              help="auto: Debian wallpaper and tuxpaint packages when installed, else built-ins; "
                   "builtin: scikit-image photos and synthetic shape cut-outs only.")
def photo_tasks(out_dir: Path, size: str, seed: int, sources: str) -> None:
    """Real-photo ranking tasks with exact labels: quality, attributes, counting, mixed.

    \b
    Labels (one query each):
      blur, jpeg, noise, pixelation, quality   distortion strength of degraded crops
      colorfulness, contrast, brightness       measured on every stored image
      count_<category>                         cut-outs pasted on real backgrounds
    Mixed images carry a count, a blur strength and the attributes at once.
    Each base photo lies in one split. Held-out counting categories have no labels in
    train rows; photo_tasks.json lists them and the labels to train on.

    \b
    Photos come from lomiri-wallpapers, mate-backgrounds, plasma-workspace-wallpapers and
    tuxpaint-stamps-default when installed (see docs/photo-tasks.md), else from scikit-image.
    """
    config = config_for_size(size, seed=seed, sources=sources)
    with tqdm(total=sum(config.images.values()), desc="photo-tasks", unit="img", leave=False) as bar:
        result = build_photo_tasks(out_dir, config, progress=bar.update)
    click.echo(result.summary())


@datasets.command("prepare")
@click.argument("name", type=click.Choice(preparer_names()))
@click.option("--src", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Folder where the dataset was unpacked, in its authors' layout (docs/datasets.md).")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False, path_type=Path),
              help="Output folder for the tars, manifest.yaml, prepare.json and excluded.csv.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seeds validation hold-outs and per-class draws (same seed, same splits).")
@click.option("--attributes/--no-attributes", default=None,
              help="Also measure colourfulness, contrast and brightness on every image "
                   "(default: on for ava, the paper's Table 4; off elsewhere).")
@click.option("--samples-per-tar", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="A dataset option, e.g. --set crowd=drop for coco-rem (docs/datasets.md lists them).")
def prepare(name: str, src: Path, out_dir: Path, seed: int, attributes: bool | None, samples_per_tar: int,
            overrides: tuple[str, ...]) -> None:
    """Write a public dataset of the paper as tars and a manifest with its queries and protocol.

    \b
    Datasets:
      koniq10k   KonIQ-10k MOS, official split
      ava        AVA mean vote (+ colourfulness, contrast, brightness), official test list
      adience    Adience 8 age groups, 5 subject-exclusive folds (manifest-fold<k>.yaml)
      hci        historical colour images by decade, 50/5 test/val per decade
      coco-rem   object counts per COCO category (crowd regions: --set crowd=keep|drop)
      utkface    age in years, 21-60
      clevr      object counts per colour, material and shape
    """
    pairs = dict(split_assignment(item) for item in overrides)
    config = make_config(name, pairs, seed=seed, attributes=attributes, samples_per_tar=samples_per_tar)
    with tqdm(desc=name, unit="img", leave=False) as bar:
        result = prepare_dataset(name, src, out_dir, config, progress=bar.update)
    click.echo(result.summary())
