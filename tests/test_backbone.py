"""Backbone loading, token extraction, provenance and weight resolution."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest
import torch

from rankpipe.errors import InputError
from rankpipe.pipeline.embed.backbone import (
    COMPATIBILITY_FIELDS,
    TINY_CONVNEXT,
    TINY_VIT,
    BackboneSpec,
    compatibility_problem,
    load_backbone,
)

TINY_MODELS = [TINY_VIT, TINY_CONVNEXT]


@pytest.fixture(scope="module", params=TINY_MODELS)
def backbone(request):
    return load_backbone(BackboneSpec(request.param, "none", seed=0))


def test_image_tokens_shapes_and_pooled_parity(backbone):
    torch.manual_seed(0)
    x = torch.randn(3, 3, *backbone.image_size)
    with torch.inference_mode():
        tokens, embed = backbone.encode_images(x)
        reference = backbone.model.encode_image(x)
    reference = reference[0] if isinstance(reference, tuple) else reference
    P, D, E = backbone.num_tokens, backbone.token_dim, backbone.embed_dim
    assert tokens.shape == (3, P, D) and embed.shape == (3, E)
    assert torch.isfinite(tokens).all() and torch.isfinite(embed).all()
    # The pooled embedding from the token pass equals open_clip's own encode_image.
    torch.testing.assert_close(embed, reference)
    expected = {TINY_VIT: (16, 64), TINY_CONVNEXT: (4, 320)}[backbone.spec.model]
    assert (P, D) == expected


def test_vit_tokens_are_ln_post_outputs_without_class_token():
    backbone = load_backbone(BackboneSpec(TINY_VIT, "none", seed=0))
    visual = backbone.model.visual
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens, _ = backbone.encode_images(x)
        h = visual.transformer(visual._embeds(x))  # [2, 1 + P, D]
        expected = visual.ln_post(h)[:, 1:]  # [2, P, D]
    torch.testing.assert_close(tokens, expected)


def test_convnext_tokens_are_the_trunk_map_through_the_head_norm_per_token():
    backbone = load_backbone(BackboneSpec(TINY_CONVNEXT, "none", seed=0))
    norm = backbone.model.visual.trunk.head.norm  # timm's LayerNorm2d over channels
    with torch.no_grad():  # a trained norm: not the identity affine of a fresh one
        norm.weight.copy_(torch.linspace(0.5, 2.0, norm.weight.numel()))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, norm.bias.numel()))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens, embed = backbone.encode_images(x)
        fmap = backbone.model.visual.trunk.forward_features(x)  # [2, D, h, w]
        normed = norm(fmap)  # [2, D, h, w]: the tower's own module applied to the whole map
    assert backbone.provenance["token_norm"] == "head_norm"
    assert tokens.shape == (2, fmap.shape[2] * fmap.shape[3], fmap.shape[1])
    # Token 3 = row 1, column 1: the head norm of that position's channels, by hand and by the module.
    column = fmap[1, :, 1, 1]
    by_hand = (column - column.mean()) / torch.sqrt(column.var(unbiased=False) + norm.eps) * norm.weight + norm.bias
    torch.testing.assert_close(tokens[1, 3], by_hand, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens[1, 3], normed[1, :, 1, 1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(tokens[1, 3], column, atol=1e-2)
    # The pooled embedding is CLIP's own, untouched by the token normalisation.
    torch.testing.assert_close(embed, backbone.model.encode_image(x))


def test_raw_trunk_tokens_are_rebuilt_for_stores_made_before_the_head_norm():
    backbone = load_backbone(BackboneSpec(TINY_CONVNEXT, "none", seed=0, token_norm="none"))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        tokens, _ = backbone.encode_images(x)
        fmap = backbone.model.visual.trunk.forward_features(x)  # [2, D, h, w]
    assert backbone.provenance["token_norm"] == "none"
    torch.testing.assert_close(tokens[1, 3], fmap[1, :, 1, 1])
    assert load_backbone(BackboneSpec(TINY_VIT, "none")).provenance["token_norm"] == "ln_post"


def test_text_features(backbone):
    prompt = "Sort images by the number of cats."
    features = backbone.encode_text(prompt)
    ids = backbone.tokenizer([prompt])[0]
    assert features.tokens.shape == (backbone.context_length, backbone.text_token_dim)
    assert features.tokens.dtype == np.float16 and features.embed.dtype == np.float16
    assert features.length == int(ids.argmax()) + 1  # end-of-text has the largest id in CLIP's vocabulary
    with torch.inference_mode():
        reference = backbone.model.encode_text(ids[None])[0].numpy()
    np.testing.assert_allclose(features.embed, reference, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("model", TINY_MODELS)
def test_random_weights_are_seeded(model):
    x = torch.randn(1, 3, 64, 64)
    outputs = []
    for seed in (0, 0, 1):
        backbone = load_backbone(BackboneSpec(model, "none", seed=seed))
        with torch.inference_mode():
            outputs.append(backbone.encode_images(x)[1])
        assert backbone.provenance["seed"] == seed
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])


def test_provenance_fields(backbone):
    p = backbone.provenance
    assert p["model"] == backbone.spec.model and p["pretrained"] == "none" and p["checkpoint_sha256"] is None
    assert p["image_size"] == [64, 64] and p["dtype"] == "float16" and p["context_length"] == 77
    assert p["token_grid"][0] * p["token_grid"][1] == backbone.num_tokens
    assert set(p["preprocess"]) >= {"mean", "std", "interpolation", "resize_mode"}
    assert set(p["versions"]) == {"torch", "open_clip", "zarr", "rankpipe"}


def test_local_checkpoint_file(tmp_path):
    source = load_backbone(BackboneSpec(TINY_VIT, "none", seed=7))
    path = tmp_path / "tiny.pt"
    torch.save(source.model.state_dict(), path)
    loaded = load_backbone(BackboneSpec(TINY_VIT, str(path), seed=0))
    assert loaded.provenance["pretrained"] == "file"
    assert loaded.provenance["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.provenance["seed"] is None
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.encode_images(x)[0], source.encode_images(x)[0])


def test_offline_pretrained_fails_fast():
    start = time.perf_counter()
    with pytest.raises(InputError, match="--pretrained") as info:
        load_backbone(BackboneSpec("ViT-B-16", "openai"))
    # A correctness bound, not a benchmark: the hub client's retries take close to a minute.
    assert time.perf_counter() - start < 10
    assert "no network" in str(info.value) and "none" in str(info.value)


@pytest.mark.parametrize("model, pretrained, message", [
    ("ViT-B-61", "none", "close matches: ViT-B-16"),
    ("ViT-B-16", "not-a-tag", "known tags for ViT-B-16: openai"),
    ("ViT-B-16", "/nonexistent/weights.pt", "does not exist"),
])
def test_bad_names_are_input_errors(model, pretrained, message):
    with pytest.raises(InputError, match=message):
        load_backbone(BackboneSpec(model, pretrained))


def _record(**changes):
    record = {
        "model": "ViT-B-16", "pretrained": "none", "checkpoint_sha256": None, "seed": 0,
        "image_size": [224, 224], "preprocess": {"mean": [0.5], "std": [0.5], "interpolation": "bicubic"},
        "token_grid": [14, 14], "versions": {"torch": "2.0"},
    }
    record.update(changes)
    return record


def test_compatible_records_ignore_versions_and_tuples():
    a = _record()
    b = _record(versions={"torch": "9.9"}, image_size=(224, 224))
    assert compatibility_problem(a, b) is None


@pytest.mark.parametrize("field, value", [
    ("model", "ViT-L-14"), ("pretrained", "openai"), ("checkpoint_sha256", "ab12"), ("seed", 3),
    ("image_size", [336, 336]), ("preprocess", {"mean": [0.4], "std": [0.5], "interpolation": "bicubic"}),
])
def test_incompatible_records_name_field_and_values(field, value):
    assert field in COMPATIBILITY_FIELDS
    problem = compatibility_problem(_record(), _record(**{field: value}))
    assert problem is not None and f"'{field}'" in problem and repr(value) in problem


def test_compatibility_checks_only_the_fields_asked_for():
    a, b = _record(), _record(token_grid=[7, 7])
    assert compatibility_problem(a, b) is None
    problem = compatibility_problem(a, b, COMPATIBILITY_FIELDS + ("token_grid",))
    assert problem == "backbone field 'token_grid' differs: [14, 14] vs [7, 7]"


@pytest.mark.parametrize("content", [b"hello\n", b"\x80\x02}q\x00."], ids=["text", "empty-pickle"])
def test_a_weights_file_that_is_no_checkpoint_is_an_input_error(tmp_path, content):
    path = tmp_path / "open_clip_pytorch_model.bin"
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"weights file {path} does not fit model {TINY_VIT}"):
        load_backbone(BackboneSpec(TINY_VIT, str(path)), "cpu")


def test_a_query_longer_than_the_text_context_is_cut_with_a_warning(backbone, caplog):
    context = backbone.tokenizer.context_length
    long_query = "Sort images by " + " ".join(["colour"] * context) + "."
    with caplog.at_level("WARNING"):
        backbone.encode_text("Sort images by brightness.")
    assert "cut to fit" not in caplog.text
    with caplog.at_level("WARNING"):
        backbone.encode_text(long_query)
    assert f"more than the {context} the text tower reads: it is cut to fit" in caplog.text
