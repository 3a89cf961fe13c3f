"""The token store: layout, provenance, read API against the input tars, row planning, open errors."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.data.tars import TarInfo, _read_index, list_tars
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.store import (
    StoreConfig,
    TokenStore,
    create_store,
    plan_store,
    prompt_id,
)

from conftest import read_tar_samples


@pytest.fixture(scope="module")
def store(tiny_store):
    return TokenStore.open(tiny_store)


@pytest.fixture(scope="module")
def backbone():
    return load_backbone(BackboneSpec(TINY_VIT, "none", seed=0))


def test_layout_and_attrs(tiny_store, store, backbone):
    root = zarr.open_group(tiny_store, mode="r")
    N = store.num_rows
    assert root["image/tokens"].shape == (N, 16, 64) and root["image/tokens"].dtype == np.float16
    assert root["image/embed"].shape == (N, 32) and root["image/embed"].dtype == np.float16
    for name, dtype in [("image/valid", np.bool_), ("image/tar", np.int32), ("label/squares", np.float32)]:
        assert root[name].shape == (N,) and root[name].dtype == dtype
    assert root["done"].shape == (3,) and root["done"][:].all()
    attrs = dict(root.attrs)
    assert attrs["rankpipe_store"] == 1
    assert attrs["provenance"] == {**backbone.provenance, "image_decoder": "pil", "views": ["original"]}
    assert attrs["shard_rows"] % attrs["chunk_rows"] == 0
    assert root["image/tokens"].shards[0] == attrs["shard_rows"] and root["image/tokens"].chunks[0] == attrs["chunk_rows"]
    assert not store.compressed and root["image/tokens"].compressors == ()
    for entry in attrs["tars"]:
        assert (entry["row_stop"] - entry["row_start"]) % attrs["shard_rows"] == 0
        assert entry["row_stop"] - entry["row_start"] >= entry["count"] == 12
    assert attrs["labels"]["squares"] == {"query": "Sort images by the number of squares.",
                                          "prompt_id": prompt_id("Sort images by the number of squares.")}
    assert store.manifest.to_dict() == load_manifest(store.tar_urls()[0].rsplit("/", 1)[0] + "/manifest.yaml").to_dict()


def test_rows_match_the_input_tars(store):
    keys, valid, splits, errors, tar = store.keys(), store.valid(), store.splits(), store.errors(), store.tar_index()
    for t, (start, stop) in enumerate(store.row_blocks()):
        samples = read_tar_samples(store.tar_urls()[t])
        n = len(samples)
        assert list(keys[start:start + n]) == [s["__key__"] for s in samples]
        assert valid[start:start + n].all() and not valid[start + n:stop].any()
        assert (errors[start:start + n] == "").all() and (tar[start:start + n] == t).all() and (tar[start + n:stop] == -1).all()
        for i, sample in enumerate(samples):
            meta = json.loads(sample["json"])
            assert splits[start + i] == meta["split"]
            for name in store.label_names:
                assert store.label(name)[start + i] == pytest.approx(meta["labels"][name], rel=1e-6)


def test_stored_tokens_equal_a_direct_forward(store, backbone):
    url = store.tar_urls()[1]
    start, _ = store.row_blocks()[1]
    sample = read_tar_samples(url)[2]
    data = sample.get("jpg", sample.get("png"))
    x = backbone.preprocess(Image.open(io.BytesIO(data)).convert("RGB"))[None]  # [1, 3, 64, 64]
    with torch.inference_mode():
        tokens, embed = backbone.encode_images(x)
    np.testing.assert_allclose(store.image_tokens(slice(start + 2, start + 3)), tokens.half().numpy(), atol=2e-3)
    np.testing.assert_allclose(store.image_embed(np.array([start + 2])), embed.half().numpy(), atol=2e-3)


def test_text_features_match_the_backbone(store, backbone):
    for name in store.label_names:
        text = store.text(name)
        expected = backbone.encode_text(store.query(name))
        np.testing.assert_array_equal(text.tokens, expected.tokens)
        np.testing.assert_array_equal(text.embed, expected.embed)
        assert text.length == expected.length


@pytest.mark.parametrize("rows", [slice(3, 20), np.array([0, 5, 13, 30])])
def test_index_and_slice_reads_agree(store, rows):
    full_tokens, full_embed = store.image_tokens(slice(None)), store.image_embed(slice(None))
    np.testing.assert_array_equal(store.image_tokens(rows), full_tokens[rows])
    np.testing.assert_array_equal(store.image_embed(rows), full_embed[rows])


@pytest.mark.parametrize("split_values, label", [(None, None), (["train"], None), (["val", "test"], "squares"),
                                                 (["nope"], "brightness")])
def test_rows_filter(store, split_values, label):
    rows = store.rows(split_values, label)
    expected = store.valid()
    if split_values is not None:
        expected &= np.isin(store.splits(), split_values)
    if label is not None:
        expected &= np.isfinite(store.label(label))
    np.testing.assert_array_equal(rows, np.flatnonzero(expected))
    assert rows.dtype == np.int64
    if split_values == ["nope"]:
        assert rows.size == 0


def test_unknown_label(store):
    with pytest.raises(InputError, match="labels are: squares, brightness"):
        store.label("cats")


def test_open_errors(tmp_path, tiny_shards, backbone):
    with pytest.raises(InputError, match="does not exist"):
        TokenStore.open(tmp_path / "missing.zarr")
    (tmp_path / "photos").mkdir()
    with pytest.raises(InputError, match="photos is not a token store"):
        TokenStore.open(tmp_path / "photos")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(InputError, match="not a rankpipe store"):
        TokenStore.open(tmp_path / "plain.zarr")
    manifest = load_manifest(tiny_shards)
    tars = list_tars(manifest.shard_urls())
    plan = plan_store(tars, 16 * 64 * 2, StoreConfig())
    texts = {label.query: backbone.encode_text(label.query) for label in manifest.labels}
    unfinished = create_store(tmp_path / "unfinished.zarr", plan, backbone.provenance, manifest, texts, StoreConfig())
    unfinished.mark_done(1)
    with pytest.raises(InputError, match=r"unfinished: 2 tar\(s\).*tiny-000000.tar, .*tiny-000002.tar"):
        TokenStore.open(tmp_path / "unfinished.zarr")
    assert TokenStore.open(tmp_path / "unfinished.zarr", allow_incomplete=True).missing_tars() == [tars[0].url, tars[2].url]


@pytest.mark.parametrize("counts, bytes_per_row", [
    ([12, 12, 12], 2048), ([1000, 1000, 37], 196 * 768 * 2), ([5000, 4999], 100 * 1536 * 2), ([0, 3], 64), ([1], 10**7),
])
def test_plan_gives_each_tar_whole_shards(counts, bytes_per_row):
    config = StoreConfig()
    plan = plan_store([TarInfo(f"t{i}.tar", c) for i, c in enumerate(counts)], bytes_per_row, config)
    assert plan.shard_rows % plan.chunk_rows == 0
    row = 0
    for block, count in zip(plan.tars, counts):
        assert block.row_start == row and (block.row_stop - block.row_start) % plan.shard_rows == 0
        assert 0 <= (block.row_stop - block.row_start) - count < plan.shard_rows
        row = block.row_stop
    # Chunks reach the target size unless the largest tar is smaller than one chunk.
    assert plan.chunk_rows * bytes_per_row >= config.chunk_bytes or plan.chunk_rows >= max(counts)
    assert plan.shard_rows * bytes_per_row <= config.shard_bytes + plan.chunk_rows * bytes_per_row or plan.shard_rows == plan.chunk_rows


def test_list_tars_reads_each_folder_index_once(tmp_path, monkeypatch):
    tars = [f"x-{i:06d}.tar" for i in range(5)]
    (tmp_path / "index.json").write_text(json.dumps({"tars": [{"name": n, "count": 3} for n in tars], "total": 15}))
    reads = []
    monkeypatch.setattr("rankpipe.pipeline.data.tars._read_index", lambda folder: reads.append(folder) or _read_index(folder))
    listed = list_tars([str(tmp_path / name) for name in tars])
    assert [(t.url, t.count) for t in listed] == [(str(tmp_path / name), 3) for name in tars]
    assert reads == [tmp_path]


def test_a_store_missing_an_array_or_with_a_truncated_chunk_is_a_sentence(tiny_store, tmp_path):
    missing = shutil.copytree(tiny_store, tmp_path / "missing.zarr")
    shutil.rmtree(missing / "image" / "valid")
    with pytest.raises(InputError, match=r"is damaged: it has no 'image/valid'; embed it again with --mode overwrite"):
        TokenStore.open(missing)

    cut = shutil.copytree(tiny_store, tmp_path / "cut.zarr")
    chunk = next(p for p in sorted((cut / "image" / "tokens").rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(InputError, match=r"is damaged: 'image/tokens' cannot be read"):
        TokenStore.open(cut).image_tokens(slice(None))
