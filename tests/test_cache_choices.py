"""Cache choices (resize mode, views, token normalisation): defaults of older records, and a checkpoint
refused on a store of other choices by eval, rank --store and resume, while rank --images rebuilds them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import load_manifest
from rankpipe.pipeline.embed.backbone import TINY_CONVNEXT, TINY_VIT, BackboneSpec, compatibility_problem, load_backbone
from rankpipe.pipeline.embed.cache_choices import CacheChoices, cache_choices
from rankpipe.pipeline.embed.job import embed
from rankpipe.pipeline.embed.recorded_backbone import load_recorded_backbone
from rankpipe.pipeline.store import TokenStore

from conftest import assert_rank_matches_store, tiny_config, write_synthetic_store

CACHE_FIELDS = ("resize", "views", "token_norm")


def older(provenance: dict) -> dict:
    """A provenance record as stores made before the cache choices were recorded carry it."""
    return {key: value for key, value in provenance.items() if key not in CACHE_FIELDS}


def embed_tiny(tiny_shards, path, spec=BackboneSpec(TINY_VIT, "none", seed=0), **kwargs) -> TokenStore:
    embed(load_manifest(tiny_shards), path, spec, batch_size=8, workers=0, progress=False, **kwargs)
    return TokenStore.open(path)


@pytest.fixture(scope="module")
def crop_store(tiny_shards, tmp_path_factory) -> TokenStore:
    return embed_tiny(tiny_shards, tmp_path_factory.mktemp("crop") / "crop.zarr",
                      BackboneSpec(TINY_VIT, "none", seed=0, resize="crop"))


def test_older_records_read_as_crop_original_view_and_raw_timm_tokens():
    vit = load_backbone(BackboneSpec(TINY_VIT, "none", resize="crop")).provenance
    convnext = load_backbone(BackboneSpec(TINY_CONVNEXT, "none", resize="crop")).provenance
    assert cache_choices(older(vit)) == CacheChoices("crop", ("original",), "ln_post")
    assert cache_choices(older(convnext)) == CacheChoices("crop", ("original",), "none")
    # Weights whose own open_clip transform squashes made squashed stores all along.
    squashed = {**older(vit), "preprocess": {**vit["preprocess"], "resize_mode": "squash"}}
    assert cache_choices(squashed).resize == "squash"
    # An older ViT store is interchangeable with a crop store of today; an older ConvNeXt one is not.
    assert compatibility_problem(older(vit), vit) is None
    assert "resize" in compatibility_problem(older(vit), load_backbone(BackboneSpec(TINY_VIT, "none")).provenance)
    assert "token_norm" in compatibility_problem(older(convnext), convnext)


def test_the_recorded_choices_are_rebuilt_for_ranking_new_images():
    convnext = load_backbone(BackboneSpec(TINY_CONVNEXT, "none", seed=2)).provenance
    rebuilt = load_recorded_backbone(convnext)
    assert (rebuilt.spec.resize, rebuilt.token_norm) == ("squash", "head_norm")
    # Stores made before the choices were recorded: shortest side + centre crop, raw trunk-map tokens.
    made_then = load_backbone(BackboneSpec(TINY_CONVNEXT, "none", seed=2, resize="crop")).provenance
    old = load_recorded_backbone(older(made_then))
    assert (old.spec.resize, old.token_norm) == ("crop", "none")
    assert old.provenance["preprocess"]["resize_mode"] == "shortest"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        raw = old.encode_images(x)[0]
        fmap = old.model.visual.trunk.forward_features(x)  # [1, D, 2, 2]
    torch.testing.assert_close(raw[0], fmap[0].flatten(1).T)


def test_rank_images_re_embeds_with_the_checkpoint_s_resize_mode(crop_store, tmp_path):
    checkpoint = train_from_store(crop_store, tmp_path / "run", tiny_config("train.max_steps=10", "train.eval_every=5")).best_path
    assert load_checkpoint(checkpoint).provenance["resize"] == "crop"
    assert_rank_matches_store(checkpoint, crop_store, "squares")


def test_eval_and_rank_store_refuse_a_checkpoint_of_another_resize_mode(tiny_checkpoint, crop_store):
    for args in (["eval", "--store", str(crop_store.path), "--checkpoint", str(tiny_checkpoint), "--bootstrap", "0"],
                 ["rank", "--checkpoint", str(tiny_checkpoint), "--store", str(crop_store.path),
                  "--query", "Sort images by brightness."]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert (f"was trained on a store embedded with --resize squash, but store {crop_store.path} was embedded with "
                "--resize crop; re-embed the images with --resize squash, or use a checkpoint trained on store") in result.output


def test_a_flip_view_store_is_scored_from_its_original_view(tiny_checkpoint, tiny_store, tiny_shards, tmp_path):
    flip = embed_tiny(tiny_shards, tmp_path / "flip.zarr", flip_view=True)
    plain = TokenStore.open(tiny_store)
    loaded = load_checkpoint(tiny_checkpoint)
    rows = plain.rows()
    np.testing.assert_array_equal(predict(loaded, flip, "squares", rows), predict(loaded, plain, "squares", rows))


def test_a_checkpoint_of_raw_convnext_tokens_is_refused_on_a_head_normed_store(tmp_path, tiny_shards):
    store = embed_tiny(tiny_shards, tmp_path / "c.zarr", BackboneSpec(TINY_CONVNEXT, "none", seed=0))
    checkpoint = train_from_store(store, tmp_path / "run", tiny_config("train.max_steps=5", "train.eval_every=5")).best_path
    payload = torch.load(checkpoint, weights_only=True)
    payload["provenance"] = older(payload["provenance"])  # as trained on a store made before the head norm
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(InputError, match="raw timm trunk-map tokens.*head norm.*train a checkpoint on the store"):
        predict(load_checkpoint(tmp_path / "old.pt"), store, "squares", store.rows())


def test_resume_is_refused_on_a_store_of_other_views(tmp_path):
    plain = write_synthetic_store(tmp_path / "p.zarr")
    flip = write_synthetic_store(tmp_path / "f.zarr", flip_view=True)
    train_from_store(plain, tmp_path / "run", tiny_config("train.max_steps=20"))
    with pytest.raises(InputError, match="--resume: .* was trained on a store embedded with no --flip-view, but this "
                                         "run's store was embedded with --flip-view; resume with the store it was trained on"):
        train_from_store(flip, tmp_path / "run", tiny_config("train.max_steps=40"), resume=True)
