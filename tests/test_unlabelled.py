"""Unlabelled collections: `rankpipe shards` without --label, their stores, and the commands that refuse them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
import zarr
from click.testing import CliRunner

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.data.shards import ShardsConfig, prepare_shards
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.embed.job import embed
from rankpipe.pipeline.store import TokenStore

from conftest import encode, read_tar_samples, tiny_image


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo archive: 9 images in nested folders, a text file and a hidden file."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    for i in range(9):
        folder = root / ("2019" if i < 4 else "2020/summer")
        folder.mkdir(parents=True, exist_ok=True)
        fmt = "png" if i % 4 == 3 else "jpg"
        (folder / f"img{i}.{fmt}").write_bytes(encode(tiny_image(rng, i % 5), fmt))
    (root / "notes.txt").write_text("not an image")
    (root / ".thumbs.db").write_text("hidden")
    return root


def samples_of(manifest_path: Path) -> list[dict]:
    return [s for url in load_manifest(manifest_path).shard_urls() for s in read_tar_samples(url)]


def test_a_folder_without_labels_packs_images_only(photo_folder, tmp_path):
    out = tmp_path / "archive"
    result = CliRunner().invoke(cli, ["shards", str(photo_folder), "--out", str(out), "--samples-per-tar", "4"])
    assert result.exit_code == 0, result.output
    assert "Wrote 9 samples in 3 tars" in result.output and "1 unreadable image" in result.output
    manifest = load_manifest(out / "manifest.yaml")
    assert manifest.labels == ()
    samples = samples_of(out / "manifest.yaml")
    sources = [json.loads(s["json"])["source"] for s in samples]
    assert sources == sorted(p.relative_to(photo_folder).as_posix() for p in photo_folder.rglob("img*"))
    for sample, source in zip(samples, sources):
        meta = json.loads(sample["json"])
        assert meta == {"labels": {}, "split": "", "source": source}
        ext = "png" if "png" in sample else "jpg"
        assert sample[ext] == (photo_folder / source).read_bytes()  # packed as on disk
    assert "notes.txt" in (out / "skipped.csv").read_text() and ".thumbs" not in (out / "skipped.csv").read_text()


def test_a_table_of_paths_without_labels(photo_folder, tmp_path):
    table = tmp_path / "paths.csv"
    files = sorted(p for p in photo_folder.rglob("img*"))
    table.write_text("path\n" + "".join(f"{p}\n" for p in files))
    result = prepare_shards(ShardsConfig(input=table, out_dir=tmp_path / "out", labels=(), queries=())).write()
    assert result.total == 9 and not result.skipped and result.split_counts == {"": 9}
    assert [json.loads(s["json"])["source"] for s in samples_of(result.manifest_path)] == [str(p) for p in files]


def test_existing_tars_are_repacked_without_their_labels(tiny_shards, tmp_path):
    folder = tiny_shards.parent
    odd = tmp_path / "odd-000000.tar"
    with wds.TarWriter(str(odd)) as sink:
        sink.write({"__key__": "caption-only", "txt": b"a sample without an image"})
        sink.write({"__key__": "good", "webp": encode(tiny_image(np.random.default_rng(0), 1), "webp")})
    pattern = "{" + f"{folder}/tiny-{{000000..000002}}.tar,{odd}" + "}"
    out = tmp_path / "repacked"
    result = CliRunner().invoke(cli, ["shards", pattern, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Wrote 37 samples" in result.output and "skipped 1 (1 missing image file)" in result.output
    originals = [s for t in range(3) for s in read_tar_samples(str(folder / f"tiny-{t:06d}.tar"))]
    packed = samples_of(out / "manifest.yaml")
    for before, after in zip(originals, packed):
        ext = "png" if "png" in before else "jpg"
        assert after[ext] == before[ext]
        assert json.loads(after["json"])["source"].endswith(f".tar#{before['__key__']}.{ext}")
    assert json.loads(packed[-1]["json"])["source"] == f"{odd}#good.webp" and "webp" in packed[-1]
    assert "caption-only" in (out / "skipped.csv").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--query", "Sort images by age."], "a --query names the sentence of a --label"),
    (["--metric", "ordinal"], "--metric describes a --label"),
    (["--split-col", "split"], "has no splits"),
])
def test_label_options_without_a_label_are_refused(photo_folder, tmp_path, extra, message):
    result = CliRunner().invoke(cli, ["shards", str(photo_folder), "--out", str(tmp_path / "out"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_tars_with_labels_are_refused_and_missing_tars_named(tiny_shards, tmp_path):
    pattern = str(tiny_shards.parent / "tiny-{000000..000002}.tar")
    with pytest.raises(InputError, match="only as an unlabelled collection"):
        prepare_shards(ShardsConfig(input=Path(pattern), out_dir=tmp_path / "o", labels=("a",), queries=("q",)))
    with pytest.raises(InputError, match="2 of the 2 tars .* do not exist"):
        prepare_shards(ShardsConfig(input=tmp_path / "x-{0..1}.tar", out_dir=tmp_path / "o", labels=(), queries=()))
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["shards", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "holds no files" in result.output


@pytest.fixture(scope="module")
def archive_store(photo_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The photo folder packed without labels and embedded with rankpipe-tiny-vit (random weights, seed 0)."""
    root = tmp_path_factory.mktemp("archive")
    prepare_shards(ShardsConfig(input=photo_folder, out_dir=root / "shards", labels=(), queries=(),
                                samples_per_tar=4)).write()
    store = root / "archive.zarr"
    embed(load_manifest(root / "shards" / "manifest.yaml"), store, BackboneSpec(TINY_VIT, "none", seed=0),
          batch_size=3, workers=0, progress=False)
    return store


def test_an_unlabelled_store_has_image_tokens_and_sources_only(archive_store, photo_folder):
    store = TokenStore.open(archive_store)
    assert store.label_names == []
    root = zarr.open_group(archive_store, mode="r")
    assert "label" not in root and "text" not in root
    rows = store.rows()
    assert len(rows) == 9 and store.valid().sum() == 9
    expected = sorted(p.relative_to(photo_folder).as_posix() for p in photo_folder.rglob("img*"))
    assert store.sources()[rows].tolist() == expected
    assert set(store.splits()[rows]) == {""}
    assert np.abs(store.image_tokens(rows).astype(np.float32)).sum(axis=(1, 2)).min() > 0


def test_a_bare_pattern_of_json_less_tars_embeds_as_a_collection(tmp_path):
    rng = np.random.default_rng(5)
    with wds.TarWriter(str(tmp_path / "crawl-000000.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"k{i}", "jpg": encode(tiny_image(rng, i))})
    result = CliRunner().invoke(cli, ["embed", str(tmp_path / "crawl-000000.tar"), "--store", str(tmp_path / "c.zarr"),
                                      "--model", TINY_VIT, "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    store = TokenStore.open(tmp_path / "c.zarr")
    assert store.label_names == [] and store.keys()[store.rows()].tolist() == [f"k{i}" for i in range(5)]
    assert store.sources()[store.rows()].tolist() == [""] * 5


@pytest.mark.parametrize("command", [
    ["train", "--out", "{tmp}/run", "--max-steps", "2"],
    ["train", "--out", "{tmp}/run", "--method", "zero-shot"],
    ["eval", "--checkpoint", "{checkpoint}", "--out", "{tmp}/eval", "--export", "{tmp}/r.csv"],
    ["sweep", "--grid", "{tmp}/grid.yaml", "--out", "{tmp}/sweep"],
])
def test_commands_that_need_labels_refuse_an_unlabelled_store(archive_store, tiny_checkpoint, tmp_path, command):
    (tmp_path / "grid.yaml").write_text("grid:\n  optim.lr: [0.001, 0.002]\n")
    args = [part.replace("{tmp}", str(tmp_path)).replace("{checkpoint}", str(tiny_checkpoint)) for part in command]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(cli, [args[0], "--store", str(archive_store), *args[1:]])
    assert result.exit_code == 2, result.output
    assert "unlabelled collection" in result.output and "rankpipe rank --store" in result.output
    assert "Traceback" not in result.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
