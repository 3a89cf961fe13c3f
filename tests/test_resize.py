"""Resize modes: the shared geometry, the PIL path against open_clip's transforms, the GPU path on CPU
tensors against the PIL path, and what `embed --resize` records and refuses."""

from __future__ import annotations

from io import BytesIO

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.embed.backbone import TINY_CONVNEXT, TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.embed.gpu_decode import GpuPreprocess
from rankpipe.pipeline.embed.job import embed
from rankpipe.pipeline.embed.resize import Geometry, resize_geometry
from rankpipe.pipeline.store import TokenStore

from conftest import read_tar_samples, tiny_image

SIZES = [(80, 60), (61, 97), (64, 64), (200, 123), (65, 300)]  # (width, height) of PIL images


@pytest.mark.parametrize("height, width, resize, expected", [
    (60, 80, "squash", Geometry((64, 64), 0, 0)),
    (60, 80, "crop", Geometry((64, 85), 0, 10)),  # long side 64 * 80 / 60 = 85.3, truncated; (85 - 64) / 2 = 10.5 -> 10
    (97, 61, "crop", Geometry((101, 64), 18, 0)),  # 64 * 97 / 61 = 101.77 -> 101; round(18.5) = 18 (to even)
    (64, 64, "crop", Geometry((64, 64), 0, 0)),
])
def test_resize_geometry(height, width, resize, expected):
    assert resize_geometry(height, width, (64, 64), resize) == expected


def test_non_square_targets_keep_the_ratio_and_cut_the_centre():
    # open_clip's keep-ratio resize: scale by the smaller ratio (80 / 48 here), then centre-crop (32, 48).
    assert resize_geometry(60, 80, (32, 48), "crop") == Geometry((36, 48), 2, 0)
    geometry = resize_geometry(100, 50, (32, 48), "crop")  # ratios 100/32 and 50/48: the width decides
    assert geometry.size == (96, 48) and (geometry.top, geometry.left) == (32, 0)
    assert resize_geometry(100, 50, (32, 48), "squash") == Geometry((32, 48), 0, 0)


@pytest.mark.parametrize("resize, open_clip_mode", [("crop", "shortest"), ("squash", "squash")])
def test_the_pil_path_equals_open_clips_own_transform_bit_for_bit(resize, open_clip_mode):
    backbone = load_backbone(BackboneSpec(TINY_VIT, "none", resize=resize))
    pp = backbone.preprocess_cfg
    reference = open_clip.image_transform(64, is_train=False, mean=pp["mean"], std=pp["std"],
                                          interpolation=pp["interpolation"], resize_mode=open_clip_mode)
    rng = np.random.default_rng(0)
    for size in SIZES:
        image = tiny_image(rng, 3, size)
        assert torch.equal(backbone.preprocess(image), reference(image)), size


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_the_gpu_path_run_on_cpu_tensors_matches_the_pil_path(resize):
    backbone = load_backbone(BackboneSpec(TINY_VIT, "none", resize=resize))
    gpu = GpuPreprocess(backbone.preprocess, torch.device("cpu"))
    rng = np.random.default_rng(1)
    images = [tiny_image(rng, 4, size) for size in SIZES]
    pil = torch.stack([backbone.preprocess(image) for image in images])  # [n, 3, 64, 64]
    decoded = [torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() for image in images]  # [3, h, w] uint8
    tensor = gpu.preprocess_decoded(decoded)  # [n, 3, 64, 64]
    assert tensor.shape == pil.shape
    # Torch's antialiased bicubic and PIL's differ by a few levels of 255 at the squares' sharp edges, 0 elsewhere.
    difference = (tensor - pil).abs()
    assert difference.max() < 0.12 and difference.mean() < 1e-3, (difference.max(), difference.mean())
    # The two modes really differ on non-square images: the geometry is not ignored.
    other = GpuPreprocess(load_backbone(BackboneSpec(TINY_VIT, "none", resize="crop" if resize == "squash" else "squash"))
                          .preprocess, torch.device("cpu")).preprocess_decoded(decoded[:1])
    assert (other - tensor[:1]).abs().mean() > 0.05


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_embed_records_the_resize_mode_and_its_rows_are_the_backbone_on_that_input(tmp_path, tiny_shards, resize):
    path = tmp_path / "x.zarr"
    embed(load_manifest(tiny_shards), path, BackboneSpec(TINY_VIT, "none", resize=resize), batch_size=8,
          workers=0, progress=False)
    store = TokenStore.open(path)
    assert store.provenance["resize"] == resize
    assert store.provenance["preprocess"]["resize_mode"] == {"squash": "squash", "crop": "shortest"}[resize]
    # Row 0 is the first sample of the first tar: its tokens are the backbone on the mode's input.
    sample = read_tar_samples(store.tar_urls()[0])[0]
    backbone = load_backbone(BackboneSpec(TINY_VIT, "none", resize=resize))
    with torch.inference_mode():
        tokens, _ = backbone.encode_images(backbone.preprocess(Image.open(BytesIO(sample["jpg"])).convert("RGB"))[None])
    np.testing.assert_array_equal(store.image_tokens(slice(0, 1))[0], tokens[0].numpy().astype(np.float16))


def test_the_paper_s_squash_is_the_default_and_crop_is_another_store(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    manifest = load_manifest(tiny_shards)
    embed(manifest, path, BackboneSpec(TINY_VIT, "none"), batch_size=8, workers=0, progress=False)
    assert TokenStore.open(path).provenance["resize"] == "squash"
    # A finished squash store is not taken for a crop one: the rerun is refused, not skipped.
    with pytest.raises(InputError, match="embedded with --resize squash and this run asks for --resize crop.*--mode overwrite"):
        embed(manifest, path, BackboneSpec(TINY_VIT, "none", resize="crop"), batch_size=8, workers=0, progress=False)
    summary = embed(manifest, path, BackboneSpec(TINY_VIT, "none", resize="crop"), batch_size=8, workers=0,
                    progress=False, mode="overwrite")
    assert summary.tars_embedded == 3 and TokenStore.open(path).provenance["resize"] == "crop"


def test_cli_resize_option(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(path), "--model", TINY_CONVNEXT,
                                      "--resize", "crop", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    provenance = TokenStore.open(path).provenance
    assert (provenance["resize"], provenance["token_norm"]) == ("crop", "head_norm")
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(tmp_path / "y.zarr"), "--model",
                                      TINY_VIT, "--resize", "pad"])
    assert result.exit_code == 2 and "'pad' is not one of" in result.output
