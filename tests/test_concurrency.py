"""Two jobs pointed at one output: the second is refused with a sentence naming the first, nothing is mixed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import zarr
from PIL import Image

from rankpipe.adapter.baselines.fit import train_baseline
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.errors import InputError
from rankpipe.files import exclusive_output
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.data.shard_writer import write_shards
from rankpipe.pipeline.data.sources import SampleRecord
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.embed.job import embed
from rankpipe.pipeline.store import CREATING_MARK, TokenStore

from conftest import tiny_config, write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_thread")


def files_of(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_second_holder_is_refused_until_the_first_lets_go(tmp_path):
    out = tmp_path / "out"
    with exclusive_output(out, "rankpipe embed"):
        with pytest.raises(InputError, match=r"is being written by rankpipe embed \(process \d+ on .*, started "):
            with exclusive_output(out, "rankpipe train"):
                pass
    with exclusive_output(out, "rankpipe train"):  # free again
        pass
    assert not out.exists(), "the lock lives beside the output, not in it"


def test_a_lock_held_by_another_process_refuses_and_dies_with_it(tmp_path):
    out = tmp_path / "store.zarr"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from rankpipe.files import exclusive_output
        with exclusive_output({str(out)!r}, "rankpipe embed"):
            print("held", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=f"process {holder.pid} "):
            with exclusive_output(out, "rankpipe embed"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_output(out, "rankpipe embed"):  # a killed holder leaves no stale lock
        pass


def test_embed_into_a_store_being_written_is_refused_and_changes_nothing(tmp_path, tiny_shards):
    store = tmp_path / "x.zarr"
    spec = BackboneSpec(TINY_VIT, "none")
    embed(load_manifest(tiny_shards), store, spec, batch_size=4, workers=0, progress=False)
    before = files_of(store)
    with exclusive_output(store, "rankpipe embed"):
        with pytest.raises(InputError, match="being written by rankpipe embed"):
            embed(load_manifest(tiny_shards), store, spec, batch_size=4, workers=0, progress=False, mode="overwrite")
    assert files_of(store) == before


def test_shards_into_a_folder_being_written_is_refused(tmp_path):
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    record = SampleRecord(row=1, source="a.png", path=image, labels={})
    out = tmp_path / "shards"
    with exclusive_output(out, "rankpipe shards"):
        with pytest.raises(InputError, match="being written by rankpipe shards"):
            write_shards([record], out, "x", [])
    assert not list(out.glob("*.tar"))


def test_train_and_fit_into_a_run_being_written_are_refused(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr")
    run = tmp_path / "run"
    with exclusive_output(run, "rankpipe train"):
        with pytest.raises(InputError, match="being written by rankpipe train"):
            train_from_store(store, run, tiny_config("train.max_steps=2"))
        with pytest.raises(InputError, match="being written by rankpipe train"):
            train_baseline(store, run, "linear-probe")
    assert not run.exists() or not any(run.iterdir())


def test_a_store_whose_creation_was_killed_is_created_again(tmp_path, tiny_shards):
    store = tmp_path / "x.zarr"
    root = zarr.open_group(store, mode="w")  # what a creation killed before its format marker leaves
    root.attrs.update({CREATING_MARK: 1})
    root.create_array("image/key", shape=(3,), dtype=str, fill_value="")
    summary = embed(load_manifest(tiny_shards), store, BackboneSpec(TINY_VIT, "none"), batch_size=4, workers=0,
                    progress=False)
    assert summary.tars_embedded == 3
    assert TokenStore.open(store).valid().sum() == 36


def test_a_foreign_zarr_group_is_still_not_deleted(tmp_path, tiny_shards):
    folder = tmp_path / "theirs.zarr"
    zarr.open_group(folder, mode="w").attrs.update({"owner": "someone else"})
    with pytest.raises(InputError, match="not a rankpipe store"):
        embed(load_manifest(tiny_shards), folder, BackboneSpec(TINY_VIT, "none"), batch_size=4, workers=0,
              progress=False)
    assert zarr.open_group(folder, mode="r").attrs["owner"] == "someone else"
