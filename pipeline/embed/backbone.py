"""The frozen CLIP backbone: loading, its provenance, and the tokens the adapter learns from.

Image side: ViT towers give their output tokens after `ln_post` (class token dropped, unprojected)
and timm towers (ConvNeXt) their final trunk map flattened to tokens, each through the tower's own
pretrained head norm (as the released code keeps it; `token_norm` in the provenance); both also give
CLIP's pooled, projected embedding from the same forward pass. Images reach the tower through
`resize.ImagePreprocess` in the spec's resize mode. Text side: the text transformer's tokens after
`ln_final` (unprojected) and CLIP's projected text embedding.

Importing this module registers two tiny architectures for tests and demos (`TINY_VIT`,
`TINY_CONVNEXT`) with open_clip's model registry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
import zarr
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from PIL import Image

import rankpipe
from rankpipe.errors import InputError
from rankpipe.pipeline.embed.cache_choices import HEAD_NORM, LN_POST, NO_NORM, with_cache_choices
from rankpipe.pipeline.embed.decode import PIXEL_RULE
from rankpipe.pipeline.embed.resize import OPEN_CLIP_RESIZE_MODE, PAPER_RESIZE, RESIZE_MODES, ImagePreprocess
from rankpipe.pipeline.embed.weights import (
    RANDOM_WEIGHTS,
    ResolvedWeights,
    check_model_name,
    resolve_weights,
)

logger = logging.getLogger(__name__)

TINY_VIT = "rankpipe-tiny-vit"
TINY_CONVNEXT = "rankpipe-tiny-convnext"

# Their open_clip configs, one JSON file each (open_clip's own format), registered through open_clip's
# public add_model_config so that create_model, get_tokenizer and list_models all know them:
# - rankpipe-tiny-vit: 64 px / patch 16 = a 4x4 grid of 16 tokens of width 64; head_width 32 gives 2 heads.
# - rankpipe-tiny-convnext: timm ConvNeXt-atto trunk, 64 px / stride 32 = a 2x2 map of 320 channels;
#   covers the trunk-map path.
# Both share a 2-layer, width-32 text tower with CLIP's tokenizer.
TINY_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(TINY_CONFIG_DIR)

# The provenance fields that name the frozen CLIP itself; checked first, so that another model is
# reported as such rather than as one of the preprocessing differences it also brings.
BACKBONE_FIELDS = ("model", "pretrained", "checkpoint_sha256", "seed", "image_size")
# The provenance fields that must agree for two feature sets to be interchangeable (docs/store.md).
COMPATIBILITY_FIELDS = BACKBONE_FIELDS + ("resize", "preprocess", "token_norm")
# BackboneSpec.token_norm: the tower's own final norm on every token, or (timm towers) the raw trunk map.
TOWER_NORM = "tower"
TOKEN_NORMS = (TOWER_NORM, NO_NORM)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Which frozen CLIP to run."""

    # open_clip model name, e.g. "ViT-B-16" or "rankpipe-tiny-vit".
    model: str
    # open_clip pretrained tag, "none" for random weights, or a path to a local checkpoint file.
    pretrained: str = RANDOM_WEIGHTS
    # torch seed for random weights (recorded in provenance only when pretrained is "none").
    seed: int = 0
    # How images are fitted to the backbone's resolution: "squash" (the paper's) or "crop" (resize.py).
    resize: str = PAPER_RESIZE
    # "tower": tokens through the tower's own final norm (ViT ln_post, timm head norm); "none": a timm
    # tower's raw trunk map, only to rebuild what stores made before the head norm was applied hold.
    token_norm: str = TOWER_NORM

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise InputError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {self.resize!r}")
        if self.token_norm not in TOKEN_NORMS:
            raise ValueError(f"token_norm must be one of {TOKEN_NORMS}, not {self.token_norm!r}")


@dataclasses.dataclass(frozen=True)
class TextFeatures:
    """One prompt through the text tower."""

    # [L, Dt] float16: text-transformer tokens after ln_final, unprojected.
    tokens: np.ndarray
    # Tokens up to and including end-of-text (the rest is padding).
    length: int
    # [E] float16: CLIP's projected text embedding.
    embed: np.ndarray


class Backbone:
    """A loaded, frozen open_clip model with its preprocessing and provenance."""

    def __init__(self, model: torch.nn.Module, tokenizer: Callable, spec: BackboneSpec, weights: ResolvedWeights) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            if visual.attn_pool is not None:
                raise InputError(f"model {spec.model} pools image tokens with attention; use a CLIP ViT or a timm tower")
            visual.output_tokens = True
            self.kind = "vit"
        elif isinstance(visual, TimmModel):
            self.kind = "timm"
        else:
            raise InputError(f"model {spec.model} has a {type(visual).__name__} image tower; use a ViT or timm-tower model")
        self.preprocess_cfg: dict[str, Any] = {**visual.preprocess_cfg, "resize_mode": OPEN_CLIP_RESIZE_MODE[spec.resize]}
        self.image_size = _pair(visual.image_size)
        pp = self.preprocess_cfg
        # Image -> [3, H, W] input on the CPU; the GPU path (gpu_decode.py) reproduces it.
        self.preprocess: Callable[[Image.Image], torch.Tensor] = ImagePreprocess(
            self.image_size, spec.resize, tuple(pp["mean"]), tuple(pp["std"]), pp["interpolation"])
        self.token_norm = self._token_norm()
        self.token_grid = self._token_grid()
        self.token_dim = self._token_dim()
        self.embed_dim = int(open_clip.get_model_config(spec.model)["embed_dim"])
        self.text_ln = _text_ln_final(model)
        self.text_token_dim = int(self.text_ln.normalized_shape[0])
        self.context_length = int(getattr(model, "context_length", None) or model.text.context_length)
        self.provenance = self._provenance(weights)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_tokens(self) -> int:
        """P: patch tokens per image."""
        return self.token_grid[0] * self.token_grid[1]

    def encode_images(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens and pooled embedding from one forward pass.

        Args:
            images: [B, 3, H, W] preprocessed images on the model's device.

        Returns:
            tokens [B, P, D] and embed [B, E], in the compute dtype.
        """
        visual = self.model.visual
        if self.kind == "vit":
            embed, tokens = visual(images)  # [B, E], [B, P, D] (after ln_post, class token dropped)
            if visual.final_ln_after_pool:
                # This pooling variant applies ln_post to the pooled token only.
                tokens = visual.ln_post(tokens)
            return tokens, embed
        fmap = visual.trunk.forward_features(images)  # [B, D, h, w]
        B, D, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)  # [B, h*w, D]
        embed = visual.head(visual.trunk.forward_head(fmap))  # [B, E]
        if self.token_norm == HEAD_NORM:
            # The head norm normalises the pooled map over channels; here each position's channels.
            norm = visual.trunk.head.norm
            tokens = F.layer_norm(tokens, norm.normalized_shape, norm.weight, norm.bias, norm.eps)  # [B, h*w, D]
        return tokens, embed

    @torch.inference_mode()
    def encode_text(self, prompt: str) -> TextFeatures:
        """Text tokens (after ln_final) and projected embedding of one prompt, computed in float32."""
        _warn_if_truncated(self.tokenizer, prompt)
        ids = self.tokenizer([prompt]).to(self.device)  # [1, L]
        captured: list[torch.Tensor] = []
        # encode_text applies ln_final to all tokens before pooling; the hook keeps that output.
        handle = self.text_ln.register_forward_hook(lambda mod, inp, out: captured.append(out))
        try:
            embed = self.model.encode_text(ids)  # [1, E]
        finally:
            handle.remove()
        tokens = captured[0]
        if tokens.ndim != 3 or tokens.shape[1] != ids.shape[1]:
            raise InputError(f"model {self.spec.model} normalises only its pooled text token; its text tokens are not supported")
        return text_features(ids[0], tokens[0], embed[0], self.tokenizer)

    def _token_norm(self) -> str:
        """The token normalisation the spec asks of this tower (the `token_norm` provenance field)."""
        if self.kind == "vit":
            if self.spec.token_norm != TOWER_NORM:
                raise ValueError("ViT tokens are always taken after ln_post")
            return LN_POST
        norm = getattr(getattr(self.model.visual.trunk, "head", None), "norm", None)
        # timm's LayerNorm2d is a LayerNorm over channels; a tower without one has no head norm to apply.
        has_head_norm = isinstance(norm, torch.nn.LayerNorm)
        return HEAD_NORM if self.spec.token_norm == TOWER_NORM and has_head_norm else NO_NORM

    def _token_grid(self) -> tuple[int, int]:
        visual = self.model.visual
        if self.kind == "vit":
            return _pair(visual.grid_size)
        reduction = visual.trunk.feature_info[-1]["reduction"]
        return self.image_size[0] // reduction, self.image_size[1] // reduction

    def _token_dim(self) -> int:
        visual = self.model.visual
        return int(visual.transformer.width if self.kind == "vit" else visual.trunk.num_features)

    def _provenance(self, weights: ResolvedWeights) -> dict[str, Any]:
        pp = self.preprocess_cfg
        provenance = {
            "model": self.spec.model,
            "pretrained": weights.pretrained,
            "checkpoint_sha256": weights.checkpoint_sha256,
            "seed": self.spec.seed if weights.pretrained == RANDOM_WEIGHTS else None,
            "image_size": list(self.image_size),
            "resize": self.spec.resize,
            "token_norm": self.token_norm,
            "preprocess": {
                "mean": list(pp["mean"]), "std": list(pp["std"]),
                "interpolation": pp["interpolation"], "resize_mode": pp["resize_mode"],
                "fill_color": pp.get("fill_color", 0),
                "pixels": PIXEL_RULE,
            },
            "token_grid": list(self.token_grid),
            "token_dim": self.token_dim,
            "embed_dim": self.embed_dim,
            "text_token_dim": self.text_token_dim,
            "context_length": self.context_length,
            "dtype": "float16",
            "versions": {
                "torch": torch.__version__, "open_clip": open_clip.__version__,
                "zarr": zarr.__version__, "rankpipe": rankpipe.__version__,
            },
        }
        return _plain(provenance)


def load_backbone(spec: BackboneSpec, device: str | torch.device = "cpu") -> Backbone:
    """Create the frozen model, its eval preprocessing and tokenizer.

    Raises:
        InputError: unknown model, unknown tag or file, weights that cannot be downloaded.
    """
    check_model_name(spec.model)
    weights = resolve_weights(spec.model, spec.pretrained)
    if weights.path is None:
        torch.manual_seed(spec.seed)
    model = create_frozen_model(spec.model, weights, device)
    return Backbone(model, open_clip.get_tokenizer(spec.model), spec, weights)


def create_frozen_model(model_name: str, weights: ResolvedWeights, device: str | torch.device) -> torch.nn.Module:
    """The frozen open_clip model, from resolved weights (its images are prepared by `resize.ImagePreprocess`).

    Random weights come from torch's current seed; `load_backbone` seeds it.

    Raises:
        InputError: a weights file that is not a checkpoint of this model (wrong shapes, another
            model, or no checkpoint at all: torch and open_clip raise many types for those).
    """
    tag = weights.tag_cfg
    try:
        model = _create(model_name, weights, tag, device)
    except Exception as e:
        if weights.path is None:
            raise  # random weights: nothing the user gave can be wrong here
        detail = f"{type(e).__name__}: {str(e)[:200]}"
        raise InputError(f"weights file {weights.path} does not fit model {model_name} ({detail}); "
                         "pass an open_clip checkpoint of this model") from e
    model.eval().requires_grad_(False)
    return model


def _create(model_name: str, weights: ResolvedWeights, tag: dict, device: str | torch.device) -> torch.nn.Module:
    with _without_random_init_warning():
        model, _, _ = open_clip.create_model_and_transforms(
            model_name,
            pretrained=str(weights.path) if weights.path is not None else None,
            # The tag's preprocessing and activation travel with its weights; open_clip applies them
            # only when it downloads the tag itself, so they are passed on explicitly here.
            image_mean=tag.get("mean"), image_std=tag.get("std"),
            image_interpolation=tag.get("interpolation"),
            force_quick_gelu=bool(tag.get("quick_gelu", False)),
            pretrained_text=False,
            device=device,
        )
    return model


@contextlib.contextmanager
def _without_random_init_warning() -> Iterator[None]:
    """Drop open_clip's root-logger warning that weights are random: `--pretrained none` asked for that."""

    def keep(record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def compatibility_problem(a: dict[str, Any], b: dict[str, Any],
                          fields: Sequence[str] = COMPATIBILITY_FIELDS) -> str | None:
    """Why two provenance records cannot share features, or None when they can.

    Compares `fields`; the sentence names the first differing field and both values. Records made
    before the cache choices (resize, views, token_norm) were recorded compare with their defaults.
    """
    a, b = _plain(with_cache_choices(a)), _plain(with_cache_choices(b))
    for field in fields:
        if a.get(field) != b.get(field):
            return f"backbone field '{field}' differs: {a.get(field)!r} vs {b.get(field)!r}"
    return None


def _plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, so records compare equal after a trip through zarr attrs."""
    return json.loads(json.dumps(value))


def _pair(value: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _text_ln_final(model: torch.nn.Module) -> torch.nn.LayerNorm:
    ln = getattr(model, "ln_final", None)
    if ln is None:
        ln = getattr(getattr(model, "text", None), "ln_final", None)
    if ln is None:
        raise InputError(f"the text tower {type(getattr(model, 'text', model)).__name__} has no ln_final; use a CLIP text transformer")
    return ln


def text_features(ids: torch.Tensor, tokens: torch.Tensor, embed: torch.Tensor, tokenizer: Callable) -> TextFeatures:
    """One prompt's text-tower outputs as the store keeps them.

    Args:
        ids: [L] its token ids.
        tokens: [L, Dt] the text transformer's tokens after ln_final.
        embed: [E] the projected text embedding.
        tokenizer: the tokenizer that made `ids` (it knows the end-of-text id).
    """
    return TextFeatures(
        tokens=tokens.float().cpu().numpy().astype(np.float16),  # [L, Dt]
        length=_text_length(ids, tokenizer),
        embed=embed.float().cpu().numpy().astype(np.float16),  # [E]
    )


def _text_length(ids: torch.Tensor, tokenizer: Callable) -> int:
    """Tokens up to and including end-of-text; ids is [L]."""
    eot = getattr(tokenizer, "eot_token_id", None)
    if eot is not None:
        hits = (ids == eot).nonzero()
        if len(hits):
            return int(hits[0, 0]) + 1
    return int((ids != 0).sum())


def _warn_if_truncated(tokenizer: Callable, prompt: str) -> None:
    """Say when a query is longer than the text tower reads: the tokenizer cuts it without a word."""
    encode, context = getattr(tokenizer, "encode", None), getattr(tokenizer, "context_length", None)
    if encode is None or context is None:
        return  # a tokenizer without a plain encode (e.g. Hugging Face's) is not measured
    length = len(encode(prompt)) + 2  # with the start and end markers
    if length > context:
        logger.warning("query %r is %d tokens long, more than the %d the text tower reads: it is cut to fit, "
                       "so its end plays no part; shorten it", prompt, length, context)
