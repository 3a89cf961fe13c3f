"""The embed job: bad samples, truncated tars, resume after SIGKILL, refusal, overwrite, determinism, CLI."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
import zarr
from click.testing import CliRunner
from PIL import Image

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest, load_manifest
from rankpipe.pipeline.embed.backbone import TINY_CONVNEXT, TINY_VIT, Backbone, BackboneSpec
from rankpipe.pipeline.embed.decode import (
    ALPHA_BACKGROUND,
    PIXEL_RULE,
    TarBatches,
    TarTask,
    parse_json,
    to_rgb,
)
from rankpipe.pipeline.embed.gpu_decode import ORIENTATION_TAG
from rankpipe.pipeline.embed.job import embed, manifest_for_pattern
from rankpipe.pipeline.embed.store_writer import NON_FINITE_REASON
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import StoreConfig, TokenStore

from conftest import TINY_LABELS, encode, tiny_image, write_tiny_shards

TINY = BackboneSpec(TINY_VIT, "none", seed=0)
LABEL_NAMES = [label.name for label in TINY_LABELS]


def run_embed(manifest_path: Path, store: Path, spec: BackboneSpec = TINY, **kwargs):
    kwargs = {"device": "cpu", "batch_size": 4, "workers": 0, "progress": False, **kwargs}
    return embed(load_manifest(manifest_path), store, spec, **kwargs)


def store_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_same_store(a: Path, b: Path) -> None:
    sa, sb = TokenStore.open(a), TokenStore.open(b)
    np.testing.assert_array_equal(sa.keys(), sb.keys())
    np.testing.assert_array_equal(sa.valid(), sb.valid())
    np.testing.assert_array_equal(sa.errors(), sb.errors())
    for name in sa.label_names:
        np.testing.assert_array_equal(sa.label(name), sb.label(name))
    assert sa.views == sb.views
    for view in sa.views:
        assert sa.image_tokens(slice(None), view).tobytes() == sb.image_tokens(slice(None), view).tobytes()
        assert sa.image_embed(slice(None), view).tobytes() == sb.image_embed(slice(None), view).tobytes()


# --- bad samples -------------------------------------------------------------------------------------


@pytest.mark.parametrize("meta, split, labels, error", [
    (None, "", [np.nan, np.nan], "missing json"),
    (b"{not json", "", [np.nan, np.nan], "unreadable json"),
    (b'{"split": "train"}', "", [np.nan, np.nan], "no 'labels' object"),
    (b'{"labels": {"squares": "many"}, "split": "val"}', "val", [np.nan, np.nan], "label 'squares' is not a number"),
    (b'{"labels": {"squares": true}}', "", [np.nan, np.nan], "not a number"),
    (b'{"labels": {"other": 1}}', "", [np.nan, np.nan], "no value for any label"),
    (b'{"labels": {"brightness": 0.5}, "split": "test"}', "test", [np.nan, 0.5], ""),
    (b'{"labels": {"squares": 3, "brightness": null}}', "", [3.0, np.nan], ""),
    (b'{"labels": {"squares": 1' + b"0" * 400 + b'}}', "", [np.nan, np.nan], "label 'squares' is not finite"),
    (b'{"labels": {"brightness": 1e400}}', "", [np.nan, np.nan], "label 'brightness' is not finite"),
])
def test_parse_json(meta, split, labels, error):
    got = parse_json(meta, LABEL_NAMES)
    assert got.split == split
    np.testing.assert_array_equal(np.asarray(got.labels, dtype=np.float32), np.asarray(labels, dtype=np.float32))
    assert (error in got.error) if error else got.error == ""


@pytest.mark.parametrize("meta, split, source", [
    (None, "", ""),
    (b"{not json", "", ""),
    (b'{"caption": "a dog", "url": "http://x"}', "", ""),
    (b'{"labels": {}, "split": "", "source": "photos/a.jpg"}', "", "photos/a.jpg"),
    (b'{"split": 3, "source": 4}', "", ""),
])
def test_an_unlabelled_sample_needs_no_json(meta, split, source):
    got = parse_json(meta, [])
    assert (got.split, got.source, got.error, got.labels) == (split, source, "", [])


def write_damaged_shards(folder: Path, with_index: bool) -> Path:
    """Tar 0: one sample of each kind of damage among good ones; tar 1: 12 good samples, cut in half."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    good = lambda i: {"jpg": encode(tiny_image(rng, 2)),
                      "json": json.dumps({"labels": {"squares": 2, "brightness": 0.5}, "split": "train"}).encode()}
    damaged = {
        1: {"jpg": b"\xff\xd8\xff\xe0 this is not a jpeg"},
        2: {"jpg": encode(tiny_image(rng, 1))[:300]},
        3: {"json": None},
        4: {"json": b'{"labels": {"squares": "lots"}}'},
        5: {"jpg": None},
    }
    with wds.TarWriter(str(folder / "bad-000000.tar")) as sink:
        for i in range(8):
            sample = {"__key__": f"b{i}", **good(i)}
            for k, v in damaged.get(i, {}).items():
                if v is None:
                    sample.pop(k)
                else:
                    sample[k] = v
            sink.write(sample)
    cut = folder / "bad-000001.tar"
    with wds.TarWriter(str(cut)) as sink:
        for i in range(12):
            sink.write({"__key__": f"c{i}", **good(i)})
    os.truncate(cut, cut.stat().st_size // 2)
    if with_index:
        index = {"tars": [{"name": "bad-000000.tar", "count": 8}, {"name": "bad-000001.tar", "count": 12}], "total": 20}
        (folder / "index.json").write_text(json.dumps(index))
    path = folder / "manifest.yaml"
    Manifest(name="bad", shards="bad-{000000..000001}.tar", labels=TINY_LABELS).save(path)
    return path


def test_a_file_that_is_no_image_gets_the_same_reason_in_every_run(tmp_path):
    # PIL's own message for it names the memory address of a buffer, different in every process.
    with wds.TarWriter(str(tmp_path / "x.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": b"plain text, no image",
                    "json": json.dumps({"labels": {"squares": 1}}).encode()})
    batches = TarBatches([TarTask(0, str(tmp_path / "x.tar"), 1)], ["squares"], 4, lambda image: image,
                         jpeg_on_gpu=False)
    (batch,) = list(batches)
    assert batch.errors == ["unreadable image: not an image format PIL can identify"]


@pytest.mark.parametrize("with_index", [False, True])
def test_bad_samples_and_truncated_tar(tmp_path, with_index):
    manifest = write_damaged_shards(tmp_path / "shards", with_index)
    summary = run_embed(manifest, tmp_path / "bad.zarr")
    store = TokenStore.open(tmp_path / "bad.zarr")
    keys, valid, errors = store.keys(), store.valid(), store.errors()
    (s0, _), (s1, stop1) = store.row_blocks()
    assert list(keys[s0:s0 + 8]) == [f"b{i}" for i in range(8)]
    np.testing.assert_array_equal(valid[s0:s0 + 8], [True, False, False, False, False, False, True, True])
    assert "unreadable image" in errors[s0 + 1] and "unreadable image" in errors[s0 + 2]
    assert errors[s0 + 3] == "missing json"
    assert "not a number" in errors[s0 + 4]
    assert errors[s0 + 5].startswith("no image")
    assert (errors[s0:s0 + 8][valid[s0:s0 + 8]] == "").all()
    # The truncated tar keeps its readable samples; the rest are invalid with a reason.
    count = store.blocks[1].count
    readable = int(valid[s1:stop1].sum())
    assert 3 <= readable < 12 and valid[s1:s1 + readable].all()
    assert list(keys[s1:s1 + readable]) == [f"c{i}" for i in range(readable)]
    if with_index:
        assert count == 12
        assert all(e.startswith("not read: the tar ended after") for e in errors[s1 + readable + 1:s1 + 12])
    assert all(e != "" for e in errors[s1 + readable:s1 + count])
    assert summary.invalid == 5 + count - readable and summary.images_embedded == 3 + readable
    # Invalid rows hold zeros, never stale features.
    assert not store.image_tokens(np.flatnonzero(~valid)).any()


def test_several_shards_per_tar_hold_the_same_rows_as_one(tmp_path):
    # Batches of 3 usable images over tars with invalid samples put each batch's rows across shard borders, with gaps.
    manifest = write_damaged_shards(tmp_path / "shards", with_index=True)
    run_embed(manifest, tmp_path / "one.zarr", batch_size=3)
    row_bytes = 16 * 64 * 2  # P * D * fp16 of the tiny ViT
    small = StoreConfig(chunk_bytes=row_bytes, shard_bytes=4 * row_bytes)
    run_embed(manifest, tmp_path / "many.zarr", batch_size=3, store_config=small)
    one, many = TokenStore.open(tmp_path / "one.zarr"), TokenStore.open(tmp_path / "many.zarr")
    assert many.shard_rows == 4 and one.shard_rows >= 12
    for block, (a, _), (b, _) in zip(one.blocks, one.row_blocks(), many.row_blocks()):
        rows_one, rows_many = slice(a, a + block.count), slice(b, b + block.count)
        for name in ("keys", "valid", "errors"):
            np.testing.assert_array_equal(getattr(one, name)()[rows_one], getattr(many, name)()[rows_many])
        np.testing.assert_array_equal(one.image_tokens(rows_one), many.image_tokens(rows_many))
        np.testing.assert_array_equal(one.image_embed(rows_one), many.image_embed(rows_many))
    assert many.valid().sum() == one.valid().sum() > 0


# --- resume, refusal, overwrite, determinism --------------------------------------------------------


@pytest.mark.parametrize("flip_view", [False, True], ids=["original", "flip-view"])
def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, flip_view):
    manifest = write_tiny_shards(tmp_path / "shards", n_tars=20, per_tar=6, seed=3)
    killed = tmp_path / "killed.zarr"
    code = ("from rankpipe.cli.main import cli; cli()")
    args = [sys.executable, "-c", code, "embed", str(manifest), "--store", str(killed), "--model", TINY_VIT,
            "--pretrained", "none", "--batch-size", "4", "--workers", "0", "--no-progress"]
    args += ["--flip-view"] if flip_view else []
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        # Kill as soon as the first tar is marked done: the run is then mid-way through the next ones.
        while not (killed / "done" / "c" / "0").exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the embed run never finished a tar"
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    interrupted = TokenStore.open(killed, allow_incomplete=True)
    done_before = int(interrupted.done().sum())
    assert 1 <= done_before < 20
    with pytest.raises(InputError, match="unfinished"):
        TokenStore.open(killed)

    summary = run_embed(manifest, killed, flip_view=flip_view)
    assert summary.tars_skipped == done_before and summary.tars_embedded == 20 - done_before
    reference = tmp_path / "reference.zarr"
    run_embed(manifest, reference, flip_view=flip_view)
    assert_same_store(killed, reference)
    files = store_files(killed)
    assert files == store_files(reference)
    assert any(name.startswith("image/hflip/tokens/c") for name in files) == flip_view


@pytest.mark.parametrize("flip_view", [False, True], ids=["original", "flip-view"])
def test_identical_bytes_run_to_run_and_with_workers(tmp_path, tiny_shards, flip_view):
    run_embed(tiny_shards, tmp_path / "a.zarr", flip_view=flip_view)
    run_embed(tiny_shards, tmp_path / "b.zarr", workers=2, flip_view=flip_view)
    assert store_files(tmp_path / "a.zarr") == store_files(tmp_path / "b.zarr")


def test_rerun_of_finished_store_does_nothing(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    run_embed(tiny_shards, path)
    before = {p: p.stat().st_mtime_ns for p in path.rglob("*")}
    summary = run_embed(tiny_shards, path)
    assert summary.tars_embedded == 0 and summary.tars_skipped == 3
    assert "nothing to do" in summary.line()
    assert {p: p.stat().st_mtime_ns for p in path.rglob("*")} == before


@pytest.mark.parametrize("spec, field", [
    (BackboneSpec(TINY_VIT, "none", seed=1), "seed"),
    (BackboneSpec(TINY_CONVNEXT, "none", seed=0), "model"),
])
def test_incremental_refuses_another_backbone_and_overwrite_replaces(tmp_path, tiny_shards, spec, field):
    path = tmp_path / "x.zarr"
    run_embed(tiny_shards, path)
    with pytest.raises(InputError, match=f"'{field}'.*--mode overwrite"):
        run_embed(tiny_shards, path, spec=spec)
    run_embed(tiny_shards, path, spec=spec, mode="overwrite")
    store = TokenStore.open(path)
    assert store.provenance[field] == getattr(spec, field)
    assert store.valid().sum() == 36


def test_rerun_of_finished_store_does_not_load_the_backbone(tmp_path, tiny_shards, monkeypatch):
    path = tmp_path / "x.zarr"
    run_embed(tiny_shards, path)

    def no_loading(*args, **kwargs):
        raise AssertionError("the backbone was loaded for a finished store")

    monkeypatch.setattr("rankpipe.pipeline.embed.job.load_backbone", no_loading)
    assert "nothing to do" in run_embed(tiny_shards, path).line()
    # Other weights are not a finished match: the full check runs (and here, loads the backbone).
    with pytest.raises(AssertionError, match="backbone was loaded"):
        run_embed(tiny_shards, path, spec=BackboneSpec(TINY_VIT, "none", seed=1))


def test_a_store_of_raw_trunk_map_tokens_is_refused_finished_or_not(tmp_path, tiny_shards):
    # A ConvNeXt store as rankpipe made them before the head norm: token_norm "none".
    path = tmp_path / "x.zarr"
    raw = BackboneSpec(TINY_CONVNEXT, "none", seed=0, token_norm="none")
    run_embed(tiny_shards, path, spec=raw)
    assert "nothing to do" in run_embed(tiny_shards, path, spec=raw).line()
    # Today's spec normalises tokens: the complete store is refused as the unfinished one is, not skipped.
    today = BackboneSpec(TINY_CONVNEXT, "none", seed=0)
    with pytest.raises(InputError, match="embedded with raw timm trunk-map tokens") as complete:
        run_embed(tiny_shards, path, spec=today)
    zarr.open_group(str(path), mode="r+")["done"][0] = False
    with pytest.raises(InputError, match="embedded with raw timm trunk-map tokens") as unfinished:
        run_embed(tiny_shards, path, spec=today)
    assert str(complete.value) == str(unfinished.value)


def test_store_records_its_decoder_and_refuses_to_resume_with_another(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    run_embed(tiny_shards, path)
    group = zarr.open_group(str(path), mode="r+")
    assert group.attrs["provenance"]["image_decoder"] == "pil"
    # Pretend a CUDA run (GPU decoding) made the store; a CPU run must not add rows decoded by PIL.
    group.attrs["provenance"] = {**group.attrs["provenance"], "image_decoder": "gpu"}
    group["done"][0] = False  # an unfinished tar: the rerun has rows to add
    with pytest.raises(InputError, match="decoded by 'gpu'.*CUDA"):
        run_embed(tiny_shards, path)


def test_incremental_refuses_other_tars(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    run_embed(tiny_shards, path)
    other = write_tiny_shards(tmp_path / "other", n_tars=2)
    with pytest.raises(InputError, match="tars differ"):
        run_embed(other, path)


def test_overwrite_with_bad_inputs_keeps_the_store(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    run_embed(tiny_shards, path)
    before = store_files(path)
    with pytest.raises(InputError, match="unknown model"):
        run_embed(tiny_shards, path, spec=BackboneSpec("ViT-B-61"), mode="overwrite")
    with pytest.raises(InputError, match="does not exist"):
        run_embed(write_missing_tar_manifest(tmp_path), path, mode="overwrite")
    assert store_files(path) == before


def write_missing_tar_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "missing" / "manifest.yaml"
    path.parent.mkdir()
    Manifest(name="missing", shards="gone-{000000..000001}.tar", labels=TINY_LABELS).save(path)
    return path


def test_compressed_store_holds_the_same_values(tmp_path, tiny_shards):
    run_embed(tiny_shards, tmp_path / "plain.zarr")
    run_embed(tiny_shards, tmp_path / "zstd.zarr", compress=True)
    assert TokenStore.open(tmp_path / "zstd.zarr").compressed
    codecs = zarr.open_group(tmp_path / "zstd.zarr", mode="r")["image/tokens"].compressors
    assert [type(c).__name__ for c in codecs] == ["ZstdCodec"]
    assert_same_store(tmp_path / "plain.zarr", tmp_path / "zstd.zarr")
    with pytest.raises(InputError, match="compression on"):
        run_embed(tiny_shards, tmp_path / "zstd.zarr")


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_help():
    result = CliRunner().invoke(cli, ["embed", "--help"])
    assert result.exit_code == 0
    for option in ("--store", "--model", "--pretrained", "--device", "--batch-size", "--workers", "--mode",
                   "--compress", "--label", "--query"):
        assert option in result.output
    assert "embed" in CliRunner().invoke(cli, ["--help"]).output


def test_cli_bare_pattern(tmp_path, tiny_shards):
    pattern = str(tiny_shards.parent / "tiny-{000000..000002}.tar")
    args = ["embed", pattern, "--store", str(tmp_path / "x.zarr"), "--model", TINY_VIT, "--workers", "0",
            "--label", "squares", "--query", "Sort images by the number of squares.", "--no-progress"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "embedded 36 images from 3 tars (0 invalid" in result.output
    store = TokenStore.open(tmp_path / "x.zarr")
    assert store.label_names == ["squares"] and store.query("squares") == "Sort images by the number of squares."
    assert np.isfinite(store.label("squares")[store.valid()]).all()


@pytest.mark.parametrize("extra, message", [
    (["--pretrained", "openai", "--model", "ViT-B-16"], "--pretrained /path/to/weights"),
    (["--model", "ViT-B-61"], "close matches"),
    (["--model", TINY_VIT, "--mode", "sideways"], "'sideways' is not one of 'incremental', 'overwrite'"),
    (["--model", TINY_VIT, "--device", "tpu"], "unknown device 'tpu'"),
])
def test_cli_user_errors_exit_2(tmp_path, tiny_shards, extra, message):
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(tmp_path / "x.zarr"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_user_error(tmp_path, tiny_shards):
    with pytest.raises(InputError, match="no CUDA GPU"):
        run_embed(tiny_shards, tmp_path / "x.zarr", device="cuda")


def test_a_bare_pattern_without_labels_is_an_unlabelled_collection():
    manifest = manifest_for_pattern("shards/x-{0..1}.tar", [])
    assert manifest.labels == () and manifest.name == "x-"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_path_matches_cpu(tmp_path, tiny_shards):
    run_embed(tiny_shards, tmp_path / "cpu.zarr")
    run_embed(tiny_shards, tmp_path / "gpu.zarr", device="cuda", workers=2)
    cpu, gpu = TokenStore.open(tmp_path / "cpu.zarr"), TokenStore.open(tmp_path / "gpu.zarr")
    np.testing.assert_array_equal(cpu.keys(), gpu.keys())
    np.testing.assert_array_equal(cpu.valid(), gpu.valid())
    rows = cpu.rows()
    a = cpu.image_embed(rows).astype(np.float32)
    b = gpu.image_embed(rows).astype(np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    # nvjpeg decoding, GPU resampling and bf16 compute differ from PIL + fp32 only by rounding.
    assert cosine.min() > 0.98, cosine.min()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_path_records_bad_samples(tmp_path):
    manifest = write_damaged_shards(tmp_path / "shards", with_index=True)
    run_embed(manifest, tmp_path / "bad.zarr", device="cuda", workers=2)
    store = TokenStore.open(tmp_path / "bad.zarr")
    valid, errors = store.valid(), store.errors()
    assert list(valid[:8][[0, 1, 3, 4, 5, 6, 7]]) == [True, False, False, False, False, True, True]
    assert "unreadable image" in errors[1]
    assert valid[store.blocks[1].row_start:store.blocks[1].row_stop].sum() >= 3


@pytest.mark.parametrize("workers", [0, 1])
def test_index_listing_too_few_samples_is_a_user_error(tmp_path, workers):
    manifest = write_tiny_shards(tmp_path / "shards", n_tars=1, per_tar=6, with_index=True)
    index = json.loads((manifest.parent / "index.json").read_text())
    index["tars"][0]["count"] = 4
    (manifest.parent / "index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="more than the 4 samples") as raised:
        run_embed(manifest, tmp_path / "x.zarr", workers=workers)
    assert "Traceback" not in str(raised.value) and "\n" not in str(raised.value)  # one sentence, also from a worker


def _write_index_with_digests(folder: Path) -> None:
    tars = sorted(folder.glob("*.tar"))
    entries = [{"name": p.name, "count": 12, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in tars]
    (folder / "index.json").write_text(json.dumps({"tars": entries, "total": 12 * len(tars)}))


@pytest.mark.parametrize("with_digests", [False, True], ids=["stat", "digest"])
def test_tars_rebuilt_under_the_same_names_are_not_taken_for_the_embedded_ones(tmp_path, with_digests):
    """Same names and counts, new images and labels: a finished store is not 'complete', a resumed one not mixed."""
    shards = tmp_path / "shards"
    manifest = write_tiny_shards(shards, seed=0)
    if with_digests:
        _write_index_with_digests(shards)
    path = tmp_path / "x.zarr"
    run_embed(manifest, path)
    before = store_files(path)
    time.sleep(0.01)  # a new modification time even on coarse clocks
    write_tiny_shards(shards, seed=1)
    if with_digests:
        _write_index_with_digests(shards)
    with pytest.raises(InputError, match=r"tiny-000000\.tar changed since it was embedded.*--mode overwrite"):
        run_embed(manifest, path)
    assert store_files(path) == before
    run_embed(manifest, path, mode="overwrite")
    assert TokenStore.open(path).keys()[0] == "t0-0000" and store_files(path) != before



# --- pixels as people see them --------------------------------------------------------------------------


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_16_bit_gradient_keeps_its_levels():
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))  # [8, 256] full range
    image = Image.open(io.BytesIO(_png(Image.fromarray(ramp))))
    assert image.mode.startswith("I")
    pixels = np.asarray(to_rgb(image))  # [8, 256, 3]
    assert pixels.shape == (8, 256, 3) and pixels[..., 0].mean() == pytest.approx(127.5, abs=1)
    np.testing.assert_array_equal(pixels[0, :, 0], np.rint(ramp[0] / 257).astype(np.uint8))


def test_transparent_pixels_show_the_background_not_their_hidden_colour():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # hidden red under full transparency
    rgba[:2, :, 3] = 255  # the top half is opaque red
    pixels = np.asarray(to_rgb(Image.open(io.BytesIO(_png(Image.fromarray(rgba, mode="RGBA"))))))
    assert (pixels[:2] == [255, 0, 0]).all() and (pixels[2:] == ALPHA_BACKGROUND).all()


def test_exif_orientation_is_applied():
    wide = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6  # stored sideways: shown rotated by 90 degrees
    buffer = io.BytesIO()
    wide.save(buffer, format="JPEG", exif=exif)
    assert to_rgb(Image.open(io.BytesIO(buffer.getvalue()))).size == (10, 30)


def test_the_pixel_rule_is_part_of_the_provenance(tmp_path, tiny_shards):
    run_embed(tiny_shards, tmp_path / "x.zarr")
    assert TokenStore.open(tmp_path / "x.zarr").provenance["preprocess"]["pixels"] == PIXEL_RULE


def test_an_image_the_backbone_turns_into_nan_is_an_invalid_row(tmp_path, tiny_shards, monkeypatch, caplog):
    encode = Backbone.encode_images
    poisoned: list[bool] = []

    def first_image_nan(self, images):
        tokens, embed = encode(self, images)
        if not poisoned:  # the first image of the first batch
            tokens, poisoned[:] = tokens.clone(), [True]
            tokens[0, 0, 0] = float("nan")
        return tokens, embed

    monkeypatch.setattr(Backbone, "encode_images", first_image_nan)
    run_embed(tiny_shards, tmp_path / "x.zarr")
    store = TokenStore.open(tmp_path / "x.zarr")
    row = int(np.flatnonzero(store.keys() == "t0-0000")[0])
    assert not store.valid()[row] and store.errors()[row] == NON_FINITE_REASON
    assert not store.image_tokens(np.array([row])).any()  # zeros, like every invalid row
    assert store.valid().sum() == 35 and np.isfinite(store.image_tokens(store.rows())).all()
    with caplog.at_level("WARNING"):
        LabelledStore.open(store)
    assert "1 image(s) of store" in caplog.text and "non-finite features" in caplog.text


def test_tars_without_any_of_the_labels_end_with_exit_2_not_an_empty_store(tmp_path, tiny_shards):
    manifest = load_manifest(tiny_shards)
    other = dataclasses.replace(manifest, labels=(LabelSpec("age", "Sort people by age."),))
    with pytest.raises(InputError, match="no image of store .* became a valid row; most rows say: no value for any label"):
        embed(other, tmp_path / "x.zarr", TINY, batch_size=4, workers=0, progress=False)


def test_one_key_on_two_images_is_refused(tmp_path):
    folder = tmp_path / "hand"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for t in range(2):
        with wds.TarWriter(str(folder / f"h-{t:06d}.tar")) as sink:
            for i in range(3):
                key = "same" if i == 0 else f"t{t}-{i}"
                sink.write({"__key__": key, "jpg": encode(tiny_image(rng, 1)),
                            "json": json.dumps({"labels": {"squares": 1}, "split": "train"}).encode()})
    manifest = Manifest(name="h", shards=str(folder / "h-{000000..000001}.tar"), labels=TINY_LABELS[:1])
    with pytest.raises(InputError, match="key 'same' names 2 images"):
        embed(manifest, tmp_path / "x.zarr", TINY, batch_size=4, workers=0, progress=False)


def test_a_full_disk_is_a_sentence_and_the_rerun_resumes(tmp_path, tiny_shards, monkeypatch):
    path = tmp_path / "x.zarr"
    write = TokenStore.write_tokens
    calls = []

    def full_after_one_shard(self, row_start, tokens, embed, flipped=None, codec_pipeline="zarr"):
        calls.append(row_start)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "image" / "tokens"))
        write(self, row_start, tokens, embed, flipped, codec_pipeline)

    monkeypatch.setattr(TokenStore, "write_tokens", full_after_one_shard)
    with pytest.raises(InputError, match=r"cannot write store .*No space left on device; .*rerun the same command"):
        run_embed(tiny_shards, path)
    monkeypatch.setattr(TokenStore, "write_tokens", write)
    assert run_embed(tiny_shards, path).tars_embedded >= 1
    reference = tmp_path / "reference.zarr"
    run_embed(tiny_shards, reference)
    assert_same_store(path, reference)


def _killed_while_decoding(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_decoding_worker_is_a_sentence_and_the_rerun_finishes(tmp_path, tiny_shards, monkeypatch):
    import rankpipe.pipeline.embed.decode as decode

    monkeypatch.setattr(decode, "decode_image", _killed_while_decoding)  # workers fork with the patch in place
    with pytest.raises(InputError, match=r"a decoding worker of store .* stopped .*fewer --workers"):
        run_embed(tiny_shards, tmp_path / "x.zarr", workers=1)
    monkeypatch.undo()
    run_embed(tiny_shards, tmp_path / "x.zarr", workers=1)
    assert TokenStore.open(tmp_path / "x.zarr").valid().sum() == 36
