"""Naive relational attention: the reference that the tests and the benchmark compare against.

This is the released code's form: every ordered pair materialises its concatenated keys/values
[N², 2P, D] (and, for self pooling, its 2P queries and [N², H, 2P, 2P] scores) all at once. It uses the
parameters of a `RelationalAttention` module, so both forms can be compared on the same weights.
It is never used for training: its memory grows as N²·P·D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rankpipe.adapter.model.relational import RelationalAttention


def pair_concat(t: Tensor) -> Tensor:
    """[N, P, D] -> [N², 2P, D]; pair b = i·N + j holds [t_i ; t_j]."""
    N = t.shape[0]
    return torch.cat([t.repeat_interleave(N, dim=0), t.repeat(N, 1, 1)], dim=1)


def naive_pair_logits(module: RelationalAttention, x: Tensor) -> Tensor:
    """Pair logits [N, N] of `module` for encoded tokens x [N, P, D], computed the naive way."""
    N, P, D = x.shape
    H = module.heads
    c = D // H
    pair_tokens = pair_concat(x)  # (N², 2P, D)
    kv = module.kv_norm(module.kv_proj(pair_tokens))  # (N², 2P, D)
    kv = kv.view(N * N, 2 * P, H, c).transpose(1, 2)  # (N², H, 2P, c)
    if module.pooling == "cross":
        q = module.q_norm(module.q_proj(module.tokens.to(x.dtype)))  # (K, D)
        q = q.view(1, -1, H, c).transpose(1, 2).expand(N * N, H, -1, c)  # (N², H, K, c)
    else:
        q = module.q_norm(module.q_proj(pair_tokens))  # (N², 2P, D)
        q = q.view(N * N, 2 * P, H, c).transpose(1, 2)  # (N², H, 2P, c)
    attn = torch.softmax(q @ kv.transpose(-1, -2) / math.sqrt(c), dim=-1)  # (N², H, Q, 2P)
    if module.combine == "merge":
        out = (attn @ kv).transpose(1, 2).reshape(N * N, -1, D)  # (N², Q, D)
    else:
        a_i = (attn[..., :P] @ kv[:, :, :P]).transpose(1, 2).reshape(N * N, -1, D)  # (N², Q, D)
        a_j = (attn[..., P:] @ kv[:, :, P:]).transpose(1, 2).reshape(N * N, -1, D)  # (N², Q, D)
        out = a_i - a_j if module.combine == "subtract" else torch.cat([a_i, a_j], dim=-1)
    feature = module.out_proj(out).mean(dim=1)  # (N², D): project each query's output, then average
    return module.pair_head(feature).view(N, N)
