"""Scoring images against text prompts with the frozen CLIP, shared by the untrained baselines.

Prompt embeddings come from the text tower of the backbone the store was embedded with (rebuilt
from its provenance), in float32, and are saved in the checkpoint, so scoring later needs no
backbone. Untrained scores are brought to label units by an affine map fitted on the train split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


class PromptEncoder:
    """CLIP's projected text embeddings of prompts, from the backbone a provenance record names.

    The backbone is rebuilt on the first call only, so methods that need no prompts never load it.
    """

    def __init__(self, provenance: dict[str, Any], device: str | torch.device = "cpu",
                 backbone_weights: str | Path | None = None, what: str = "the store") -> None:
        self.provenance = provenance
        self.device = torch.device(device)
        self.backbone_weights = backbone_weights
        self.what = what
        self._backbone = None

    def backbone(self):
        """The frozen Backbone (pipeline/embed/backbone.py), rebuilt on the first call.

        Raises:
            InputError: the backbone's weights cannot be loaded (see load_recorded_backbone).
        """
        if self._backbone is None:
            from rankpipe.pipeline.embed.recorded_backbone import load_recorded_backbone

            self._backbone = load_recorded_backbone(self.provenance, self.device, self.backbone_weights, self.what)
        return self._backbone

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        """[K, E] float32 projected (unnormalised) text embeddings of `prompts`.

        Raises:
            InputError: the backbone's weights cannot be loaded (see load_recorded_backbone).
        """
        backbone = self.backbone()
        ids = backbone.tokenizer(list(prompts)).to(backbone.device)  # [K, L]
        return backbone.model.encode_text(ids).float().cpu().numpy()  # [K, E]


def cosine(embed: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Cosine similarity of every image with every prompt.

    Args:
        embed: [n, E] image embeddings.
        prompts: [K, E] text embeddings.

    Returns:
        [n, K] float64.
    """
    a = np.asarray(embed, dtype=np.float64)
    b = np.asarray(prompts, dtype=np.float64)
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float64."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


def fit_affine(scores: np.ndarray, targets: np.ndarray, what: str) -> tuple[float, float]:
    """Least-squares slope and intercept mapping untrained scores to targets (train split).

    The slope is not constrained: a negative one reverses the scores' order, which happens when the
    scores order the training images backwards; that is logged. Constant scores get slope 0 (the
    train mean everywhere).

    Args:
        scores: [n] raw scores.
        targets: [n] targets in target units.
        what: names the method and label in the log.

    Returns:
        (slope, intercept).
    """
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    s_centred = s - s.mean()
    variance = float(s_centred @ s_centred)
    if not variance > 0:
        log.warning("%s: the scores are constant on the train split; predicting the train mean", what)
        return 0.0, float(t.mean())
    slope = float(s_centred @ (t - t.mean())) / variance
    if slope < 0:
        log.warning("%s: the scores order the train split backwards (slope %.4g); the affine map reverses them", what, slope)
    return slope, float(t.mean() - slope * s.mean())
