"""The adapter's encoder: fuses the query's text into every image token (paper §3.2).

Image tokens and text tokens are projected to d_model and learnable tokens are appended to the text.
Then `blocks` fusion blocks run, in one of two forms (`fusion_block`):

- "released" (the released code's fusion transformer): a pre-norm self-attention block over the
  image tokens with its own MLP, then a pre-norm cross-attention block from image tokens to text
  tokens with its own MLP: two residual attention + MLP blocks per fusion block.
- "paper" (the paper's description): one pre-norm block of self-attention, cross-attention and a
  single MLP.

Both are followed by a LayerNorm and by plain post-norm transformer encoder layers (feed-forward
width d_model) as in the released code, kept here as `plain_layers`.

The text of one query is shared by the whole batch, so its keys and values are computed once and
broadcast over the images instead of being repeated N times.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankpipe.adapter.model.config import AdapterConfig


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`; self- or cross-attention."""

    def __init__(self, d_model: int, heads: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        if cross:  # queries from x, keys/values from the context
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:  # one projection for q, k and v
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Attend from `x` [N, T, D] to `context` ([N, S, D], or [S, D] shared by the batch; None for
        self-attention)."""
        N, T, D = x.shape
        H, c = self.heads, D // self.heads
        if context is None:
            q, k, v = self.qkv_proj(x).chunk(3, dim=-1)  # (N, T, D) each
            context = x
        else:
            q = self.q_proj(x)  # (N, T, D)
            k, v = self.kv_proj(context).chunk(2, dim=-1)  # (..., S, D) each
        q = q.reshape(N, T, H, c).transpose(1, 2)  # (N, H, T, c)
        S = context.shape[-2]
        if context.dim() == 2:  # one context for the whole batch: project once, broadcast
            k = k.reshape(S, H, c).transpose(0, 1).expand(N, H, S, c)  # (N, H, S, c)
            v = v.reshape(S, H, c).transpose(0, 1).expand(N, H, S, c)  # (N, H, S, c)
        else:
            k = k.reshape(N, S, H, c).transpose(1, 2)  # (N, H, S, c)
            v = v.reshape(N, S, H, c).transpose(1, 2)  # (N, H, S, c)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (N, H, T, c)
        y = y.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.out_proj(y)


def dropout_layer(p: float) -> nn.Module:
    """nn.Dropout, or Identity at p = 0 so that no kernel is launched for nothing."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class MLP(nn.Module):
    """Linear -> GELU -> Linear, the transformer feed-forward layer."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)
        self.drop = dropout_layer(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc_out(F.gelu(self.fc_in(x))))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm attention then pre-norm MLP, each added back to the input (open_clip's residual block).

    Self-attention when built with `cross=False`; with `cross=True` the block attends to a context
    that gets its own LayerNorm, as open_clip's cross-attention blocks do.
    """

    def __init__(self, d_model: int, heads: int, mlp_ratio: float, dropout: float, cross: bool) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.ln_context = nn.LayerNorm(d_model) if cross else None
        self.attn = Attention(d_model, heads, dropout, cross=cross)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, int(d_model * mlp_ratio), dropout)
        self.drop = dropout_layer(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """x [N, T, D], context [S, D] or [N, S, D] (cross) or None (self) -> [N, T, D]."""
        context = self.ln_context(context) if self.ln_context is not None else None
        x = x + self.drop(self.attn(self.ln_attn(x), context))
        return x + self.mlp(self.ln_mlp(x))


class ReleasedFusionBlock(nn.Module):
    """Self-attention block then cross-attention block, each with its own MLP (the released code)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.self_block = ResidualAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.fusion_dropout, cross=False)
        self.cross_block = ResidualAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.fusion_dropout, cross=True)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        """x [N, P, D] image tokens, text [L, D] or [N, L, D] -> [N, P, D]."""
        return self.cross_block(self.self_block(x), text)


class PaperFusionBlock(nn.Module):
    """Pre-norm block: self-attention over image tokens, cross-attention to text tokens, one MLP (the paper)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.ln_self = nn.LayerNorm(D)
        self.self_attn = Attention(D, cfg.heads, cfg.fusion_dropout, cross=False)
        self.ln_cross = nn.LayerNorm(D)
        self.ln_text = nn.LayerNorm(D)  # keys/values get their own norm, as in open_clip's cross-attention
        self.cross_attn = Attention(D, cfg.heads, cfg.fusion_dropout, cross=True)
        self.ln_mlp = nn.LayerNorm(D)
        self.mlp = MLP(D, int(D * cfg.mlp_ratio), cfg.fusion_dropout)
        self.drop = dropout_layer(cfg.fusion_dropout)

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        """x [N, P, D] image tokens, text [L, D] or [N, L, D] -> [N, P, D]."""
        x = x + self.drop(self.self_attn(self.ln_self(x)))
        x = x + self.drop(self.cross_attn(self.ln_cross(x), self.ln_text(text)))
        return x + self.mlp(self.ln_mlp(x))


# fusion_block name -> the block class.
FUSION_BLOCKS: dict[str, type[nn.Module]] = {"released": ReleasedFusionBlock, "paper": PaperFusionBlock}


class PlainLayer(nn.Module):
    """Post-norm transformer encoder layer with ReLU feed-forward, as `nn.TransformerEncoderLayer`
    with `dim_feedforward=d_model` in the released code; written out to share `Attention`'s SDPA path."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.self_attn = Attention(D, cfg.heads, cfg.plain_dropout, cross=False)
        self.ln_attn = nn.LayerNorm(D)
        self.fc_in = nn.Linear(D, D)
        self.fc_out = nn.Linear(D, D)
        self.ln_ff = nn.LayerNorm(D)
        self.drop = dropout_layer(cfg.plain_dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln_attn(x + self.drop(self.self_attn(x)))
        ff = self.fc_out(self.drop(F.relu(self.fc_in(x))))
        return self.ln_ff(x + self.drop(ff))


class AdapterEncoder(nn.Module):
    """Projects CLIP tokens to d_model and fuses the query into the image tokens.

    Input: image tokens [N, P, D_img], text tokens [L, D_txt] (one query for the batch) or
    [N, L, D_txt]. Output: text-conditioned image tokens [N, P, d_model].
    """

    def __init__(self, cfg: AdapterConfig, image_token_dim: int, text_token_dim: int) -> None:
        super().__init__()
        D = cfg.d_model
        self.image_proj = nn.Linear(image_token_dim, D)
        self.text_proj = nn.Linear(text_token_dim, D)
        self.text_extra = nn.Parameter(torch.empty(cfg.text_extra_tokens, D))  # (T, D)
        fusion_block = FUSION_BLOCKS[cfg.fusion_block]
        self.blocks = nn.ModuleList(fusion_block(cfg) for _ in range(cfg.blocks))
        self.ln_out = nn.LayerNorm(D)
        self.plain_layers = nn.ModuleList(PlainLayer(cfg) for _ in range(cfg.plain_layers))

    def init_weights(self) -> None:
        """Truncated-normal linear weights (std 0.02), zero biases, unit norms, small extra tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.text_extra, std=self.text_extra.shape[-1] ** -0.5)

    def forward(self, image_tokens: Tensor, text_tokens: Tensor) -> Tensor:
        x = self.image_proj(image_tokens)  # (N, P, D)
        text = self.text_proj(text_tokens)  # (L, D) or (N, L, D)
        extra = self.text_extra.to(text.dtype)
        if text.dim() == 3:
            extra = extra.expand(text.shape[0], -1, -1)  # (N, T, D)
        text = torch.cat([text, extra], dim=-2)  # (L + T, D) or (N, L + T, D)
        for block in self.blocks:
            x = block(x, text)
        x = self.ln_out(x)
        for layer in self.plain_layers:
            x = layer(x)
        return x  # (N, P, D)
