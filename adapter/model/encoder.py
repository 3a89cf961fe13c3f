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

Dropout (`fusion_dropout`, `plain_dropout`) sits where the released code has it, as `KeyedDropout`s
(adapter/model/dropout.py): a training forward pass takes a dropout key, and every mask is a function
of that key and the dropout's site, so a run draws the same masks alone, fused with others or resumed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.dropout import KeyedDropout, number_sites, random_key, site_keys


class Attention(nn.Module):
    """Multi-head attention through `F.scaled_dot_product_attention`; self- or cross-attention.

    Dropout of the attention weights (nn.MultiheadAttention's) needs the weights themselves: while it is
    active the attention is computed step by step (as SDPA's math kernel does), otherwise by SDPA.
    """

    def __init__(self, d_model: int, heads: int, dropout: float, cross: bool) -> None:
        super().__init__()
        self.heads = heads
        self.weights_drop = KeyedDropout(dropout)
        if cross:  # queries from x, keys/values from the context
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:  # one projection for q, k and v
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, context: Tensor | None = None, drop_keys: Tensor | None = None) -> Tensor:
        """Attend from `x` [N, T, D] to `context` ([N, S, D], or [S, D] shared by the batch; None for
        self-attention); `drop_keys` are the pass's dropout keys (see KeyedDropout)."""
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
        if self.training and self.weights_drop.p > 0:
            weights = torch.softmax(q @ k.transpose(-2, -1) * c**-0.5, dim=-1)  # (N, H, T, S)
            y = self.weights_drop(weights, drop_keys) @ v  # (N, H, T, c)
        else:
            y = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, c)
        y = y.transpose(1, 2).reshape(N, T, D)  # (N, T, D)
        return self.out_proj(y)


class MLP(nn.Module):
    """Linear -> GELU -> Linear, the transformer feed-forward layer."""

    def __init__(self, d_model: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_model, hidden)
        self.fc_out = nn.Linear(hidden, d_model)
        self.drop = KeyedDropout(dropout)

    def forward(self, x: Tensor, drop_keys: Tensor | None = None) -> Tensor:
        return self.drop(self.fc_out(F.gelu(self.fc_in(x))), drop_keys)


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
        self.drop = KeyedDropout(dropout)

    def forward(self, x: Tensor, context: Tensor | None = None, drop_keys: Tensor | None = None) -> Tensor:
        """x [N, T, D], context [S, D] or [N, S, D] (cross) or None (self) -> [N, T, D]."""
        context = self.ln_context(context) if self.ln_context is not None else None
        x = x + self.drop(self.attn(self.ln_attn(x), context, drop_keys), drop_keys)
        return x + self.mlp(self.ln_mlp(x), drop_keys)


class ReleasedFusionBlock(nn.Module):
    """Self-attention block then cross-attention block, each with its own MLP (the released code)."""

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__()
        D = cfg.d_model
        self.self_block = ResidualAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.fusion_dropout, cross=False)
        self.cross_block = ResidualAttentionBlock(D, cfg.heads, cfg.mlp_ratio, cfg.fusion_dropout, cross=True)

    def forward(self, x: Tensor, text: Tensor, drop_keys: Tensor | None = None) -> Tensor:
        """x [N, P, D] image tokens, text [L, D] or [N, L, D] -> [N, P, D]."""
        return self.cross_block(self.self_block(x, None, drop_keys), text, drop_keys)


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
        # One module per place it is applied: each place draws its own masks.
        self.drop_self = KeyedDropout(cfg.fusion_dropout)
        self.drop_cross = KeyedDropout(cfg.fusion_dropout)

    def forward(self, x: Tensor, text: Tensor, drop_keys: Tensor | None = None) -> Tensor:
        """x [N, P, D] image tokens, text [L, D] or [N, L, D] -> [N, P, D]."""
        x = x + self.drop_self(self.self_attn(self.ln_self(x), None, drop_keys), drop_keys)
        x = x + self.drop_cross(self.cross_attn(self.ln_cross(x), self.ln_text(text), drop_keys), drop_keys)
        return x + self.mlp(self.ln_mlp(x), drop_keys)


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
        # nn.TransformerEncoderLayer's dropout1, dropout and dropout2: one module per place it is applied.
        self.drop_attn = KeyedDropout(cfg.plain_dropout)
        self.drop_hidden = KeyedDropout(cfg.plain_dropout)
        self.drop_ff = KeyedDropout(cfg.plain_dropout)

    def forward(self, x: Tensor, drop_keys: Tensor | None = None) -> Tensor:
        x = self.ln_attn(x + self.drop_attn(self.self_attn(x, None, drop_keys), drop_keys))
        ff = self.fc_out(self.drop_hidden(F.relu(self.fc_in(x)), drop_keys))
        return self.ln_ff(x + self.drop_ff(ff, drop_keys))


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
        self.dropout_sites = number_sites(self)
        # Whether a training pass drops anything (only then does it need keys).
        self.drops = any(m.p > 0 for m in self.modules() if isinstance(m, KeyedDropout))

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

    def forward(self, image_tokens: Tensor, text_tokens: Tensor, dropout_key: Tensor | None = None) -> Tensor:
        """`dropout_key` (int64 [2], see adapter/model/dropout.py) fixes a training pass's dropout masks;
        without one a training pass draws a key from the process's generator, as nn.Dropout would."""
        drop_keys = None
        if self.training and self.drops:
            key = dropout_key if dropout_key is not None else random_key(image_tokens.device)
            drop_keys = site_keys(key, self.dropout_sites)  # (sites, 2), once for the whole pass
        x = self.image_proj(image_tokens)  # (N, P, D)
        text = self.text_proj(text_tokens)  # (L, D) or (N, L, D)
        extra = self.text_extra.to(text.dtype)
        if text.dim() == 3:
            extra = extra.expand(text.shape[0], -1, -1)  # (N, T, D)
        text = torch.cat([text, extra], dim=-2)  # (L + T, D) or (N, L + T, D)
        for block in self.blocks:
            x = block(x, text, drop_keys)
        x = self.ln_out(x)
        for layer in self.plain_layers:
            x = layer(x, drop_keys)
        return x  # (N, P, D)
