"""The encoder's fusion blocks: the released structure by default, the paper's as a switch."""

from __future__ import annotations

import pytest
import torch

from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.dropout import KeyedDropout
from rankpipe.adapter.model.encoder import PaperFusionBlock, ReleasedFusionBlock

# The paper's sizes: d_model 768, 8 heads, 2 fusion blocks + 2 plain layers, K = 16 relational
# tokens, 32 learnable text tokens.
PAPER_SIZES = dict(d_model=768, heads=8, blocks=2, plain_layers=2, relational_tokens=16, text_extra_tokens=32)


def core_parameters(cfg: AdapterConfig) -> int:
    """Parameters of the adapter without its input projections image_proj / text_proj (built on the meta device)."""
    with torch.device("meta"):
        model = RankingAdapter(cfg, image_token_dim=1024, text_token_dim=768)
    return sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith(("encoder.image_proj.", "encoder.text_proj.")))


def test_released_fusion_blocks_give_the_released_parameter_count():
    D, K, T = 768, 16, 32
    linear = lambda a, b: a * b + b  # noqa: E731  weight + bias
    norm = 2 * D  # gain + bias
    attention = 4 * linear(D, D)  # in-projection of q, k, v (3 D x D) and out-projection, with biases
    mlp = linear(D, 4 * D) + linear(4 * D, D)  # mlp_ratio 4, GELU between
    # open_clip ResidualAttentionBlock: ln_1, attn, ln_2, mlp; the cross-attention one adds ln_1_kv.
    self_block = norm + attention + norm + mlp
    cross_block = norm + norm + attention + norm + mlp
    fusion = 2 * (self_block + cross_block) + norm  # 2 layers, then ln_final (the D x D output projection
    # that torch.empty leaves uninitialised in the released code is not counted)
    # nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=d_model): attention, 2 linears, 2 norms.
    plain = 2 * (attention + linear(D, D) + linear(D, D) + 2 * norm)
    # Ranking-aware attention: K tokens, q and kv projections each with a LayerNorm, out-projection.
    relational = K * D + linear(D, D) + norm + linear(D, D) + norm + linear(D, D)
    # Pair head: LayerNorm, 3 x (Linear, LayerNorm, ReLU), Linear to one logit.
    pair_head = norm + 3 * (linear(D, D) + norm) + linear(D, 1)
    # Regression head: LayerNorm, then 2 x (Linear, LayerNorm, ReLU), Linear to one score.
    regression = norm + 2 * (linear(D, D) + norm) + linear(D, 1)
    text_tokens = T * D  # rankpipe's learnable text tokens are D-wide (the released ones are T scalars)
    expected = fusion + plain + relational + pair_head + regression + text_tokens
    # The released adapter: (1, T) text-token scalars instead of T x D, plus the D x D projection: 40.8 M.
    assert round((expected - text_tokens + T + D * D) / 1e6, 1) == 40.8
    assert core_parameters(AdapterConfig(**PAPER_SIZES)) == expected


def test_paper_fusion_blocks_share_one_mlp_and_are_smaller():
    D = 768
    released = core_parameters(AdapterConfig(**PAPER_SIZES))
    paper = core_parameters(AdapterConfig(**PAPER_SIZES, fusion_block="paper"))
    # Per block the paper form has one MLP (8 D^2 + 5 D) and one LayerNorm (2 D) fewer.
    assert released - paper == 2 * (8 * D * D + 5 * D + 2 * D)


def copy_into_open_clip(block, reference) -> None:
    """Copy a ResidualAttentionBlock's weights into open_clip's block of the same structure."""
    attn = block.attn
    if block.ln_context is None:
        in_w, in_b = attn.qkv_proj.weight, attn.qkv_proj.bias
    else:
        in_w = torch.cat([attn.q_proj.weight, attn.kv_proj.weight])
        in_b = torch.cat([attn.q_proj.bias, attn.kv_proj.bias])
        reference.ln_1_kv.load_state_dict(block.ln_context.state_dict())
    reference.attn.in_proj_weight.data.copy_(in_w)
    reference.attn.in_proj_bias.data.copy_(in_b)
    reference.attn.out_proj.load_state_dict(attn.out_proj.state_dict())
    reference.ln_1.load_state_dict(block.ln_attn.state_dict())
    reference.ln_2.load_state_dict(block.ln_mlp.state_dict())
    reference.mlp.c_fc.load_state_dict(block.mlp.fc_in.state_dict())
    reference.mlp.c_proj.load_state_dict(block.mlp.fc_out.state_dict())


def test_released_block_computes_what_open_clips_self_and_cross_attention_blocks_compute():
    from open_clip.transformer import ResidualAttentionBlock

    torch.manual_seed(0)
    block = ReleasedFusionBlock(AdapterConfig(d_model=16, heads=2))
    for p in block.parameters():  # away from the identity gains and zero biases of a fresh LayerNorm
        torch.nn.init.normal_(p, std=0.3)
    self_ref = ResidualAttentionBlock(16, 2, 4.0)
    cross_ref = ResidualAttentionBlock(16, 2, 4.0, is_cross_attention=True)
    copy_into_open_clip(block.self_block, self_ref)
    copy_into_open_clip(block.cross_block, cross_ref)
    x, text = torch.randn(3, 5, 16), torch.randn(3, 4, 16)
    expected = cross_ref(self_ref(x), k_x=text, v_x=text)
    torch.testing.assert_close(block(x, text), expected)
    torch.testing.assert_close(block(x, text[0]), cross_ref(self_ref(x), k_x=text[:1].expand(3, 4, 16),
                                                             v_x=text[:1].expand(3, 4, 16)))


@pytest.mark.parametrize("fusion_block, cls", [("released", ReleasedFusionBlock), ("paper", PaperFusionBlock)])
def test_fusion_block_setting_picks_the_block(fusion_block, cls):
    cfg = AdapterConfig(d_model=16, heads=2, fusion_block=fusion_block)
    model = RankingAdapter(cfg, 8, 8)
    assert all(type(b) is cls for b in model.encoder.blocks)


def test_dropout_defaults_follow_the_released_code():
    model = RankingAdapter(AdapterConfig(d_model=16, heads=2), 8, 8)
    plain = [m for m in model.encoder.plain_layers.modules() if isinstance(m, KeyedDropout)]
    assert len(plain) == 4 * len(model.encoder.plain_layers) and all(m.p == 0.1 for m in plain)
    assert all(m.p == 0.0 for m in model.encoder.blocks.modules() if isinstance(m, KeyedDropout))
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
