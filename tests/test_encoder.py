"""The encoder's fusion blocks: the released structure by default, the paper's as a switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.model.config import AdapterConfig
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


def test_released_block_computes_self_then_cross_attention_each_with_its_mlp():
    torch.manual_seed(0)
    cfg = AdapterConfig(d_model=16, heads=2, fusion_dropout=0.0)
    block = ReleasedFusionBlock(cfg)
    x, text = torch.randn(3, 5, 16), torch.randn(4, 16)

    def mha(attn, q, kv):  # plain multi-head attention from the projection weights
        if attn.__dict__["_modules"].get("qkv_proj") is not None:
            wq, wk, wv = attn.qkv_proj.weight.chunk(3)
            bq, bk, bv = attn.qkv_proj.bias.chunk(3)
        else:
            wq, bq = attn.q_proj.weight, attn.q_proj.bias
            (wk, wv), (bk, bv) = attn.kv_proj.weight.chunk(2), attn.kv_proj.bias.chunk(2)
        heads = []
        for h in range(2):
            s = slice(8 * h, 8 * h + 8)
            qh, kh, vh = (q @ wq.T + bq)[..., s], (kv @ wk.T + bk)[..., s], (kv @ wv.T + bv)[..., s]
            heads.append(torch.softmax(qh @ kh.transpose(-1, -2) / 8**0.5, dim=-1) @ vh)
        return attn.out_proj(torch.cat(heads, dim=-1))

    def residual(b, x, context):
        kv = F.layer_norm(context, (16,), b.ln_context.weight, b.ln_context.bias) if context is not None else None
        h = b.ln_attn(x)
        x = x + mha(b.attn, h, h if kv is None else kv)
        return x + b.mlp.fc_out(F.gelu(b.mlp.fc_in(b.ln_mlp(x))))

    expected = residual(block.cross_block, residual(block.self_block, x, None), text)
    torch.testing.assert_close(block(x, text), expected)


@pytest.mark.parametrize("fusion_block, cls", [("released", ReleasedFusionBlock), ("paper", PaperFusionBlock)])
def test_fusion_block_setting_picks_the_block(fusion_block, cls):
    cfg = AdapterConfig(d_model=16, heads=2, fusion_block=fusion_block)
    model = RankingAdapter(cfg, 8, 8)
    assert all(type(b) is cls for b in model.encoder.blocks)


def test_dropout_defaults_follow_the_released_code():
    model = RankingAdapter(AdapterConfig(d_model=16, heads=2), 8, 8)
    assert all(layer.self_attn.dropout == 0.1 for layer in model.encoder.plain_layers)
    assert all(not isinstance(m, torch.nn.Dropout) and getattr(m, "dropout", 0.0) == 0.0
               for m in model.encoder.blocks.modules())
