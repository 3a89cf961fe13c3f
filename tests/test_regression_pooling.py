"""The regression head's "sum_spread" pooling: it reads how alike an image's tokens are, which a sum cannot."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch

from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.heads import RegressionHead
from rankpipe.errors import InputError

P, D = 8, 16


def spread_tokens(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, P, D] tokens whose target lives only in how far the tokens spread around the image's mean.

    Each image has a content vector m (random direction and strength) and spread directions u_k; its tokens
    come in pairs m + a·u_k and m − a·u_k, so their sum is P·m whatever the target a. That is what a
    blurred image does to patch tokens: the average stays, the differences between patches shrink.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g) * 2  # (n,) the target
    m = torch.randn(n, 1, D, generator=g)  # (n, 1, D)
    m = m / m.norm(dim=-1, keepdim=True) * D**0.5 * (1 + 2 * torch.rand(n, 1, 1, generator=g))  # content of any strength
    u = torch.randn(n, P // 2, D, generator=g)  # (n, P/2, D)
    u = u / u.norm(dim=-1, keepdim=True) * D**0.5
    tokens = torch.cat([m + a[:, None, None] * u, m - a[:, None, None] * u], dim=1)  # (n, P, D)
    return tokens, a


def test_the_sum_of_spread_tokens_does_not_depend_on_the_target():
    tokens, a = spread_tokens(4, seed=0)
    pair_means = (tokens[:, : P // 2] + tokens[:, P // 2 :]) / 2  # (n, P/2, D): m for every pair
    torch.testing.assert_close(pair_means, pair_means[:, :1].expand_as(pair_means))
    assert a.std() > 0.1


def fitted_test_srcc(pooling: str, steps: int = 300) -> float:
    """Train a bare regression head on spread tokens; its SRCC on fresh images."""
    torch.manual_seed(0)
    head = RegressionHead(AdapterConfig(d_model=D, heads=2, head_hidden=32, regression_pooling=pooling))
    head.init_weights()
    x, y = spread_tokens(256, seed=1)
    x_test, y_test = spread_tokens(256, seed=2)
    y_norm = (y - y.mean()) / y.std()
    optim = torch.optim.Adam(head.parameters(), lr=3e-3)
    for step in range(steps):
        rows = torch.arange(step * 32, step * 32 + 32) % len(y)
        loss = torch.nn.functional.smooth_l1_loss(head(x[rows]), y_norm[rows])
        optim.zero_grad()
        loss.backward()
        optim.step()
    with torch.no_grad():
        scores = head(x_test).numpy()
    return float(scipy.stats.spearmanr(scores, y_test.numpy()).statistic)


def test_spread_pooling_learns_what_the_sum_cannot(one_thread):
    assert fitted_test_srcc("sum_spread") > 0.6
    assert fitted_test_srcc("sum") < 0.3


def test_spread_score_is_an_mlp_of_the_std_over_tokens_scaled_by_sqrt_p_added_to_the_sums():
    torch.manual_seed(0)
    head = RegressionHead(AdapterConfig(d_model=D, heads=2, regression_pooling="sum_spread"))
    head.init_weights()
    x, _ = spread_tokens(3, seed=3)
    z = torch.nn.functional.layer_norm(x, (D,))  # the head's LayerNorm at init is the plain normalisation
    spread = torch.from_numpy(np.std(z.numpy(), axis=1)) * P**0.5  # (3, D)
    expected = head.mlp(z.sum(dim=1)) + head.spread_mlp(spread)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    assert head.spread_mlp(spread).abs().min() > 1e-3  # the spread term is really there


def test_sum_pooling_has_no_spread_mlp_so_paper_checkpoints_keep_their_keys():
    head = RegressionHead(AdapterConfig(d_model=D, heads=2))
    assert head.spread_mlp is None
    assert not any(key.startswith("spread_mlp") for key in head.state_dict())


def test_unknown_regression_pooling_is_refused():
    with pytest.raises(InputError, match="regression_pooling"):
        AdapterConfig(regression_pooling="max")


def test_a_run_saved_with_the_removed_sum_std_head_is_refused_saying_what_to_do():
    from rankpipe.adapter.training.run_config import RunConfig

    saved = RunConfig().to_dict()
    saved["adapter"]["regression_pooling"] = "sum_std"
    with pytest.raises(InputError, match=r"runs/x/best.pt uses adapter.regression_pooling=sum_std.*train it again"):
        RunConfig.from_saved(saved, where="runs/x/best.pt")
