"""`rankpipe datasets`: build ready-made ranking datasets."""

from __future__ import annotations

from pathlib import Path

import click
from tqdm import tqdm

from rankpipe.pipeline.photo_tasks.build import SIZES, build_photo_tasks, config_for_size


@click.group()
def datasets() -> None:
    """Build ready-made ranking datasets."""


@datasets.group()
def build() -> None:
    """Build a dataset's tars and manifest."""


@build.command("photo-tasks")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder for the tars, manifest.yaml, photo_tasks.json and recipes.jsonl.")
@click.option("--size", type=click.Choice(sorted(SIZES)), default="small", show_default=True,
              help="small: 400 images (under a minute); full: 5,400 images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds crops, distortions, layouts and splits.")
@click.option("--sources", type=click.Choice(["auto", "builtin"]), default="auto", show_default=True,
              help="auto: Debian wallpaper and tuxpaint packages when installed, else built-ins; "
                   "builtin: scikit-image photos and synthetic shape cut-outs only.")
def photo_tasks(out_dir: Path, size: str, seed: int, sources: str) -> None:
    """Real-photo ranking tasks with exact labels: quality, attributes, counting.

    \b
    Labels (one query each):
      blur, jpeg, noise, pixelation, quality   distortion strength of degraded crops
      colorfulness, contrast, brightness       measured on every stored image
      count_<category>                         cut-outs pasted on real backgrounds
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
