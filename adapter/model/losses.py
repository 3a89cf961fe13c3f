"""Training loss of the adapter: regression on normalised targets + λ · pairwise ranking loss.

Regression: SmoothL1(score, target) averaged over the batch, or log(1 + SmoothL1) (released code).
Pairwise, over ordered pairs (i, j), i ≠ j, with label y_i > y_j:
- "bce": BCE-with-logits of pair_logit[i, j] against 1[y_i > y_j] (released code);
- "hinge": max(0, margin - sign(y_i - y_j) · pair_logit[i, j]) (paper).
Tied pairs (y_i = y_j) carry no order: by default they are left out ("exclude"); with ties="half" the
BCE target is 0.5. The released code instead labels ties 0 together with the diagonal, which pushes
both (i, j) and (j, i) of a tie towards "below"; neither rule here does that.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

from rankpipe.adapter.model.adapter import AdapterOutput
from rankpipe.adapter.model.config import LossConfig


@dataclasses.dataclass
class LossParts:
    """Scalar loss terms of one batch."""

    # regression_weight · regression + weight · pairwise: what is minimised.
    total: Tensor
    # The regression term before its weight (in its configured form, plain or log).
    regression: Tensor
    # The mean pairwise loss over the counted ordered pairs before λ; 0 without pair logits or pairs.
    pairwise: Tensor


def regression_loss(scores: Tensor, targets: Tensor, cfg: LossConfig, valid: Tensor | None = None) -> Tensor:
    """SmoothL1 (or log(1 + SmoothL1)) between scores [N] and targets [N], averaged over the `valid` [N]
    images (all when None)."""
    if valid is None:
        loss = F.smooth_l1_loss(scores, targets, beta=cfg.smooth_l1_beta)
    else:
        per_image = F.smooth_l1_loss(scores, targets, beta=cfg.smooth_l1_beta, reduction="none")  # (N,)
        loss = torch.where(valid, per_image, torch.zeros_like(per_image)).sum() / valid.sum().clamp_min(1)
    return torch.log1p(loss) if cfg.regression_form == "log" else loss


def pairwise_loss(pair_logits: Tensor, targets: Tensor, cfg: LossConfig, valid: Tensor | None = None) -> Tensor:
    """Mean pairwise loss of pair_logits [N, N] (i above j) against targets [N] over pairs of `valid` [N]
    images (all when None); 0 if no pair counts."""
    N = targets.shape[0]
    diff = targets[:, None] - targets[None, :]  # (N, N): y_i - y_j
    counted = ~torch.eye(N, dtype=torch.bool, device=targets.device)  # (N, N)
    if valid is not None:
        counted = counted & valid[:, None] & valid[None, :]
    if cfg.ties == "exclude":
        counted = counted & (diff != 0)  # out of place: when fused runs vmap this, each run has its own mask
    if cfg.pairwise == "bce":
        label = (diff > 0).to(pair_logits.dtype)
        if cfg.ties == "half":
            label = torch.where(diff == 0, 0.5, label)
        per_pair = F.binary_cross_entropy_with_logits(pair_logits, label, reduction="none")  # (N, N)
    else:
        per_pair = F.relu(cfg.margin - torch.sign(diff) * pair_logits)  # (N, N)
    # where, not multiply: a masked entry that overflowed must not turn the sum into NaN.
    total = torch.where(counted, per_pair, torch.zeros_like(per_pair)).sum()
    return total / counted.sum().clamp_min(1)


def ranking_loss(output: AdapterOutput, targets: Tensor, cfg: LossConfig, valid: Tensor | None = None) -> LossParts:
    """Loss of one batch.

    Args:
        output: the adapter's output for N images (pair_logits may be None).
        targets: [N] normalised targets, finite.
        cfg: the loss configuration.
        valid: [N] bool, the images that count (a batch padded to a fixed size marks its padding False);
            None: all. Padding rows change neither the loss nor the gradients.

    Returns:
        LossParts of float32 scalars.
    """
    scores = output.scores.float()
    if targets.shape != scores.shape:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, scores {tuple(scores.shape)}")
    targets = targets.to(device=scores.device, dtype=torch.float32)
    regression = regression_loss(scores, targets, cfg, valid)
    if output.pair_logits is None:
        pairwise = scores.new_zeros(())
    else:
        pairwise = pairwise_loss(output.pair_logits.float(), targets, cfg, valid)
    total = cfg.regression_weight * regression + cfg.weight * pairwise
    return LossParts(total=total, regression=regression, pairwise=pairwise)
