"""The factorised relational attention against the naive [N², 2P, D] reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from rankpipe.adapter.model.config import AdapterConfig
from rankpipe.adapter.model.relational import RelationalAttention
from rankpipe.adapter.model.relational_reference import naive_pair_logits

N, P, D, H = 6, 9, 32, 4

# (pooling, split_dot_product, pair_combine)
VARIANTS = [
    ("cross", True, "subtract"),
    ("cross", True, "concat"),
    ("cross", False, "subtract"),
    ("self", True, "subtract"),
    ("self", True, "concat"),
    ("self", False, "subtract"),
]


def make(pooling: str = "cross", split: bool = True, combine: str = "subtract", K: int = 4, **kw) -> RelationalAttention:
    torch.manual_seed(0)
    cfg = AdapterConfig(
        d_model=D, heads=H, relational_tokens=K, pooling=pooling, split_dot_product=split, pair_combine=combine, **kw
    )
    module = RelationalAttention(cfg)
    module.init_weights()
    # Non-trivial norms and biases, so that no parameter's gradient is accidentally zero.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def off_diagonal(n: int) -> torch.Tensor:
    return ~torch.eye(n, dtype=torch.bool)


def logits_and_grads(fn, module: RelationalAttention, x: torch.Tensor, g: torch.Tensor):
    """Logits of fn(module, x) and gradients of <logits, g> w.r.t. x and every parameter."""
    x = x.detach().requires_grad_(True)
    out = fn(module, x)
    grads = torch.autograd.grad(out, [x, *module.parameters()], g)
    return out, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300)).item()


def factorised(module, x):
    return module(x)


def inputs(dtype: torch.dtype, n: int = N):
    torch.manual_seed(1)
    x = torch.randn(n, P, D, dtype=torch.float64).to(dtype)
    # The diagonal is meaningless (a_i - a_i = 0 feeds a LayerNorm at zero): no gradient through it,
    # as in the loss, which never counts i = j.
    g = (torch.randn(n, n, dtype=torch.float64) * off_diagonal(n)).to(dtype)
    return x, g


@pytest.mark.parametrize("pooling,split,combine", VARIANTS)
@pytest.mark.parametrize("K", [1, 4])
def test_float64_parity_forward_backward(pooling, split, combine, K):
    module = make(pooling, split, combine, K=K, pair_chunk=10).double()
    x, g = inputs(torch.float64)
    ours, ours_grads = logits_and_grads(factorised, module, x, g)
    ref, ref_grads = logits_and_grads(naive_pair_logits, module, x, g)
    off = off_diagonal(N)
    assert rel_err(ours[off], ref[off]) <= 1e-10
    names = ["x"] + [name for name, _ in module.named_parameters()]
    for name, a, b in zip(names, ours_grads, ref_grads):
        assert b.abs().max() > 0, name  # the comparison below must not be vacuous
        assert rel_err(a, b) <= 1e-10, name


@pytest.mark.parametrize("pooling,split,combine", VARIANTS)
def test_float32_parity(pooling, split, combine):
    module = make(pooling, split, combine)
    x, g = inputs(torch.float32)
    ours, ours_grads = logits_and_grads(factorised, module, x, g)
    ref, ref_grads = logits_and_grads(naive_pair_logits, module, x, g)
    off = off_diagonal(N)
    assert rel_err(ours[off], ref[off]) <= 1e-4
    for a, b in zip(ours_grads, ref_grads):
        assert rel_err(a, b) <= 1e-3


def grad_error(grads, ref_grads) -> float:
    """Mean over tensors of the relative L2 error of a gradient."""
    errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(grads, ref_grads)]
    return sum(errs) / len(errs)


@pytest.mark.parametrize("pooling", ["cross", "self"])
def test_bfloat16_parity(pooling):
    """Under bf16 autocast and as a bf16 module, the factorised form is about as close to the float64
    result as the naive form computed in the same precision."""
    x, g = inputs(torch.float32)
    off = off_diagonal(N)
    ref, ref_grads = logits_and_grads(naive_pair_logits, make(pooling).double(), x.double(), g.double())

    module = make(pooling)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, ours_grads = logits_and_grads(factorised, module, x, g)
        naive, naive_grads = logits_and_grads(naive_pair_logits, module, x, g)
    assert rel_err(ours.float()[off], ref[off]) <= 3e-2
    assert grad_error(ours_grads, ref_grads) <= 2 * grad_error(naive_grads, ref_grads) + 1e-2

    bf16 = make(pooling).to(torch.bfloat16)
    ref_bf = make(pooling).to(torch.bfloat16).double()  # identical, bf16-rounded weights
    ours, _ = logits_and_grads(factorised, bf16, x.bfloat16(), g.bfloat16())
    ref_b, _ = logits_and_grads(naive_pair_logits, ref_bf, x.bfloat16().double(), g.double())
    assert ours.dtype == torch.bfloat16
    assert rel_err(ours.float()[off], ref_b[off]) <= 5e-2


@pytest.mark.parametrize("pooling", ["cross", "self"])
@pytest.mark.parametrize("chunk", [1, 7, 13, 4096])
def test_chunk_size_does_not_change_results(pooling, chunk):
    x, g = inputs(torch.float64, n=7)
    base, base_grads = logits_and_grads(factorised, make(pooling, pair_chunk=49).double(), x, g)
    out, grads = logits_and_grads(factorised, make(pooling, pair_chunk=chunk).double(), x, g)
    torch.testing.assert_close(out, base, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, base_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pooling", ["cross", "self"])
def test_pair_checkpoint_gives_same_gradients(pooling):
    x, g = inputs(torch.float64, n=7)
    plain, plain_grads = logits_and_grads(factorised, make(pooling, pair_chunk=10).double(), x, g)
    rec, rec_grads = logits_and_grads(factorised, make(pooling, pair_chunk=10, pair_checkpoint=True).double(), x, g)
    torch.testing.assert_close(rec, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(rec_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pooling", ["cross", "self"])
def test_merged_form_is_symmetric_and_split_is_not(pooling):
    x, _ = inputs(torch.float64)
    merged = make(pooling, split=False).double()(x)
    split = make(pooling, split=True).double()(x)
    torch.testing.assert_close(merged, merged.T, rtol=1e-12, atol=1e-12)
    assert (split - split.T).abs().max() > 1e-3


def largest_saved(fn, module, x) -> int:
    """Numel of the largest tensor autograd keeps for backward while computing fn(module, x)."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(module, x.requires_grad_(True))
    return max(sizes)


def test_no_per_pair_token_tensor_is_kept():
    """Cross pooling keeps at most [N², D]-sized tensors; the naive form keeps [N², 2P, D] ones."""
    n, K = 12, 4
    module = make("cross", K=K, pair_chunk=10_000)
    x = torch.randn(n, P, D)
    bound = n * n * max(D, H * K)  # pair features / per-pair softmax weights
    assert largest_saved(factorised, module, x) <= bound
    assert largest_saved(naive_pair_logits, module, x) >= n * n * 2 * P * D > bound
