"""Ranking-aware relational attention over every ordered image pair, without N² token tensors.

The paper's branch (§3.2): queries attend over the concatenation [z_i ; z_j] of a
pair's 2P encoded tokens; the softmax runs over all 2P keys and its halves weight image i's and image
j's values separately, giving a_i and a_j; the pair feature a_i - a_j is projected, averaged over
the queries (the paper; the released code sums, a constant factor K that the pair head's LayerNorm
removes) and turned into one logit by the pair head.

Written naively every pair materialises 2P keys and values (N²·2P·D numbers; see
`relational_reference.py`). Here the softmax is factorised per image. For query scores
s_i = q·k_iᵀ/√d, m_i = max s_i, e_i = exp(s_i - m_i), Z_i = Σ e_i, U_i = e_i·v_i:

    a_i = exp(m_i - M)·U_i / (exp(m_i - M)·Z_i + exp(m_j - M)·Z_j),   M = max(m_i, m_j)

and symmetrically a_j. So a_i = w_i·U_i with a per-(pair, head, query) scalar w_i; the mean over
queries is a contraction Σ_k w_i[k]·U_i[k] that never forms the [pairs, K, D] tensor, and the output
projection, being linear, is applied after that mean. Everything per image (s, m, Z, U) is computed
once in float32 with autocast off, which keeps the max-subtraction safe under bf16 autocast.

Variants (AdapterConfig): `split_dot_product=False` gives the merged attention output
(w_i·U_i + w_j·U_j, symmetric in i and j, so its logit cannot tell i-above-j from j-above-i, which
is what that ablation shows); `pair_combine="concat"` gives [a_i ; a_j]; `pooling="self"` lets the
pair's own 2P tokens be the queries (the paper's self-attention ablation) and averages over them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.heads import PairHead, run_pair_chunks

# Given a block of rows of the pair matrix, the query-averaged halves (a_i, a_j), each [I, N, H, c].
Halves = Callable[[slice], tuple[Tensor, Tensor]]


def _no_autocast(x: Tensor) -> torch.autocast:
    return torch.autocast(device_type=x.device.type, enabled=False)


def _stats_dtype(x: Tensor) -> torch.dtype:
    """Softmax statistics run in float32 at least (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


class RelationalAttention(nn.Module):
    """Relational attention + pair head: encoded tokens [N, P, D] -> pair logits [N, N].

    Entry (i, j) is the logit that image i ranks above image j; the diagonal is computed but
    meaningless, and no loss may use it: for subtraction a_i - a_i = 0 reaches a LayerNorm at zero,
    whose gradient is huge and dominated by rounding. Pairs are processed in blocks of whole rows holding about `pair_chunk` ordered pairs.

    Peak memory besides the per-image statistics (O(N·K·D) for cross pooling, O(N·H·P²) for self):
    cross pooling O(pair_chunk·(H·K + D)) per block, self pooling O(pair_chunk·H·P²) per block.
    Autograd additionally keeps O(N²·D) pair-head activations unless `pair_checkpoint` is set.
    """

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.heads = cfg.heads
        self.split = cfg.split_dot_product
        self.combine = cfg.pair_combine if cfg.split_dot_product else "merge"
        self.pooling = cfg.pooling
        self.pair_chunk = cfg.pair_chunk
        self.recompute = cfg.pair_checkpoint
        # "self" pooling has no learned queries: the pair's tokens are its own queries.
        self.tokens = nn.Parameter(torch.empty(cfg.relational_tokens, D)) if cfg.pooling == "cross" else None
        self.q_proj = nn.Linear(D, D)
        self.q_norm = nn.LayerNorm(D)
        # Keys and values share one projection LN(W_kv z), as in the released code.
        self.kv_proj = nn.Linear(D, D)
        self.kv_norm = nn.LayerNorm(D)
        self.out_proj = nn.Linear(2 * D if self.combine == "concat" else D, D)
        self.pair_head = PairHead(cfg)

    def init_weights(self) -> None:
        """Truncated-normal projections (std 0.02), relational tokens with std D^-1/2, xavier pair head."""
        for linear in (self.q_proj, self.kv_proj, self.out_proj):
            nn.init.trunc_normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        for norm in (self.q_norm, self.kv_norm):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        if self.tokens is not None:
            nn.init.normal_(self.tokens, std=self.tokens.shape[-1] ** -0.5)
        self.pair_head.init_weights()

    def split_heads(self, t: Tensor) -> Tensor:
        """[..., T, D] -> [..., H, T, c]."""
        *lead, T, D = t.shape
        return t.view(*lead, T, self.heads, D // self.heads).transpose(-3, -2)

    def queries(self, x: Tensor) -> Tensor:
        """Query heads: [H, K, c] (relational tokens) for cross pooling, [N, H, P, c] for self pooling."""
        q_in = self.tokens.to(x.dtype) if self.tokens is not None else x
        return self.split_heads(self.q_norm(self.q_proj(q_in)))

    def keys_values(self, x: Tensor) -> Tensor:
        """Shared key/value heads LN(W_kv z): [N, H, P, c]."""
        return self.split_heads(self.kv_norm(self.kv_proj(x)))

    def pair_feature(self, a_i: Tensor, a_j: Tensor) -> Tensor:
        """Combine query-averaged halves [I, N, H, c] into the projected pair feature [I, N, D]."""
        I, N = a_i.shape[:2]
        if self.combine == "subtract":
            f = (a_i - a_j).reshape(I, N, -1)  # (I, N, D)
        elif self.combine == "merge":
            f = (a_i + a_j).reshape(I, N, -1)  # (I, N, D): plain attention output over all 2P keys
        else:
            f = torch.cat([a_i.reshape(I, N, -1), a_j.reshape(I, N, -1)], dim=-1)  # (I, N, 2D)
        return self.out_proj(f)  # (I, N, D)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, P, D] encoded tokens -> pair logits [N, N]."""
        N = x.shape[0]
        q, kv = self.queries(x), self.keys_values(x)
        halves = self._cross_halves(q, kv) if self.pooling == "cross" else self._self_halves(q, kv)

        def block(rows: slice) -> Tensor:
            a_i, a_j = halves(rows)  # (I, N, H, c) each, float32 or float64
            return self.pair_head(self.pair_feature(a_i.to(x.dtype), a_j.to(x.dtype)))  # (I, N)

        return run_pair_chunks(block, N, self.pair_chunk, self.recompute)

    def _cross_halves(self, q: Tensor, kv: Tensor) -> Halves:
        """Per-image softmax statistics for K relational-token queries; returns the per-block combiner.

        Letters: n image, i/j first/second image of a pair, h head, k relational token, p key token,
        c channel within a head.
        """
        c = q.shape[-1]
        K = q.shape[-2]
        with _no_autocast(kv):
            q32, kv32 = q.to(_stats_dtype(q)), kv.to(_stats_dtype(kv))
            s = torch.einsum("hkc,nhpc->nhkp", q32, kv32) / math.sqrt(c)  # (N, H, K, P)
            # The shift cancels exactly in the ratio, so it needs no gradient.
            m = s.amax(dim=-1).detach()  # (N, H, K)
            e = torch.exp(s - m[..., None])  # (N, H, K, P)
            Z = e.sum(dim=-1)  # (N, H, K)
            U = torch.einsum("nhkp,nhpc->nhkc", e, kv32)  # (N, H, K, c)

        def halves(rows: slice) -> tuple[Tensor, Tensor]:
            with _no_autocast(kv):
                m_i, m_j = m[rows, None], m[None]  # (I, 1, H, K), (1, N, H, K)
                M = torch.maximum(m_i, m_j)  # (I, N, H, K)
                g_i, g_j = torch.exp(m_i - M), torch.exp(m_j - M)  # (I, N, H, K)
                denom = g_i * Z[rows, None] + g_j * Z[None]  # (I, N, H, K)
                w_i, w_j = g_i / (denom * K), g_j / (denom * K)  # (I, N, H, K), 1/K = mean over tokens
                a_i = torch.einsum("ijhk,ihkc->ijhc", w_i, U[rows])  # (I, N, H, c)
                a_j = torch.einsum("ijhk,jhkc->ijhc", w_j, U)  # (I, N, H, c)
            return a_i, a_j

        return halves

    def _self_halves(self, q: Tensor, kv: Tensor) -> Halves:
        """Self pooling: the 2P tokens of a pair query its 2P keys; outputs averaged over the 2P queries.

        For a query of image i, its keys split into image i's own (a per-image block) and image j's
        (a per-pair block, computed per row block). Averaging over queries is folded into per-key
        weights W[pair, h, p] before the values are touched, so the largest per-pair tensors are the
        [pairs, H, P, P] score blocks: the doubled dot-product cost the paper reports for this ablation.

        Letters: n image, i/j first/second image, h head, t query token, p key token, c channel.
        """
        P, c = q.shape[-2], q.shape[-1]
        scale = 1.0 / math.sqrt(c)
        with _no_autocast(kv):
            q32, kv32 = q.to(_stats_dtype(q)), kv.to(_stats_dtype(kv))
            s_own = torch.einsum("nhtc,nhpc->nhtp", q32, kv32) * scale  # (N, H, P, P)
            m_own = s_own.amax(dim=-1).detach()  # (N, H, P)
            e_own = torch.exp(s_own - m_own[..., None])  # (N, H, P, P)
            Z_own = e_own.sum(dim=-1)  # (N, H, P)

        def other_stats(s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            m = s.amax(dim=-1).detach()  # (I, N, H, P)
            e = torch.exp(s - m[..., None])  # (I, N, H, P, P)
            return m, e, e.sum(dim=-1)

        def query_weights(m_own_: Tensor, Z_own_: Tensor, m_oth: Tensor, Z_oth: Tensor) -> tuple[Tensor, Tensor]:
            """Per-query factors on the own-image and other-image halves, each (I, N, H, P)."""
            M = torch.maximum(m_own_, m_oth)
            g_own, g_oth = torch.exp(m_own_ - M), torch.exp(m_oth - M)
            denom = (g_own * Z_own_ + g_oth * Z_oth) * (2 * P)  # 2P: mean over the pair's queries
            return g_own / denom, g_oth / denom

        def halves(rows: slice) -> tuple[Tensor, Tensor]:
            with _no_autocast(kv):
                s_ij = torch.einsum("ihtc,jhpc->ijhtp", q32[rows], kv32) * scale  # queries of i, keys of j
                s_ji = torch.einsum("jhtc,ihpc->ijhtp", q32, kv32[rows]) * scale  # queries of j, keys of i
                m_ij, e_ij, Z_ij = other_stats(s_ij)
                m_ji, e_ji, Z_ji = other_stats(s_ji)
                own_i, oth_i = query_weights(m_own[rows, None], Z_own[rows, None], m_ij, Z_ij)  # queries of i
                own_j, oth_j = query_weights(m_own[None], Z_own[None], m_ji, Z_ji)  # queries of j
                # Weight of each key of image i (resp. j), summed over the pair's queries: (I, N, H, P).
                W_i = torch.einsum("ijht,ihtp->ijhp", own_i, e_own[rows]) + torch.einsum("ijht,ijhtp->ijhp", oth_j, e_ji)
                W_j = torch.einsum("ijht,jhtp->ijhp", own_j, e_own) + torch.einsum("ijht,ijhtp->ijhp", oth_i, e_ij)
                a_i = torch.einsum("ijhp,ihpc->ijhc", W_i, kv32[rows])  # (I, N, H, c)
                a_j = torch.einsum("ijhp,jhpc->ijhc", W_j, kv32)  # (I, N, H, c)
            return a_i, a_j

        return halves
