"""The text tower alone: the same text tokens as the whole backbone, without building an image tower."""

from __future__ import annotations

import numpy as np
import open_clip.model
import pytest
import torch

from rankpipe.errors import InputError
from rankpipe.pipeline.embed import weights as weights_module
from rankpipe.pipeline.embed.backbone import TINY_CONVNEXT, TINY_VIT, BackboneSpec, load_backbone
from rankpipe.pipeline.embed.text_tower import load_recorded_text_tower, text_state_dict

SENTENCES = ("Sort images by the number of circles.", "Sort images by how blue the sky is.")


def assert_same_text(tower, backbone) -> None:
    for sentence in SENTENCES:
        alone, whole = tower.encode_text(sentence), backbone.encode_text(sentence)
        assert alone.length == whole.length
        assert alone.tokens.tobytes() == whole.tokens.tobytes() and alone.embed.tobytes() == whole.embed.tobytes()


@pytest.mark.parametrize("model", [TINY_VIT, TINY_CONVNEXT])
def test_random_weights_give_the_backbones_text_tokens(model):
    backbone = load_backbone(BackboneSpec(model, "none", seed=3))
    tower = load_recorded_text_tower(backbone.provenance)
    assert_same_text(tower, backbone)
    assert not hasattr(tower.text, "visual")
    text_params = sum(v.numel() for k, v in backbone.model.state_dict().items() if not k.startswith(("visual.", "logit_")))
    assert sum(p.numel() for p in tower.text.parameters()) == text_params


def test_a_weights_file_builds_no_image_tower(tmp_path, monkeypatch):
    path = tmp_path / "tiny-seed1.pt"
    torch.save(load_backbone(BackboneSpec(TINY_VIT, "none", seed=1)).model.state_dict(), path)
    backbone = load_backbone(BackboneSpec(TINY_VIT, str(path)))
    provenance = backbone.provenance
    assert provenance["pretrained"] == "file"

    def no_image_tower(*args, **kwargs):
        raise AssertionError("the image tower was built")

    monkeypatch.setattr(open_clip.model, "_build_vision_tower", no_image_tower)
    tower = load_recorded_text_tower(provenance, backbone_weights=path)
    assert_same_text(tower, backbone)
    with pytest.raises(InputError, match="pass that file with --backbone-weights"):
        load_recorded_text_tower(provenance)
    other = tmp_path / "other.pt"
    torch.save({"positional_embedding": torch.zeros(3)}, other)
    with pytest.raises(InputError, match="has SHA-256 .* but the store records weights of SHA-256"):
        load_recorded_text_tower(provenance, backbone_weights=other)
    with pytest.raises(InputError, match="does not hold the text tower"):
        load_recorded_text_tower({**provenance, "checkpoint_sha256": weights_module.file_sha256(other)}, backbone_weights=other)


def test_a_tag_file_is_read_with_the_tags_activation(tmp_path, monkeypatch):
    path = tmp_path / "tag.pt"
    torch.save(load_backbone(BackboneSpec(TINY_VIT, "none", seed=2)).model.state_dict(), path)
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda model, tag: {"hf_hub": "nobody/tiny/", "quick_gelu": True} if tag == "tiny-tag" else real(model, tag))
    provenance = {**load_backbone(BackboneSpec(TINY_VIT, str(path))).provenance, "pretrained": "tiny-tag",
                  "checkpoint_sha256": None}
    plain = load_recorded_text_tower({**provenance, "pretrained": "file",
                                      "checkpoint_sha256": weights_module.file_sha256(path)}, backbone_weights=path)
    quick = load_recorded_text_tower(provenance, backbone_weights=path)
    assert isinstance(quick.text.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert not isinstance(plain.text.transformer.resblocks[0].mlp.gelu, open_clip.model.QuickGELU)
    assert not np.array_equal(quick.encode_text(SENTENCES[0]).tokens, plain.encode_text(SENTENCES[0]).tokens)


def test_text_state_dict_reads_both_open_clip_layouts():
    tensor = torch.zeros(1)
    clip = {"visual.conv1.weight": tensor, "transformer.resblocks.0.ln_1.weight": tensor, "token_embedding.weight": tensor,
            "positional_embedding": tensor, "ln_final.bias": tensor, "text_projection": tensor, "logit_scale": tensor}
    assert sorted(text_state_dict(clip)) == ["ln_final.bias", "positional_embedding", "text_projection",
                                             "token_embedding.weight", "transformer.resblocks.0.ln_1.weight"]
    custom = {"visual.trunk.stem.weight": tensor, "text.token_embedding.weight": tensor, "text.ln_final.weight": tensor}
    assert sorted(text_state_dict(custom)) == ["ln_final.weight", "token_embedding.weight"]
