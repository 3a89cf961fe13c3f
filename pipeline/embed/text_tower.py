"""The text half of a recorded frozen CLIP: sentences to text tokens, with no image tower.

Ranking a store by a sentence its checkpoint was not trained on needs that sentence's text tokens
from the CLIP that embedded the store, and nothing of its image tower: the images are tokens already.
`load_recorded_text_tower` builds only open_clip's text transformer and loads only its weights, from
the weights the provenance records (a tag's cached or downloaded file, or a local file with the
recorded SHA-256; see recorded_backbone.py). Random weights are the one exception: they are
recreated from the recorded seed, and the text tower's initial values depend on everything the image
tower drew from the generator before it, so the whole model is initialised on the CPU, its text half
copied and the rest dropped before anything runs. Either way the tokens equal `Backbone.encode_text`'s
bit for bit (tests/test_text_tower.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import load_state_dict
from open_clip.model import _build_text_tower
from open_clip.transformer import TextTransformer

from rankpipe.errors import InputError
from rankpipe.pipeline.embed.backbone import TextFeatures, create_frozen_model, text_features
from rankpipe.pipeline.embed.recorded_backbone import recorded_weights
from rankpipe.pipeline.embed.weights import RANDOM_WEIGHTS, ResolvedWeights, check_model_name

logger = logging.getLogger(__name__)

# Provenance fields that fix the shapes of what the text tower returns.
TEXT_SHAPE_FIELDS = ("text_token_dim", "context_length", "embed_dim")
# State-dict keys of the text tower in open_clip's CLIP layout (its CustomTextCLIP layout prefixes "text.").
_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")


class TextTower:
    """A frozen open_clip text transformer and its tokenizer."""

    def __init__(self, text: TextTransformer, tokenizer: Callable, model: str) -> None:
        self.text = text
        self.tokenizer = tokenizer
        self.model = model
        # Tokens after ln_final for every position, as `Backbone.encode_text` captures them.
        self.text.output_tokens = True

    @property
    def device(self) -> torch.device:
        return next(self.text.parameters()).device

    @property
    def shapes(self) -> dict[str, int]:
        """Its `TEXT_SHAPE_FIELDS`, as a provenance records them."""
        return {"text_token_dim": int(self.text.ln_final.normalized_shape[0]), "context_length": int(self.text.context_length),
                "embed_dim": int(self.text.output_dim)}

    @torch.inference_mode()
    def encode_text(self, prompt: str) -> TextFeatures:
        """Text tokens (after ln_final) and projected embedding of one prompt, computed in float32."""
        ids = self.tokenizer([prompt]).to(self.device)  # [1, L]
        embed, tokens = self.text(ids)  # [1, E], [1, L, Dt]
        return text_features(ids[0], tokens[0], embed[0], self.tokenizer)


def load_recorded_text_tower(provenance: dict[str, Any], device: str | torch.device = "cpu",
                             backbone_weights: str | Path | None = None, what: str = "the store") -> TextTower:
    """The text tower of the backbone `provenance` records, without its image tower.

    Args:
        provenance: a store's or checkpoint's provenance record (docs/store.md).
        device: where the text tower runs.
        backbone_weights: the weights file when the provenance needs one (see `recorded_weights`).
        what: how error messages name the provenance's owner, e.g. "store feats/x.zarr".

    Raises:
        InputError: the weights cannot be found or do not match the record, the model's text tower is
            not an open_clip text transformer, or the rebuilt tower's shapes differ from the record's.
    """
    model = str(provenance["model"])
    check_model_name(model)
    config = open_clip.get_model_config(model)
    text_cfg = dict(config["text_cfg"])
    if text_cfg.get("hf_model_name"):
        raise InputError(f"model {model} has a Hugging Face text tower; its text tokens are not supported")
    weights = recorded_weights(provenance, backbone_weights, what)
    state = _text_state(model, weights, provenance)
    quick_gelu = bool(config.get("quick_gelu", False) or weights.tag_cfg.get("quick_gelu", False))
    text = _build_text_tower(config["embed_dim"], text_cfg, quick_gelu=quick_gelu)
    try:
        text.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise InputError(f"weights file {weights.path} does not hold the text tower of model {model}: {e}") from e
    text.to(device).eval().requires_grad_(False)
    tower = TextTower(text, open_clip.get_tokenizer(model), model)
    for field, value in tower.shapes.items():
        if provenance.get(field) is not None and provenance[field] != value:
            raise InputError(f"the text tower rebuilt for {what} has {field} {value}, but its record says "
                             f"{provenance[field]}; pass the backbone weights it was embedded with")
    return tower


def _text_state(model: str, weights: ResolvedWeights, provenance: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The text tower's weights: read from the weights file, or initialised from the recorded seed."""
    if weights.pretrained != RANDOM_WEIGHTS:
        return text_state_dict(load_state_dict(str(weights.path), device="cpu"))
    # The seed's text weights are what it draws after the image tower's: initialise both, keep one.
    torch.manual_seed(int(provenance["seed"]))
    clip = create_frozen_model(model, weights, "cpu")
    state = text_state_dict(clip.state_dict())
    del clip
    return state


def text_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text transformer's entries of a whole CLIP state dict, named as `TextTransformer` names them.

    Both of open_clip's layouts are read: CLIP (text weights at the root) and CustomTextCLIP (under "text.").
    """
    nested = {key[len("text."):]: value for key, value in state.items() if key.startswith("text.")}
    if nested:
        return nested
    return {key: value for key, value in state.items() if key.startswith(_CLIP_TEXT_KEYS)}
