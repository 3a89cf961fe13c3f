"""Output heads: the regression head, the pair head, and the plain embedding-subtraction ranking head.

Pair-producing heads work on blocks of rows of the [N, N] pair matrix (`pair_rows`), so a batch of
any size holds only about `pair_chunk` pair features at once; `run_pair_chunks` optionally recomputes
each block in the backward pass (activation checkpointing) so nothing per-pair is kept at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rankpipe.adapter.model.config import AdapterConfig


class MLPStack(nn.Module):
    """`layers` × (Linear -> LayerNorm -> ReLU), then Linear to one output (released code's MLPLayer)."""

    def __init__(self, d_in: int, hidden: int, layers: int) -> None:
        super().__init__()
        widths = [d_in] + [hidden] * layers
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.out = nn.Linear(hidden, 1)

    def init_weights(self) -> None:
        """Xavier-normal weights and zero biases, as the released heads."""
        for linear in [*self.linears, self.out]:
            nn.init.xavier_normal_(linear.weight)
            nn.init.zeros_(linear.bias)
        for norm in self.norms:
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., d_in] -> [...]."""
        for linear, norm in zip(self.linears, self.norms):
            x = torch.relu(norm(linear(x)))
        return self.out(x).squeeze(-1)


class RegressionHead(nn.Module):
    """LayerNorm -> sum over tokens -> MLP -> one score per image (paper §3.2).

    With `regression_pooling` "sum_spread" a second MLP reads the per-channel standard deviation of
    the normalised tokens over the image, scaled by sqrt(P) (the norm a sum of P independent tokens
    would have), and its output is added to the first one's. A sum is first-order in the tokens: it
    cannot tell an image whose patches are all alike (blurred) from a sharp one with the same
    average. The spread gets an MLP of its own rather than a place beside the sum in one MLP's
    input, because that MLP's first LayerNorm divides both by a scale the sum's image-to-image
    content variation dominates, and the spread's signal drowns (docs/fidelity.md).
    """

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.mlp = MLPStack(cfg.d_model, cfg.hidden, cfg.regression_layers)
        self.spread_mlp = (MLPStack(cfg.d_model, cfg.hidden, cfg.regression_layers)
                           if cfg.regression_pooling == "sum_spread" else None)

    def init_weights(self) -> None:
        nn.init.ones_(self.ln.weight)
        nn.init.zeros_(self.ln.bias)
        self.mlp.init_weights()
        if self.spread_mlp is not None:
            self.spread_mlp.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        """x [N, P, D] -> scores [N]."""
        z = self.ln(x)  # (N, P, D)
        scores = self.mlp(z.sum(dim=1))  # (N,)
        if self.spread_mlp is not None:
            spread = z.std(dim=1, unbiased=False) * z.shape[1] ** 0.5  # (N, D)
            scores = scores + self.spread_mlp(spread)  # (N,)
        return scores


class PairHead(nn.Module):
    """LayerNorm -> MLP -> one logit per pair feature (released code's PairwiseDiffBlock)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.mlp = MLPStack(cfg.d_model, cfg.hidden, cfg.pair_layers)

    def init_weights(self) -> None:
        nn.init.ones_(self.ln.weight)
        nn.init.zeros_(self.ln.bias)
        self.mlp.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> logits [...]."""
        return self.mlp(self.ln(x))


def pair_rows(n: int, pair_chunk: int) -> Iterator[slice]:
    """Row blocks of the [n, n] ordered-pair matrix holding at most max(pair_chunk, n) pairs each."""
    rows = max(1, pair_chunk // n)
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def run_pair_chunks(fn: Callable[[slice], Tensor], n: int, pair_chunk: int, recompute: bool) -> Tensor:
    """Evaluate `fn(rows) -> [len(rows), n]` over all row blocks and stack to [n, n].

    With `recompute` (and autograd on), each block's activations are dropped after the forward pass
    and rebuilt during backward, so the memory kept for backward no longer grows with n².
    """
    blocks = []
    for rows in pair_rows(n, pair_chunk):
        if recompute and torch.is_grad_enabled():
            blocks.append(checkpoint(fn, rows, use_reentrant=False))
        else:
            blocks.append(fn(rows))
    return torch.cat(blocks, dim=0)  # (n, n)


class SubtractionHead(nn.Module):
    """Ranking head without attention: pair feature = mean_p(z_i) - mean_p(z_j) (paper Table 5).

    The released form averages (z_i - z_j) over tokens; averaging is linear, so the per-image means
    are taken first and only the [pairs, D] difference is formed, chunked by rows.
    Peak memory: O(N·D + pair_chunk·D) besides what autograd keeps.
    """

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        self.pair_chunk = cfg.pair_chunk
        self.recompute = cfg.pair_checkpoint
        self.pair_head = PairHead(cfg)

    def init_weights(self) -> None:
        self.pair_head.init_weights()

    def forward(self, x: Tensor) -> Tensor:
        """x [N, P, D] -> pair logits [N, N], entry (i, j) = logit that image i ranks above image j."""
        N = x.shape[0]
        pooled = x.mean(dim=1)  # (N, D)

        def block(rows: slice) -> Tensor:
            diff = pooled[rows, None, :] - pooled[None, :, :]  # (I, N, D)
            return self.pair_head(diff)  # (I, N)

        return run_pair_chunks(block, N, self.pair_chunk, self.recompute)
