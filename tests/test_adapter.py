"""RankingAdapter: every variant builds, runs forward and backward, has the right shapes and no NaN."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rankpipe.adapter.model.adapter import RANKING_HEADS, AdapterOutput, RankingAdapter
from rankpipe.adapter.model.config import RANKING_HEAD_NAMES, AdapterConfig, LossConfig
from rankpipe.adapter.model.losses import ranking_loss
from rankpipe.errors import InputError

N, P, L, D_IMG, D_TXT = 5, 9, 7, 24, 20


def tiny(**kw) -> AdapterConfig:
    base = dict(d_model=32, heads=4, text_extra_tokens=3, blocks=1, plain_layers=1, relational_tokens=4)
    base.update(kw)
    return AdapterConfig(**base)


def batch(n: int = N, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, P, D_IMG, generator=g)
    text = torch.randn(L, D_TXT, generator=g)
    targets = torch.randn(n, generator=g)
    return image, text, targets


VARIANTS = [
    dict(ranking_head="none"),
    dict(ranking_head="subtraction"),
    dict(ranking_head="relational"),
    dict(ranking_head="relational", split_dot_product=False),
    dict(ranking_head="relational", pair_combine="concat"),
    dict(ranking_head="relational", pooling="self"),
    dict(ranking_head="relational", pooling="self", pair_combine="concat"),
    dict(ranking_head="relational", relational_tokens=1),
    dict(ranking_head="relational", relational_tokens=9),
    dict(ranking_head="relational", relational_tokens=16),
    dict(ranking_head="relational", plain_layers=0),
    dict(ranking_head="relational", plain_layers=2, blocks=2),
    dict(ranking_head="relational", fusion_block="paper", fusion_dropout=0.1),
    dict(ranking_head="relational", text_extra_tokens=0, pair_checkpoint=True, pair_chunk=6),
    dict(ranking_head="subtraction", pair_chunk=1),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_variant_forward_backward(variant):
    torch.manual_seed(0)
    model = RankingAdapter(tiny(**variant), D_IMG, D_TXT)
    image, text, targets = batch()
    out = model(image, text)
    assert out.scores.shape == (N,)
    if variant["ranking_head"] == "none":
        assert out.pair_logits is None
    else:
        assert out.pair_logits.shape == (N, N)
        assert torch.isfinite(out.pair_logits).all()
    assert torch.isfinite(out.scores).all()

    loss = ranking_loss(out, targets, LossConfig())
    loss.total.backward()
    assert torch.isfinite(loss.total)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), name
        if p.numel():
            assert p.grad.abs().max() > 0, f"{name} has an all-zero gradient"


def test_ranking_head_registry_matches_config_names():
    assert set(RANKING_HEADS) == set(RANKING_HEAD_NAMES)


def test_shared_text_equals_per_image_text():
    torch.manual_seed(0)
    model = RankingAdapter(tiny(), D_IMG, D_TXT).eval()
    image, text, _ = batch()
    shared = model(image, text)
    per_image = model(image, text.expand(N, -1, -1))
    torch.testing.assert_close(per_image.scores, shared.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(per_image.pair_logits, shared.pair_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ranking_head", ["subtraction", "relational"])
@pytest.mark.parametrize("pooling", ["cross", "self"])
def test_permuting_the_batch_permutes_the_outputs(ranking_head, pooling):
    torch.manual_seed(0)
    model = RankingAdapter(tiny(ranking_head=ranking_head, pooling=pooling), D_IMG, D_TXT).double().eval()
    image, text, _ = batch()
    image, text = image.double(), text.double()
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = model(image, text)
    out_p = model(image[perm], text)
    torch.testing.assert_close(out_p.scores, out.scores[perm])
    torch.testing.assert_close(out_p.pair_logits, out.pair_logits[perm][:, perm])


def test_each_image_scores_independently_of_the_batch():
    """The regression score of an image does not depend on which other images share its batch."""
    torch.manual_seed(0)
    model = RankingAdapter(tiny(), D_IMG, D_TXT).double().eval()
    image, text, _ = batch()
    full = model(image.double(), text.double(), with_pairs=False).scores
    alone = model(image[:2].double(), text.double(), with_pairs=False).scores
    torch.testing.assert_close(alone, full[:2])


def test_with_pairs_false_skips_the_pair_branch():
    model = RankingAdapter(tiny(), D_IMG, D_TXT)
    image, text, _ = batch()
    out = model(image, text, with_pairs=False)
    assert isinstance(out, AdapterOutput) and out.pair_logits is None and out.scores.shape == (N,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_token_dtype_is_cast_to_the_module(dtype):
    model = RankingAdapter(tiny(), D_IMG, D_TXT)
    image, text, _ = batch()
    out = model(image.to(dtype), text.to(dtype))
    assert out.scores.dtype == torch.float32 and out.pair_logits.dtype == torch.float32


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    model = RankingAdapter(tiny(), D_IMG, D_TXT)
    image, text, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, text)
        loss = ranking_loss(out, targets, LossConfig())
    loss.total.backward()
    assert torch.isfinite(loss.total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_training_step_reduces_loss():
    """A few AdamW steps on one fixed batch lower its loss (the model can learn at all)."""
    torch.manual_seed(0)
    model = RankingAdapter(tiny(), D_IMG, D_TXT)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image, text, targets = batch()
    cfg = LossConfig()
    first = ranking_loss(model(image, text), targets, cfg).total.item()
    for _ in range(15):
        opt.zero_grad()
        ranking_loss(model(image, text), targets, cfg).total.backward()
        opt.step()
    assert ranking_loss(model(image, text), targets, cfg).total.item() < 0.5 * first


@pytest.mark.parametrize(
    "image_shape,text_shape",
    [((N, P, D_IMG + 1), (L, D_TXT)), ((N, D_IMG), (L, D_TXT)), ((N, P, D_IMG), (L, D_TXT + 1)), ((N, P, D_IMG), (N + 1, L, D_TXT))],
)
def test_mismatched_token_shapes_raise_input_error(image_shape, text_shape):
    model = RankingAdapter(tiny(), D_IMG, D_TXT)
    with pytest.raises(InputError):
        model(torch.randn(image_shape), torch.randn(text_shape))


def test_config_round_trips_through_a_dict():
    cfg = tiny(pooling="self", head_hidden=16)
    assert AdapterConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    assert LossConfig.from_dict(dataclasses.asdict(LossConfig(pairwise="hinge"))) == LossConfig(pairwise="hinge")


def test_from_dict_names_the_unknown_field():
    with pytest.raises(InputError, match="relational_tokenz"):
        AdapterConfig.from_dict({"relational_tokenz": 4})
    with pytest.raises(InputError, match="lambda"):
        LossConfig.from_dict({"lambda": 1.0})


@pytest.mark.parametrize(
    "bad",
    [
        dict(d_model=30, heads=4),
        dict(ranking_head="attention"),
        dict(pooling="mean"),
        dict(pair_combine="add"),
        dict(split_dot_product=False, pair_combine="concat"),
        dict(relational_tokens=0),
        dict(pair_chunk=0),
        dict(fusion_dropout=1.0),
        dict(plain_dropout=-0.1),
        dict(fusion_block="merged"),
        dict(blocks=-1),
    ],
)
def test_invalid_adapter_config_raises_input_error(bad):
    with pytest.raises(InputError):
        tiny(**bad)


def test_head_hidden_sets_the_mlp_width():
    model = RankingAdapter(tiny(head_hidden=8), D_IMG, D_TXT)
    assert model.regression_head.mlp.linears[0].out_features == 8
    assert model.ranking_head.pair_head.mlp.linears[0].out_features == 8
    assert len(model.ranking_head.pair_head.mlp.linears) == 3
