"""Time one optimiser step of the full ranking-aware adapter, factorised vs naive pairwise branch.

One step = AdamW zero_grad + forward + loss + backward + step on random tokens (bf16 autocast on
CUDA). For each batch size N the same model runs once with the factorised relational attention and
once with the naive reference that materialises every pair's [2P, D] keys/values.

    python -m rankpipe.benchmarks.train_throughput                      # H100 defaults: d_model 768, P=100 x 1536, K=16
    python -m rankpipe.benchmarks.train_throughput --device cpu --d-model 128 --tokens 16 --sizes 8,16,32

Columns: N, factorised ms/step, images/s, peak GiB (torch.cuda.max_memory_allocated), naive ms/step,
naive peak GiB ("OOM" when it does not fit), speed-up (naive ms / factorised ms).

Measured on one H100 80GB (torch 2.11, bf16 autocast, pair_chunk 32768) with the paper's fusion
blocks and no dropout (`--fusion-block paper --plain-dropout 0`), ms/step and peak GiB:
    N   eager             --compile reduce-overhead   naive (eager)
   64   14.6   1.4        4.9                         64.9  13.2
  128   14.7   2.7        8.8   2.1                   243.4 49.9
  256   30.3   6.0        17.5                        OOM
  512   80.9  15.0        42.0  10.0                  OOM
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import click
import torch

from rankpipe.adapter.model.adapter import AdapterOutput, RankingAdapter
from rankpipe.adapter.model.config import AdapterConfig, LossConfig
from rankpipe.adapter.model.losses import ranking_loss
from rankpipe.adapter.model.relational_reference import naive_pair_logits


@dataclass
class Timing:
    ms: float | None  # mean milliseconds per step; None = out of memory
    peak_gib: float | None  # peak allocated GPU memory over warm-up and timed steps; None on CPU or OOM


def naive_forward(model: RankingAdapter, image: torch.Tensor, text: torch.Tensor) -> AdapterOutput:
    """The adapter's forward pass with the naive pairwise branch in place of the factorised one."""
    x = model.encoder(image.to(model.encoder.image_proj.weight.dtype), text.to(model.encoder.image_proj.weight.dtype))
    return AdapterOutput(scores=model.regression_head(x), pair_logits=naive_pair_logits(model.ranking_head, x))


def time_steps(model: RankingAdapter, naive: bool, n: int, args: dict, device: torch.device) -> Timing:
    gen = torch.Generator(device="cpu").manual_seed(0)
    image = torch.randn(n, args["tokens"], args["image_dim"], generator=gen).to(device, torch.float16 if device.type == "cuda" else torch.float32)
    text = torch.randn(args["text_tokens"], args["text_dim"], generator=gen).to(device, image.dtype)
    targets = torch.randn(n, generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01, fused=device.type == "cuda")
    loss_cfg = LossConfig()
    use_autocast = device.type == "cuda" and args["autocast"]

    def loss_of(image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast):
            out = naive_forward(model, image, text) if naive else model(image, text)
            return ranking_loss(out, targets, loss_cfg).total

    if args["compile"] != "off":
        loss_of = torch.compile(loss_of, mode=args["compile"])

    def step() -> None:
        if args["compile"] == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # each step's CUDA-graph replay starts anew
        opt.zero_grad(set_to_none=True)
        loss_of(image, text, targets).backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        if device.type == "cuda":
            # Reset before the warm-up: CUDA-graph pools are allocated while recording, not while timed.
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args["warmup"]):
            step()
        sync()
        start = time.perf_counter()
        for _ in range(args["steps"]):
            step()
        sync()
        ms = (time.perf_counter() - start) * 1000 / args["steps"]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return Timing(ms, peak)
    except torch.OutOfMemoryError:
        return Timing(None, None)
    finally:
        opt.state.clear()  # frees the moments before the next size allocates its own
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def fmt(value: float | None, spec: str, missing: str = "OOM") -> str:
    return missing if value is None else format(value, spec)


@click.command()
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True, help="cuda or cpu.")
@click.option("--d-model", default=768, show_default=True)
@click.option("--tokens", default=100, show_default=True, help="P, image tokens per image.")
@click.option("--image-dim", default=1536, show_default=True, help="Width of the CLIP image tokens.")
@click.option("--text-tokens", default=77, show_default=True)
@click.option("--text-dim", default=768, show_default=True)
@click.option("--relational-tokens", default=16, show_default=True, help="K.")
@click.option("--sizes", default="64,128,256,512", show_default=True, help="Comma-separated batch sizes N.")
@click.option("--pair-chunk", default=AdapterConfig.pair_chunk, show_default=True)
@click.option("--pair-checkpoint/--no-pair-checkpoint", default=False, show_default=True)
@click.option("--pooling", type=click.Choice(["cross", "self"]), default="cross", show_default=True)
@click.option("--fusion-block", type=click.Choice(["released", "paper"]), default=AdapterConfig.fusion_block,
              show_default=True, help="Form of the encoder's fusion blocks (adapter.fusion_block).")
@click.option("--plain-dropout", default=AdapterConfig.plain_dropout, show_default=True,
              help="Dropout of the plain encoder layers (adapter.plain_dropout).")
@click.option("--naive/--no-naive", default=True, show_default=True, help="Also time the naive pairwise branch.")
@click.option("--autocast/--no-autocast", default=True, show_default=True, help="bf16 autocast (CUDA only).")
@click.option(
    "--compile",
    type=click.Choice(["off", "default", "reduce-overhead", "max-autotune-no-cudagraphs"]),
    default="off",
    show_default=True,
    help="torch.compile mode for forward + loss (reduce-overhead replays CUDA graphs).",
)
@click.option("--warmup", default=3, show_default=True)
@click.option("--steps", default=10, show_default=True)
def main(**args) -> None:
    """Print a table of train-step time and memory, factorised vs naive pairwise branch."""
    device = torch.device(args["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = AdapterConfig(
        d_model=args["d_model"],
        relational_tokens=args["relational_tokens"],
        pair_chunk=args["pair_chunk"],
        pair_checkpoint=args["pair_checkpoint"],
        pooling=args["pooling"],
        fusion_block=args["fusion_block"],
        plain_dropout=args["plain_dropout"],
    )
    torch.manual_seed(0)
    model = RankingAdapter(cfg, args["image_dim"], args["text_dim"]).to(device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# {name}; adapter {params:.1f} M params; d_model {cfg.d_model}, P {args['tokens']}x{args['image_dim']}, "
          f"text {args['text_tokens']}+{cfg.text_extra_tokens}x{args['text_dim']}, K {cfg.relational_tokens}, "
          f"pooling {cfg.pooling}, fusion {cfg.fusion_block}, plain dropout {cfg.plain_dropout}, pair_chunk {cfg.pair_chunk}, checkpoint {cfg.pair_checkpoint}, "
          f"autocast {'bf16' if device.type == 'cuda' and args['autocast'] else 'off'}, compile {args['compile']}")
    print(f"{'N':>5} {'ms/step':>9} {'img/s':>9} {'peak GiB':>9} {'naive ms':>9} {'naive GiB':>9} {'speed-up':>9}")
    for n in (int(s) for s in args["sizes"].split(",")):
        fast = time_steps(model, False, n, args, device)
        slow = time_steps(model, True, n, args, device) if args["naive"] else Timing(None, None)
        ips = n * 1000 / fast.ms if fast.ms else None
        speedup = slow.ms / fast.ms if slow.ms and fast.ms else None
        missing = "OOM" if args["naive"] else "-"
        print(
            f"{n:>5} {fmt(fast.ms, '9.1f'):>9} {fmt(ips, '9.0f'):>9} {fmt(fast.peak_gib, '9.2f', '-'):>9} "
            f"{fmt(slow.ms, '9.1f', missing):>9} {fmt(slow.peak_gib, '9.2f', '-' if slow.ms else missing):>9} "
            f"{fmt(speedup, '9.2f', '-'):>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()
