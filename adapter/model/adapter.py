"""RankingAdapter: encoder + regression head + optional pairwise ranking branch (paper §3.2).

The regression head gives each image a score in normalised target units; that score is what ranks
images at inference. The pairwise branch is a training signal: for every ordered pair (i, j) of the
batch it gives the logit that image i ranks above image j.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.encoder import AdapterEncoder
from rankpipe.adapter.model.heads import RegressionHead, SubtractionHead
from rankpipe.adapter.model.relational import RelationalAttention
from rankpipe.devices import autocast
from rankpipe.errors import InputError

# ranking_head name -> constructor of the pairwise branch (None: regression only).
RANKING_HEADS: dict[str, Callable[[AdapterConfig], nn.Module] | None] = {
    "none": None,
    "subtraction": SubtractionHead,
    "relational": RelationalAttention,
}


@dataclasses.dataclass
class AdapterOutput:
    """What one forward pass of the adapter returns."""

    # Regression scores [N], in normalised target units.
    scores: Tensor
    # [N, N] logit that image i ranks above image j (diagonal meaningless); None without a ranking
    # head or when called with with_pairs=False.
    pair_logits: Tensor | None


class RankingAdapter(nn.Module):
    """The ranking-aware adapter over frozen CLIP tokens."""

    def __init__(self, cfg: AdapterConfig, image_token_dim: int, text_token_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_token_dim = image_token_dim
        self.text_token_dim = text_token_dim
        self.encoder = AdapterEncoder(cfg, image_token_dim, text_token_dim)
        self.regression_head = RegressionHead(cfg)
        make_ranking_head = RANKING_HEADS[cfg.ranking_head]
        self.ranking_head = make_ranking_head(cfg) if make_ranking_head is not None else None
        self.init_weights()

    def init_weights(self) -> None:
        """Re-initialise every parameter (called once by the constructor)."""
        self.encoder.init_weights()
        self.regression_head.init_weights()
        if self.ranking_head is not None:
            self.ranking_head.init_weights()

    def check_inputs(self, image_tokens: Tensor, text_tokens: Tensor) -> None:
        """Refuse token tensors whose shapes do not match this adapter, saying what was expected."""
        if image_tokens.dim() != 3 or image_tokens.shape[-1] != self.image_token_dim:
            raise InputError(
                f"image tokens have shape {tuple(image_tokens.shape)} but this adapter expects "
                f"[N, P, {self.image_token_dim}]; use a token store embedded with the adapter's backbone."
            )
        if text_tokens.dim() not in (2, 3) or text_tokens.shape[-1] != self.text_token_dim:
            raise InputError(
                f"text tokens have shape {tuple(text_tokens.shape)} but this adapter expects "
                f"[L, {self.text_token_dim}] or [N, L, {self.text_token_dim}]; use the same backbone's text tokens."
            )
        if text_tokens.dim() == 3 and text_tokens.shape[0] != image_tokens.shape[0]:
            raise InputError(
                f"{image_tokens.shape[0]} images but {text_tokens.shape[0]} text token sets; pass one query "
                "[L, D] for the batch or one per image."
            )

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the first layers compute in: autocast's when it is on (so fp16 cached tokens are
        cast once, not to float32 and again to bf16), else the parameters'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.encoder.image_proj.weight.dtype

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, with_pairs: bool = True,
                dropout_key: Tensor | None = None) -> AdapterOutput:
        """Score a batch of images for one query.

        Args:
            image_tokens: [N, P, D_img] CLIP image tokens, any float dtype (cast to the module's dtype).
            text_tokens: [L, D_txt] tokens of one query shared by the batch, or [N, L, D_txt].
            with_pairs: also compute the [N, N] pair logits (training); False skips the pairwise branch.
            dropout_key: int64 [2], the key of a training step's dropout masks (dropout.StepKeys); None in
                training mode draws one from the process's generator. Eval mode applies no dropout.

        Returns:
            AdapterOutput with scores [N] and pair_logits [N, N] or None.
        """
        self.check_inputs(image_tokens, text_tokens)
        dtype = self.compute_dtype(image_tokens.device)
        x = self.encoder(image_tokens.to(dtype), text_tokens.to(dtype), dropout_key)  # (N, P, D)
        scores = self.regression_head(x)  # (N,)
        pair_logits = self.ranking_head(x) if with_pairs and self.ranking_head is not None else None
        return AdapterOutput(scores=scores, pair_logits=pair_logits)


@torch.no_grad()
def score_batches(
    model: RankingAdapter,
    text_tokens: torch.Tensor,
    image_batches: Iterable[torch.Tensor],
    device: torch.device,
) -> np.ndarray:
    """Regression scores (normalised units) of image-token batches, concatenated.

    Args:
        model: the adapter; put in eval mode for the call and restored afterwards.
        text_tokens: [L, Dt] the query's text tokens, on `device`.
        image_batches: [n_i, P, D] image tokens per batch (any device, any float dtype).
        device: where the model runs.

    Returns:
        [sum n_i] float64 scores.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for tokens in image_batches:
            tokens = tokens.to(device=device, non_blocking=True).float()  # [n, P, D]
            with autocast(device):
                scores = model(tokens, text_tokens, with_pairs=False).scores  # [n]
            out.append(scores.float())
    finally:
        model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(out).cpu().numpy().astype(np.float64)
