"""The optimiser of a training run: AdamW, optionally with AMSGrad and without decay of 1-D parameters."""

from __future__ import annotations

import torch
from torch import nn

from rankpipe.adapter.training.run_config import OptimConfig


def make_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameters as `optim` says.

    Without `decay_norms_and_biases`, parameters with fewer than two dimensions (biases, LayerNorm
    gains) form a second group without weight decay, as in the released training script.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if optim.decay_norms_and_biases:
        groups = [{"params": params, "weight_decay": optim.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
        ]
    # On a GPU the fused kernel: one launch per step, not several per parameter list.
    fused = True if params and params[0].is_cuda else None
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, amsgrad=optim.amsgrad, fused=fused)
