"""The `rankpipe` command: a click group whose sub-commands are imported only when used.

Importing torch and open_clip takes seconds, so `rankpipe --help` and `rankpipe shards` must not pay
for `rankpipe embed`'s imports. Each command lives in its own module under rankpipe.cli.
"""

from __future__ import annotations

import importlib
import logging

import click

from rankpipe import __version__
from rankpipe.errors import InputError

# name -> (module, function, one-line help shown by `rankpipe --help`)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("rankpipe.cli.demo", "demo", "Run the whole pipeline on built-in data, offline (random-weight CLIP)."),
    "embed": ("rankpipe.cli.embed", "embed", "Run the frozen CLIP over tars and cache its tokens in a Zarr store."),
    "shards": ("rankpipe.cli.shards", "shards", "Pack images (and labels) into WebDataset tars with a manifest."),
    "train": ("rankpipe.cli.train", "train", "Train the ranking adapter from a token store."),
    "eval": ("rankpipe.cli.eval", "eval_command", "Evaluate a checkpoint on a store split: metrics, exports, report."),
    "datasets": ("rankpipe.cli.datasets", "datasets", "Build ready-made ranking datasets (photo-tasks) or prepare the paper's public ones."),
    "rank": ("rankpipe.cli.rank", "rank", "Rank new images, or a whole token store, by one or more queries with a checkpoint."),
    "bench": ("rankpipe.cli.bench", "bench", "Embed once, then train and evaluate adapter variants over seeds into one table."),
    "sweep": ("rankpipe.cli.sweep", "sweep", "Train many adapter settings from one store and tabulate them."),
}


class LazyGroup(click.Group):
    """A group that imports a command's module on first use and maps InputError to exit code 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if not rows:
            return
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except InputError as e:
            raise UserError(str(e)) from e


class UserError(click.ClickException):
    """A user's mistake: one sentence, no traceback, exit code 2."""

    exit_code = 2


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="rankpipe")
@click.option("-v", "--verbose", is_flag=True, help="Show debug logging.")
def cli(verbose: bool) -> None:
    """Order images by a sentence with a frozen CLIP model and a small ranking-aware adapter.

    \b
    Typical flow:
      rankpipe shards labels.csv --label mos --query "Sort images by image quality." --out shards/x
      rankpipe embed shards/x/manifest.yaml --store feats/x.zarr --model ViT-B-16 --pretrained openai
      rankpipe train --store feats/x.zarr --out runs/x
      rankpipe eval --store feats/x.zarr --checkpoint runs/x/best.pt --split test
    Rank an unlabelled collection by a trained query:
      rankpipe shards photos/ --out shards/archive
      rankpipe embed shards/archive/manifest.yaml --store feats/archive.zarr --model ViT-B-16 --pretrained openai
      rankpipe rank --store feats/archive.zarr --checkpoint runs/x/best.pt --query "Sort images by image quality."
    Try `rankpipe demo` for the whole pipeline on built-in data.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
