"""Click parameter types shared by the commands."""

from __future__ import annotations

import click


class NonEmptyPath(click.Path):
    """A `click.Path` that refuses an empty value.

    An empty string is a valid path to the operating system (the current folder), so without this an
    unset shell variable in `--out "$DIR"` would write results into wherever the command was started.
    """

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("is empty; pass a path", param, ctx)
        return super().convert(value, param, ctx)
