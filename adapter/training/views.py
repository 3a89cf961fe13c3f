"""Flip augmentation from cached views: which images of a step's batch train on their mirror image.

A store embedded with `--flip-view` holds every image's tokens twice: as it is and mirrored left to
right (docs/store.md). Training draws, for every image of every step's batch, one of the two with
equal probability, as the released code's random horizontal flip does per sample. The draw is a
function of (seed, step) alone — a generator reseeded at every step — so a resumed run draws what
an uninterrupted one does, and it takes nothing from the batch sampler's own random stream (a run
on a store without a flip view draws exactly the batches it drew before). Validation and scoring
read the original view only.
"""

from __future__ import annotations

import numpy as np
import torch

# Seed-sequence tag that keeps the view draws apart from every other seeded stream of a run.
_VIEW_TAG = 3


def draw_flips(seed: int, step: int, batch: int, device: torch.device) -> torch.Tensor:
    """[batch] bool on `device`: True where image b of step `step` (1-based) trains on its mirror image."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(np.random.SeedSequence([seed, _VIEW_TAG, step]).generate_state(1)[0]))
    return torch.rand(batch, generator=generator, device=device) < 0.5


def gather_views(original: torch.Tensor, flipped: torch.Tensor | None, index: torch.Tensor, seed: int,
                 step: int) -> torch.Tensor:
    """[B, P, D] tokens of rows `index` [B]: the original view, or with a flip view one drawn view per row.

    Args:
        original: [R, P, D] tokens of the original images.
        flipped: [R, P, D] tokens of their mirror images, or None (a store without a flip view).
        index: [B] rows to gather.
        seed: the run's seed; with `step` it fixes the draw.
        step: the training step (1-based).
    """
    tokens = original[index]  # [B, P, D]
    if flipped is None:
        return tokens
    flips = draw_flips(seed, step, len(index), original.device)  # [B]
    # Both gathers and a select: no host sync, unlike boolean indexing.
    return torch.where(flips[:, None, None], flipped[index], tokens)  # [B, P, D]
