"""Dropout whose masks are a function of a key: (the run's seed, the step) and the dropout site.

nn.Dropout draws its masks from the process's generator, in the order the layers run. A run trained
alone and the same run trained fused with others (adapter/training/fused.py, under `torch.func.vmap`)
cannot draw the same masks that way: vmap refuses random draws, and one generator for several runs
hands each run other numbers than it would get alone. Nor would a generator seeded per step and site
do: vmap cannot batch one, and a CUDA graph replays the seed it captured. Masks drawn outside the pass
and handed in would need every site's shape in advance. So here a mask is computed, not drawn: every
element's keep bit is an integer hash of (step key, site, the element's flat index). The hash is
plain integer tensor arithmetic, so it

- gives a run the same masks alone, fused (the key is one more vmapped input, one per run), resumed
  (the key depends on seed and step only, nothing is carried from step to step) and compiled (no
  generator state for torch.compile or CUDA graphs to capture; the key is a tensor input);
- keeps every element with probability 1 - p (to 2⁻³² steps) and scales kept elements by 1 / (1 - p),
  as nn.Dropout does: the same distribution, other draws;
- depends on the element's flat index, with the batch dimension leading, so an image's mask does not
  change when rows are appended to its batch (the compiled step pads short batches).

A step key is two 32-bit words in an int64 tensor [2]; `StepKeys` makes a run's keys once, on its
device, so a step takes its key without a host-to-device copy. A forward pass turns it into one pair
of words per site at once (`site_keys`), and each site hashes its elements' indices with its pair.
Eval mode applies no dropout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

# Seed-sequence tag that keeps the dropout keys apart from every other seeded stream of a run
# (streamed windows use 1 and 2, flip views 3).
_DROPOUT_TAG = 4
_WORD = 0xFFFFFFFF
# The hash's multipliers as int64 factors below 2³¹ in magnitude: a 32-bit value times one stays inside
# int64 (no overflow on any device), and masking the product to 32 bits gives the product mod 2³².
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B - (1 << 32))


def mix32_(x: Tensor) -> Tensor:
    """A bijective 32-bit integer hash (Wellons' "lowbias32") of int64 values in [0, 2³²), elementwise,
    in place (a mask's worth of int64 temporaries per operation would cost more than the arithmetic)."""
    x ^= x >> 16
    x *= _MULTIPLIERS[0]
    x &= _WORD
    x ^= x >> 15
    x *= _MULTIPLIERS[1]
    x &= _WORD
    x ^= x >> 16
    return x


def site_keys(key: Tensor, sites: int) -> Tensor:
    """int64 [sites, 2]: the words of each of `sites` sites under the step key `key` (int64 [2])."""
    first = mix32_((key[0] + torch.arange(sites, device=key.device, dtype=torch.int64)) & _WORD)  # (S,)
    return torch.stack([first, key[1].expand(sites)], dim=-1)  # (S, 2)


def keep_mask(words: Tensor, shape: torch.Size, p: float) -> Tensor:
    """[*shape] bool: which elements a dropout of rate `p` keeps under a site's `words` (int64 [2])."""
    index = torch.arange(shape.numel(), device=words.device, dtype=torch.int64).view(shape)  # (*shape)
    # Two rounds, each keyed by a word: masks of different keys are not shifts of one another. The first
    # operation makes a new tensor (under vmap, one per run), which the others then modify in place.
    bits = mix32_(index ^ words[0])
    bits ^= words[1]
    return mix32_(bits) >= round(p * 2**32)  # (*shape): hash values uniform in [0, 2³²)


class KeyedDropout(nn.Module):
    """Dropout of rate `p` with masks from `keep_mask`; `site` (set by `number_sites`) is its row of the
    pass's `site_keys`, which tells its masks from those of the model's other dropouts."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.site = 0

    def forward(self, x: Tensor, keys: Tensor | None) -> Tensor:
        """x with dropout applied in training mode; `keys` (the pass's `site_keys`) are required then,
        unless p is 0."""
        if not self.training or self.p == 0:
            return x
        if keys is None:
            raise ValueError("a training-mode forward pass with dropout needs dropout keys")
        keep = keep_mask(keys[self.site], x.shape, self.p)  # (*x.shape)
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def number_sites(model: nn.Module) -> int:
    """Give every KeyedDropout of `model` its own site, in module order (fixed by the architecture);
    the number of sites."""
    sites = [m for m in model.modules() if isinstance(m, KeyedDropout)]
    for site, module in enumerate(sites):
        module.site = site
    return len(sites)


def random_key(device: torch.device) -> Tensor:
    """int64 [2]: a key drawn from the process's generator, for training-mode calls outside a run."""
    return torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device=device)


class StepKeys:
    """A run's dropout keys, one per training step (1-based), made once on its device from its seed."""

    def __init__(self, seed: int, max_steps: int, device: torch.device) -> None:
        words = np.random.SeedSequence([seed, _DROPOUT_TAG]).generate_state(2).astype(np.int64)
        steps = torch.arange(1, max_steps + 1, dtype=torch.int64)  # (S,)
        first = mix32_(steps ^ int(words[0]))
        second = mix32_(mix32_(steps.clone()) ^ int(words[1]))
        self.keys = torch.stack([first, second], dim=1).to(device)  # (S, 2)

    def __getitem__(self, step: int) -> Tensor:
        """int64 [2]: the key of training step `step`."""
        return self.keys[step - 1]
