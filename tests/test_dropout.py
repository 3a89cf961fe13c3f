"""Keyed dropout: masks are a function of (seed, step, site), applied in training mode only."""

from __future__ import annotations

import pytest
import torch

from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.dropout import KeyedDropout, StepKeys, keep_mask, site_keys
from rankpipe.adapter.training.loop import make_step_loss

from conftest import tiny_config

SHAPE = torch.Size([4, 3, 50])
CPU = torch.device("cpu")


def lowbias32(x: int) -> int:
    """The 32-bit hash, written out on Python integers."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def mask_of(key: torch.Tensor, site: int, shape: torch.Size, p: float) -> torch.Tensor:
    return keep_mask(site_keys(key, site + 1)[site], shape, p)


def test_a_mask_is_the_hash_of_key_site_and_index():
    key = StepKeys(7, 3, CPU)[3]
    first, second = (int(word) for word in key)
    site_word = lowbias32((first + 5) & 0xFFFFFFFF)
    expected = [lowbias32(lowbias32(index ^ site_word) ^ second) >= round(0.3 * 2**32) for index in range(SHAPE.numel())]
    assert mask_of(key, 5, SHAPE, 0.3).flatten().tolist() == expected


def test_masks_change_with_seed_step_and_site_and_repeat_for_the_same_ones():
    shape = torch.Size([64, 4096])
    keys = StepKeys(0, 5, CPU)
    mask = mask_of(keys[2], 0, shape, 0.1)
    assert torch.equal(mask, mask_of(keys[2], 0, shape, 0.1))
    # A resumed run makes its keys again, for a longer run perhaps: a step's key depends on seed and step only.
    assert torch.equal(StepKeys(0, 50, CPU)[2], keys[2])
    others = {"step": mask_of(keys[3], 0, shape, 0.1), "seed": mask_of(StepKeys(1, 5, CPU)[2], 0, shape, 0.1),
              "site": mask_of(keys[2], 1, shape, 0.1)}
    # Each keeps 90 % of the elements (262144 draws: 4 standard deviations are 0.0024) and agrees with the
    # first mask as independent draws do: on 0.9² + 0.1² = 82 % of them.
    for name, other in {"first": mask, **others}.items():
        assert float(other.float().mean()) == pytest.approx(0.9, abs=0.0025), name
    for name, other in others.items():
        assert float((other == mask).float().mean()) == pytest.approx(0.82, abs=0.003), name


def test_keyed_dropout_zeroes_or_scales_each_element_and_needs_a_key_in_training():
    drop = KeyedDropout(0.25)
    drop.site = 2
    x = torch.rand(SHAPE) + 1.0  # (*SHAPE), no zeros
    keys = site_keys(StepKeys(0, 1, CPU)[1], 3)  # (3, 2)
    keep = keep_mask(keys[2], SHAPE, 0.25)
    torch.testing.assert_close(drop(x, keys), torch.where(keep, x / 0.75, torch.zeros_like(x)))
    with pytest.raises(ValueError, match="needs dropout keys"):
        drop(x, None)
    assert drop.eval()(x, keys) is x


def test_a_training_pass_applies_the_dropout_of_its_key_and_eval_applies_none():
    cfg = AdapterConfig(d_model=16, heads=2, text_extra_tokens=2, relational_tokens=2, plain_layers=1,
                        plain_dropout=0.1, fusion_dropout=0.1)
    torch.manual_seed(0)
    model = RankingAdapter(cfg, 8, 6)
    image, text = torch.randn(5, 4, 8), torch.randn(3, 6)
    keys = StepKeys(0, 2, CPU)
    with torch.no_grad():
        trained = model(image, text, dropout_key=keys[1])
        again = model(image, text, dropout_key=keys[1])
        other_step = model(image, text, dropout_key=keys[2])
        evaluated = model.eval()(image, text, dropout_key=keys[1])
        without_key = model(image, text)
        no_dropout = RankingAdapter(cfg, 8, 6)
        no_dropout.load_state_dict(model.state_dict())
        no_dropout.train()
        for module in no_dropout.modules():
            if isinstance(module, KeyedDropout):
                module.p = 0.0
        undropped = no_dropout(image, text, dropout_key=keys[1])
    assert torch.equal(trained.scores, again.scores) and torch.equal(trained.pair_logits, again.pair_logits)
    assert not torch.allclose(trained.scores, other_step.scores, atol=1e-4)
    assert not torch.allclose(trained.scores, evaluated.scores, atol=1e-4)
    # Eval mode ignores the key; a training pass with p = 0 is the eval pass.
    assert torch.equal(evaluated.scores, without_key.scores)
    torch.testing.assert_close(undropped.scores, evaluated.scores)
    # Every site draws its own masks: the attention weights, the residual branches and the MLPs.
    sites = [m.site for m in model.modules() if isinstance(m, KeyedDropout)]
    # Per released fusion block two residual blocks of three (attention weights, branch, MLP); per plain
    # layer four (attention weights, branch, hidden, feed-forward).
    assert sites == list(range(6 * cfg.blocks + 4 * cfg.plain_layers))


def test_the_training_step_loss_depends_on_the_step_key():
    config = tiny_config("adapter.plain_layers=1")  # the released plain-layer dropout, 0.1
    torch.manual_seed(0)
    model = RankingAdapter(config.adapter, 16, 12)
    step_loss = make_step_loss(model, config.loss, CPU, None)
    batch = torch.randn(6, 4, 16), torch.randn(5, 12), torch.randn(6), None
    keys = StepKeys(0, 2, CPU)
    first, again, second = (float(step_loss(*batch, key).total.detach()) for key in (keys[1], keys[1], keys[2]))
    assert first == again and first != second
