"""Milliseconds per step of `rankpipe train`'s own loop, eager against each `train.compile` mode.

Unlike benchmarks/train_throughput.py (one bare optimiser step on random tensors), this times the whole
loop users run: `train_from_store` on a synthetic token store (benchmarks/sweep_throughput.py's), with
batch gathering, the loss monitor, the lr schedule and AdamW. Each mode trains a fresh run of the
same seed in the same process. For comparison, the same process also times the bare step of each
mode (the "step" column): the same model, optimiser and loss on one batch drawn once, repeated —
zero_grad, forward, loss, backward, gradient clipping and AdamW, nothing else; "loop / step" is what the
loop's own work (drawing batches, the schedule, the loss monitor, reports) adds. Timed: the steps between the report after `--warmup` steps (which
covers compilation) and the last report before the final validation; the reports read the loss
from the device, so each timestamp follows a synchronisation. "first steps" is the time to that
first report, compilation included.

\b
    python -m rankpipe.benchmarks.train_loop                                        # CPU: small adapter, seconds
    python -m rankpipe.benchmarks.train_loop --device cuda --images 4000 --tokens 100 --token-dim 1536 \\
        --batch-size 128 --steps 400 --full-adapter                    # H100: default adapter
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import click
import torch

from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.model.dropout import StepKeys
from rankpipe.adapter.training.features import BatchSampler
from rankpipe.adapter.training.loop import (
    TrainEvent,
    compile_mode,
    make_optimizer,
    make_step_loss,
    train_from_store,
)
from rankpipe.adapter.training.run_config import COMPILE_MODES, load_run_config
from rankpipe.adapter.training.streaming import open_features
from rankpipe.benchmarks.sweep_throughput import SMALL_ADAPTER, write_store
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore


@dataclasses.dataclass(frozen=True)
class LoopTiming:
    mode: str
    # Seconds from the start of training to the report after the warm-up steps.
    first_s: float
    # Milliseconds per step after the warm-up.
    ms_per_step: float


def time_bare_step(store: TokenStore, overrides: list[str], mode: str, warmup: int, steps: int, device: str) -> float:
    """Milliseconds per step of the loop's step alone: its model, AdamW and loss on one fixed batch."""
    config = load_run_config(None, [*overrides, f"train.compile={mode}"])
    data = LabelledStore.open(store, None, ())
    run_device = torch.device(device)
    features = open_features(data, run_device, config.train)
    torch.manual_seed(config.train.seed)
    model = RankingAdapter(config.adapter, features.image_token_dim, features.text_token_dim).to(run_device)
    optimizer = make_optimizer(model, config.optim)
    step_loss = make_step_loss(model, config.loss, run_device, compile_mode(mode, run_device))
    batch = features.train_batch(1, BatchSampler(features.train_sizes, config.train.batch_size, 0, run_device))
    text = features.queries[batch.query_index].text_tokens
    # One step's dropout key for every timed step: the masks cost the same whatever the key.
    dropout_key = StepKeys(config.train.seed, 1, run_device)[1]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        if mode == "reduce-overhead" and run_device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        step_loss(batch.image_tokens, text, batch.targets, None, dropout_key).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip)
        optimizer.step()

    for _ in range(warmup):
        step()
    _synchronize(run_device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(run_device)
    return (time.perf_counter() - start) * 1e3 / steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(store: TokenStore, out: Path, overrides: list[str], mode: str, warmup: int, steps: int,
              device: str) -> LoopTiming:
    """Train one run with `train.compile=mode`; time its steps from the report at `warmup` on."""
    config = load_run_config(None, [*overrides, f"train.compile={mode}", f"train.max_steps={steps}",
                                    f"train.eval_every={steps}", f"train.log_every={warmup}"])
    reports: dict[int, float] = {}

    def record(event: TrainEvent) -> None:
        if event.val_srcc is None:  # the last report follows the final validation: not a step
            reports[event.step] = time.perf_counter()

    start = time.perf_counter()
    train_from_store(store, out, config, device=device, progress=record)
    last = max(reports)
    return LoopTiming(mode, reports[warmup] - start, (reports[last] - reports[warmup]) * 1e3 / (last - warmup))


@click.command(help=__doc__)
@click.option("--device", default="cpu", show_default=True)
@click.option("--images", default=400, show_default=True, help="rows of the synthetic store")
@click.option("--tokens", default=16, show_default=True, help="image tokens per row")
@click.option("--token-dim", default=64, show_default=True)
@click.option("--batch-size", default=32, show_default=True, help="images per step (N)")
@click.option("--steps", default=120, show_default=True, help="steps per run, warm-up included")
@click.option("--warmup", default=20, show_default=True, help="untimed first steps (compilation happens here)")
@click.option("--modes", default=",".join(COMPILE_MODES), show_default=True, help="train.compile values to time")
@click.option("--full-adapter", is_flag=True, help="the default adapter (d_model 768, K 16) instead of the small one")
def main(device: str, images: int, tokens: int, token_dim: int, batch_size: int, steps: int, warmup: int,
         modes: str, full_adapter: bool) -> None:
    chosen = [m.strip() for m in modes.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(COMPILE_MODES))
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(COMPILE_MODES)}", param_hint="--modes")
    if steps < 3 * warmup:
        raise click.BadParameter("need at least 3 × --warmup steps so two reports follow the warm-up",
                                 param_hint="--steps")
    logging.basicConfig(level=logging.WARNING)
    overrides = [f"train.batch_size={batch_size}", *([] if full_adapter else SMALL_ADAPTER)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_store(folder / "store.zarr", images, tokens, token_dim, tars=4)
        store = TokenStore.open(folder / "store.zarr")
        timings = [time_loop(store, folder / mode, overrides, mode, warmup, steps, device) for mode in chosen]
        bare = {mode: time_bare_step(store, overrides, mode, warmup, steps - warmup, device) for mode in chosen}
    print(f"# device {device}, store {images} x {tokens} x {token_dim}, N = {batch_size}, "
          f"{'default' if full_adapter else 'small'} adapter, {steps} steps ({warmup} untimed)")
    print(f"{'train.compile':<16}{'first steps s':>14}{'ms/step':>10}{'img/s':>10}{'vs off':>9}{'step ms':>10}"
          f"{'loop / step':>13}")
    eager = next((t.ms_per_step for t in timings if t.mode == "off"), None)
    for t in timings:
        ratio = f"{eager / t.ms_per_step:.2f}x" if eager else "-"
        print(f"{t.mode:<16}{t.first_s:>14.1f}{t.ms_per_step:>10.2f}{batch_size * 1e3 / t.ms_per_step:>10,.0f}{ratio:>9}"
              f"{bare[t.mode]:>10.2f}{t.ms_per_step / bare[t.mode]:>12.2f}x")


if __name__ == "__main__":
    main()
