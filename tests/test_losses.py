"""Hand-computed cases of the regression and pairwise losses."""

from __future__ import annotations

import math

import pytest
import torch

from rankpipe.adapter.model.adapter import AdapterOutput
from rankpipe.adapter.model.config import LossConfig
from rankpipe.adapter.model.losses import ranking_loss
from rankpipe.errors import InputError


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def out(scores, pair_logits=None) -> AdapterOutput:
    return AdapterOutput(
        scores=torch.tensor(scores, dtype=torch.float32, requires_grad=True),
        pair_logits=None if pair_logits is None else torch.tensor(pair_logits, dtype=torch.float32, requires_grad=True),
    )


def test_defaults_follow_the_released_code_for_bce_and_the_paper_for_hinge():
    bce = LossConfig()
    assert (bce.pairwise, bce.regression_form, bce.regression_weight, bce.ties) == ("bce", "log", 0.2, "exclude")
    hinge = LossConfig(pairwise="hinge")
    assert (hinge.regression_form, hinge.regression_weight) == ("plain", 1.0)
    assert LossConfig(regression_form="plain").regression_weight == 1.0
    assert LossConfig(pairwise="hinge", regression_form="log").regression_weight == 0.2


@pytest.mark.parametrize(
    "form,beta,expected",
    [
        # |0 - 0| = 0 -> 0; |2 - 0| = 2 > beta 1 -> 2 - 0.5 = 1.5; mean 0.75
        ("plain", 1.0, 0.75),
        ("log", 1.0, math.log1p(0.75)),
        # beta 4: both quadratic, 0.5 * 2² / 4 = 0.5; mean 0.25
        ("plain", 4.0, 0.25),
    ],
)
def test_regression_term(form, beta, expected):
    cfg = LossConfig(regression_form=form, smooth_l1_beta=beta, weight=0.0, regression_weight=1.0)
    parts = ranking_loss(out([0.0, 2.0]), torch.tensor([0.0, 0.0]), cfg)
    assert parts.regression.item() == pytest.approx(expected, rel=1e-6)
    assert parts.total.item() == pytest.approx(expected, rel=1e-6)
    assert parts.pairwise.item() == 0.0


def test_bce_pairwise_two_images():
    # y0 > y1: pair (0, 1) label 1 with logit 2 -> softplus(-2); pair (1, 0) label 0 with logit -1 -> softplus(-1).
    parts = ranking_loss(out([1.0, 0.0], [[9.0, 2.0], [-1.0, -9.0]]), torch.tensor([1.0, 0.0]), LossConfig())
    assert parts.pairwise.item() == pytest.approx((softplus(-2.0) + softplus(-1.0)) / 2, rel=1e-6)
    assert parts.regression.item() == pytest.approx(0.0, abs=1e-7)


def test_hinge_pairwise_two_images():
    # y0 > y1, margin 1: (0, 1): max(0, 1 - 0.3) = 0.7; (1, 0): max(0, 1 - (-1)(0.5)) = 1.5; mean 1.1.
    cfg = LossConfig(pairwise="hinge")
    parts = ranking_loss(out([2.0, 1.0], [[0.0, 0.3], [0.5, 0.0]]), torch.tensor([2.0, 1.0]), cfg)
    assert parts.pairwise.item() == pytest.approx(1.1, rel=1e-6)
    # A logit past the margin costs nothing.
    parts = ranking_loss(out([2.0, 1.0], [[0.0, 1.5], [-2.0, 0.0]]), torch.tensor([2.0, 1.0]), cfg)
    assert parts.pairwise.item() == 0.0


def test_hinge_margin_is_used():
    cfg = LossConfig(pairwise="hinge", margin=2.0)
    parts = ranking_loss(out([2.0, 1.0], [[0.0, 0.5], [-0.5, 0.0]]), torch.tensor([2.0, 1.0]), cfg)
    assert parts.pairwise.item() == pytest.approx(1.5, rel=1e-6)


LOGITS3 = [[0.0, 1.0, 2.0], [-3.0, 0.0, 0.5], [0.25, -1.0, 0.0]]


def test_ties_excluded():
    # targets [1, 1, 0]: pairs (0,1), (1,0) tied -> excluded. Counted: (0,2) label 1 logit 2,
    # (1,2) label 1 logit 0.5, (2,0) label 0 logit 0.25, (2,1) label 0 logit -1.
    expected = (softplus(-2.0) + softplus(-0.5) + softplus(0.25) + softplus(-1.0)) / 4
    parts = ranking_loss(out([0.0, 0.0, 0.0], LOGITS3), torch.tensor([1.0, 1.0, 0.0]), LossConfig())
    assert parts.pairwise.item() == pytest.approx(expected, rel=1e-6)


def test_ties_half():
    # As above plus the tied pairs with target 0.5: BCE(x, 0.5) = softplus(x) - 0.5 x.
    tied = (softplus(1.0) - 0.5) + (softplus(-3.0) + 1.5)
    counted = softplus(-2.0) + softplus(-0.5) + softplus(0.25) + softplus(-1.0)
    parts = ranking_loss(out([0.0, 0.0, 0.0], LOGITS3), torch.tensor([1.0, 1.0, 0.0]), LossConfig(ties="half"))
    assert parts.pairwise.item() == pytest.approx((tied + counted) / 6, rel=1e-6)


def test_total_weights_the_terms():
    cfg = LossConfig(weight=0.5, regression_form="plain", regression_weight=3.0)
    parts = ranking_loss(out([0.0, 2.0], [[0.0, 0.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0]), cfg)
    # regression: |−1| -> 0.5, |2| -> 1.5, mean 1.0; pairwise: both logits 0 -> log 2.
    assert parts.regression.item() == pytest.approx(1.0)
    assert parts.pairwise.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert parts.total.item() == pytest.approx(3.0 * 1.0 + 0.5 * math.log(2.0), rel=1e-6)


@pytest.mark.parametrize("pairwise", ["bce", "hinge"])
def test_all_ties_give_zero_pairwise_and_finite_gradients(pairwise):
    o = out([0.5, -0.5, 0.0], LOGITS3)
    parts = ranking_loss(o, torch.tensor([2.0, 2.0, 2.0]), LossConfig(pairwise=pairwise))
    parts.total.backward()
    assert parts.pairwise.item() == 0.0
    assert torch.isfinite(o.scores.grad).all()
    assert (o.pair_logits.grad == 0).all()


def test_diagonal_and_excluded_pairs_get_no_gradient_even_if_infinite():
    logits = [[float("inf"), 1.0], [-1.0, float("-inf")]]
    o = out([0.0, 0.0], logits)
    parts = ranking_loss(o, torch.tensor([1.0, 0.0]), LossConfig())
    parts.total.backward()
    assert torch.isfinite(parts.total)
    assert o.pair_logits.grad[0, 0] == 0 and o.pair_logits.grad[1, 1] == 0
    # d/dx softplus(-x) = -sigmoid(-x), averaged over 2 pairs.
    assert o.pair_logits.grad[0, 1].item() == pytest.approx(-torch.sigmoid(torch.tensor(-1.0)).item() / 2, rel=1e-6)


def test_no_pair_logits_means_regression_only():
    parts = ranking_loss(out([0.0, 2.0]), torch.tensor([0.0, 0.0]), LossConfig())
    assert parts.pairwise.item() == 0.0
    assert parts.total.item() == pytest.approx(0.2 * math.log1p(0.75), rel=1e-6)


def test_bce_matches_the_released_formula_when_there_are_no_ties():
    """Without ties (and off the diagonal) the rule is the released 1[y_i - y_j > 0] BCE."""
    torch.manual_seed(0)
    y = torch.randn(6)
    logits = torch.randn(6, 6)
    parts = ranking_loss(AdapterOutput(scores=torch.zeros(6), pair_logits=logits), y, LossConfig())
    off = ~torch.eye(6, dtype=torch.bool)
    label = (y[:, None] - y[None, :] > 0).float()
    released = torch.nn.functional.binary_cross_entropy_with_logits(logits[off], label[off])
    assert parts.pairwise.item() == pytest.approx(released.item(), rel=1e-6)


@pytest.mark.parametrize(
    "bad",
    [dict(pairwise="listnet"), dict(ties="random"), dict(pairwise="hinge", ties="half"), dict(regression_form="mse"), dict(weight=-1.0)],
)
def test_invalid_loss_config_raises_input_error(bad):
    with pytest.raises(InputError):
        LossConfig(**bad)


def test_target_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        ranking_loss(out([0.0, 1.0]), torch.tensor([0.0, 1.0, 2.0]), LossConfig())
