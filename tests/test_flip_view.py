"""Flipped views: what `embed --flip-view` stores, and how training draws one view per image and step."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rankpipe.adapter.training.features import BatchSampler, load_features
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.streaming import StreamingFeatures, open_features
from rankpipe.adapter.training.views import draw_flips, gather_views
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.embed.job import embed
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

from conftest import interrupted_then_resumed, read_tar_samples, tiny_config, weights, write_synthetic_store

TINY = BackboneSpec(TINY_VIT, "none", seed=0)
# Twice conftest's STREAMED budget: a flip-view store holds both views of its training rows, so its
# windows hold one tar each at this budget, as the plain store's do at STREAMED.
FLIP_STREAMED = ("train.max_resident_gb=3e-5", "train.window_steps=7")


@pytest.fixture(scope="module")
def flip_store(tiny_shards, tmp_path_factory) -> TokenStore:
    """tiny_shards embedded as tiny_store is, with a flip view."""
    path = tmp_path_factory.mktemp("flip") / "flip.zarr"
    embed(load_manifest(tiny_shards), path, TINY, batch_size=8, workers=0, progress=False, flip_view=True)
    return TokenStore.open(path)


def test_a_flip_view_store_holds_the_mirror_images_and_the_original_view_unchanged(flip_store, tiny_store):
    plain = TokenStore.open(tiny_store)
    assert flip_store.views == ("original", "hflip") and plain.views == ("original",)
    assert flip_store.provenance["views"] == ["original", "hflip"]
    # The original view is byte for byte that of a store without a flip view (its own forward pass).
    for read in ("image_tokens", "image_embed"):
        assert getattr(flip_store, read)(slice(None)).tobytes() == getattr(plain, read)(slice(None)).tobytes()
    # Row 0's flipped view is the backbone on the preprocessed image mirrored along its width.
    sample = read_tar_samples(flip_store.tar_urls()[0])[0]
    backbone = load_backbone(TINY)
    x = backbone.preprocess(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))[None]  # [1, 3, 64, 64]
    with torch.inference_mode():
        tokens, embed_ = backbone.encode_images(x.flip(-1))
    np.testing.assert_array_equal(flip_store.image_tokens(slice(0, 1), "hflip")[0], tokens[0].numpy().astype(np.float16))
    np.testing.assert_array_equal(flip_store.image_embed(slice(0, 1), "hflip")[0], embed_[0].numpy().astype(np.float16))
    rows = flip_store.rows()
    assert not np.array_equal(flip_store.image_tokens(rows, "hflip"), flip_store.image_tokens(rows))
    with pytest.raises(InputError, match="no 'hflip' view.*--flip-view"):
        plain.image_tokens(rows, "hflip")


def test_resuming_with_another_view_choice_is_refused(tmp_path, tiny_shards):
    path = tmp_path / "x.zarr"
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(path), "--model", TINY_VIT,
                                      "--flip-view", "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["embed", str(tiny_shards), "--store", str(path), "--model", TINY_VIT,
                                      "--workers", "0", "--no-progress"])
    assert result.exit_code == 2
    assert "embedded with --flip-view and this run asks for no --flip-view" in result.output


def test_view_draws_are_a_function_of_seed_and_step():
    device = torch.device("cpu")
    a, b = draw_flips(0, 7, 4096, device), draw_flips(0, 7, 4096, device)
    assert torch.equal(a, b)
    assert not torch.equal(a, draw_flips(0, 8, 4096, device)) and not torch.equal(a, draw_flips(1, 7, 4096, device))
    assert 0.45 < a.float().mean() < 0.55


def test_gather_takes_each_row_from_its_drawn_view():
    original = torch.arange(10 * 2 * 3, dtype=torch.float16).view(10, 2, 3)  # [R, P, D]
    flipped = -original - 1
    index = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    tokens = gather_views(original, flipped, index, seed=5, step=11)
    flips = draw_flips(5, 11, len(index), torch.device("cpu"))
    assert 0 < flips.sum() < len(index)
    for b, row in enumerate(index):
        assert torch.equal(tokens[b], (flipped if flips[b] else original)[row])
    assert torch.equal(gather_views(original, None, index, seed=5, step=11), original[index])


@pytest.mark.parametrize("budget", [(), FLIP_STREAMED], ids=["resident", "streamed"])
def test_training_batches_draw_one_view_per_image_and_validation_reads_the_original(tmp_path, budget):
    store = write_synthetic_store(tmp_path / "s.zarr", flip_view=True)
    data = LabelledStore.open(store, None, ())
    config = tiny_config(*budget)
    features = open_features(data, "cpu", config.train)
    assert isinstance(features, StreamingFeatures) == bool(budget)
    sampler = BatchSampler(features.train_sizes, config.train.batch_size, config.train.seed, "cpu")
    rows = np.flatnonzero(store.valid())  # every row the features could hold
    original = {key: tokens for key, tokens in zip(store.keys()[rows], store.image_tokens(rows))}
    mirrored = {key: tokens for key, tokens in zip(store.keys()[rows], store.image_tokens(rows, "hflip"))}
    took = []
    for step in (1, 2, 3):
        batch = features.train_batch(step, sampler)
        flips = draw_flips(config.train.seed, step, len(batch.rows), torch.device("cpu"))
        for b, key in enumerate(features.keys[batch.rows.numpy()]):
            expected = (mirrored if flips[b] else original)[key]
            np.testing.assert_array_equal(batch.image_tokens[b].numpy(), expected)
            took.append(bool(flips[b]))
    assert 0 < sum(took) < len(took)  # both views are drawn
    query = features.queries[0]
    val = torch.cat(list(features.val_batches(0, 7))).numpy()
    val_keys = store.keys()[query.val_rows] if budget else features.keys[query.val_index.numpy()]
    np.testing.assert_array_equal(val, np.stack([original[key] for key in val_keys]))


def test_a_flip_view_doubles_the_resident_budget(tmp_path):
    store = write_synthetic_store(tmp_path / "s.zarr", flip_view=True)
    plain = write_synthetic_store(tmp_path / "p.zarr")
    data, plain_data = LabelledStore.open(store, None, ()), LabelledStore.open(plain, None, ())
    one_view = 16 * 4 * 2 * len(np.unique(np.concatenate([np.concatenate(p) for p in plain_data.split_rows().values()])))
    load_features(plain_data, "cpu", one_view / 1e9)  # fits
    with pytest.raises(InputError, match="max_resident_gb"):
        load_features(data, "cpu", one_view / 1e9)
    assert load_features(data, "cpu", 2 * one_view / 1e9).flipped_tokens is not None


@pytest.mark.parametrize("budget", [(), FLIP_STREAMED], ids=["resident", "streamed"])
def test_flip_training_resumes_to_the_uninterrupted_run_and_differs_from_no_flips(tmp_path, budget):
    store = write_synthetic_store(tmp_path / "s.zarr", flip_view=True)
    config = tiny_config("train.max_steps=40", *budget)
    full = train_from_store(store, tmp_path / "full", config)

    resumed = interrupted_then_resumed(store, tmp_path / "cut", config)
    a, b = weights(full.last_path), weights(resumed.last_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The same original tokens without a flip view train other weights: the flipped views were used.
    plain = train_from_store(write_synthetic_store(tmp_path / "p.zarr"), tmp_path / "plain", config)
    c = weights(plain.last_path)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.load(full.last_path, weights_only=True)["provenance"]["views"] == ["original", "hflip"]
