"""Path options refuse an empty value instead of writing into the current folder."""

import os

import pytest
from click.testing import CliRunner

from rankpipe.cli.main import cli


@pytest.mark.parametrize("args", [
    ["shards", "labels.csv", "--label", "mos", "--query", "q", "--out", ""],
    ["train", "--store", "store.zarr", "--out", ""],
    ["embed", "manifest.yaml", "--model", "rankpipe-tiny-vit", "--store", ""],
    ["eval", "--store", "store.zarr", "--checkpoint", "best.pt", "--report", ""],
    ["rank", "--checkpoint", "best.pt", "--query", "q", "--images", ""],
    ["sweep", "--store", "store.zarr", "--grid", "sweep.yaml", "--out", ""],
    ["datasets", "build", "photo-tasks", "--out", ""],
], ids=["shards", "train", "embed", "eval", "rank", "sweep", "datasets"])
def test_empty_path_exits_2_and_writes_nothing(tmp_path, args):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path) as cwd:
        with open("labels.csv", "w") as f:
            f.write("path,mos\nmissing.png,1\n")
        os.mkdir("store.zarr")
        open("best.pt", "wb").close()
        before = sorted(os.listdir(cwd))
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "is empty; pass a path" in result.output
        assert sorted(os.listdir(cwd)) == before
