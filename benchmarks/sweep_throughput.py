"""Wall time of a sweep of N trials against a single trial, and trial throughput against dask workers.

Writes a synthetic token store (random tokens of the requested shape whose first channel carries the
label, so training has something to learn), then times `rankpipe sweep`'s runner on one device:
one trial, N trials (seeds 0..N-1 of the same settings) each trained alone with `--concurrency` C, and
the same N trials fused into one model (`--fuse-max`, one unit at a time). Every row trains the
adapter's dropout (0.1 in the plain layers), which fuses too. Evaluation after
training is off, so every timing is training only; an untimed short trial runs first to warm up.
Prints a table: trials, concurrency, wall seconds, seconds per trial, trials per minute, and the
ratio to the single trial (the target on one H100: 16 trials ≤ 4× one trial).

With --workers-list W1,W2,... the same N trials then run, for each W, on a dask LocalCluster of W
workers through the runner's own cluster path (`rankpipe sweep --cluster local:W`, one trial per
worker at a time). Timed: the whole sweep call on the running cluster, which includes every worker
loading the store's features, as the local runs do. The cluster's start (until all W workers are
connected) is reported apart. Before timing, one short trial pinned to each worker, on a separate
small store, imports torch and starts the device there. The table gives trials per minute and its
ratio to the first W. With --device cuda the workers share the visible GPUs round robin (on a
one-GPU machine, all of them share it). dask starts workers with OMP_NUM_THREADS=1; the header
prints the torch thread counts, which decide most of what a CPU run shows.

    python -m rankpipe.benchmarks.sweep_throughput                          # CPU: tiny store and adapter, seconds
    python -m rankpipe.benchmarks.sweep_throughput --workers-list 1,2       # ... and the same trials on 1 and 2 workers
    python -m rankpipe.benchmarks.sweep_throughput --device cuda --images 4000 --tokens 100 --token-dim 1536 \
        --trials 16 --concurrency 16 --steps 300 --full-adapter
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from rankpipe.adapter.experiments.sweep.runner import (
    SweepRequest,
    run_sweep,
    trial_task,
)
from rankpipe.adapter.experiments.sweep.spec import SweepSpec, expand_trials
from rankpipe.adapter.experiments.sweep.trial import DONE, TrialSettings
from rankpipe.adapter.training.run_config import SMALL_ADAPTER_OVERRIDES
from rankpipe.pipeline.cluster import ClusterSpec, open_client
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest
from rankpipe.pipeline.data.tars import TarInfo
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.store import BlockMeta, StoreConfig, create_store, plan_store

# The small adapter of the CPU run (the --full-adapter run uses the defaults: d_model 768, K 16).
SMALL_ADAPTER = (*SMALL_ADAPTER_OVERRIDES, "adapter.relational_tokens=4")
TEXT_TOKENS, TEXT_DIM, EMBED_DIM = 16, 64, 32
# Rows of the small store the cluster warm-up trains on (kept apart so the timed sweep loads its own features).
WARM_UP_IMAGES = 64


def write_store(path: Path, images: int, tokens: int, token_dim: int, tars: int, seed: int = 0) -> None:
    """A store of `images` rows in `tars` tars: label "score" is written into channel 0 of every token."""
    rng = np.random.default_rng(seed)
    manifest = Manifest(name="sweep-bench", shards=f"x-{{000000..{tars - 1:06d}}}.tar",
                        labels=(LabelSpec("score", "Sort images by score."),))
    text = TextFeatures(tokens=rng.normal(0, 1, (TEXT_TOKENS, TEXT_DIM)).astype(np.float16), length=TEXT_TOKENS,
                        embed=np.zeros(EMBED_DIM, np.float16))
    provenance = {"model": "synthetic", "pretrained": "none", "checkpoint_sha256": None, "seed": seed,
                  "image_size": [1, 1], "preprocess": {}, "token_grid": [tokens, 1], "token_dim": token_dim,
                  "embed_dim": EMBED_DIM, "text_token_dim": TEXT_DIM, "context_length": TEXT_TOKENS}
    per_tar = [images // tars + (t < images % tars) for t in range(tars)]
    plan = plan_store([TarInfo(f"x-{t:06d}.tar", n) for t, n in enumerate(per_tar)], tokens * token_dim * 2,
                      StoreConfig())
    store = create_store(path, plan, provenance, manifest, {manifest.labels[0].query: text}, StoreConfig())
    for t, block in enumerate(plan.tars):
        size, n = block.row_stop - block.row_start, block.count
        labels = np.full(size, np.nan, np.float32)
        labels[:n] = rng.uniform(0, 1, n)
        block_tokens = rng.normal(0, 1, (size, tokens, token_dim)).astype(np.float16)  # [rows, P, D]
        block_tokens[:, :, 0] = labels[:, None]
        splits = np.full(size, "", dtype=object)
        splits[:n] = np.where(np.arange(n) % 5 == 0, "val", "train")
        store.write_tokens(block.row_start, block_tokens, np.zeros((size, EMBED_DIM), np.float16))
        store.write_block_meta(t, BlockMeta(
            keys=np.array([f"t{t}-{i}" if i < n else "" for i in range(size)]), valid=np.arange(size) < n,
            errors=np.full(size, ""), splits=splits.astype(str), labels={"score": labels},
        ))
        store.mark_done(t)


def time_sweep(store: Path, out: Path, trials: int, concurrency: int, base: tuple[str, ...], device: str,
               client=None, fuse_max: int = 1) -> float:
    """Seconds of one `run_sweep` call over seeds 0..trials-1; on the dask `client`'s workers when given.

    On CUDA in this process, the call's peak of allocated device memory is left in `torch.cuda`'s
    statistics (reset here first) for `peak_gb` to read.
    """
    if device.startswith("cuda") and client is None:
        torch.cuda.reset_peak_memory_stats(device)
    spec = SweepSpec(base=base, grid={"train.seed": tuple(range(trials))})
    request = SweepRequest(store=store, out_dir=out, trial=TrialSettings(labels=(), eval_split=None),
                           device=device, concurrency=concurrency, fuse_max=fuse_max)
    start = time.perf_counter()
    outcome = run_sweep(expand_trials(spec), request, varied=("train.seed",), client=client)
    seconds = time.perf_counter() - start
    failed = [r for r in outcome.records if r.state != "done"]
    if failed:
        raise click.ClickException(f"{len(failed)} trial(s) failed: {failed[0].reason}")
    return seconds


@dataclasses.dataclass(frozen=True)
class ClusterTiming:
    """The N-trial sweep on one LocalCluster."""

    # Worker processes.
    workers: int
    # Seconds from starting the cluster until all its workers were connected.
    start_s: float
    # Seconds of the sweep call.
    sweep_s: float
    # torch's intra-op thread counts the workers reported.
    threads: frozenset[int]


def time_on_cluster(store: Path, warm_up_store: Path, out: Path, workers: int, trials: int, base: tuple[str, ...],
                    warm_up_base: tuple[str, ...], device: str) -> ClusterTiming:
    """Start a LocalCluster of `workers`, warm each worker, then time the sweep on it."""
    start = time.perf_counter()
    with open_client(ClusterSpec(local_workers=workers), device) as client:
        client.wait_for_workers(workers)
        start_s = time.perf_counter() - start
        warm_every_worker(client, warm_up_store, out / "warm-up", warm_up_base, device)
        threads = frozenset(client.run(torch.get_num_threads).values())
        sweep_s = time_sweep(store, out / "sweep", trials, 1, base, device, client=client)
    return ClusterTiming(workers, start_s, sweep_s, threads)


def warm_every_worker(client, store: Path, out: Path, base: tuple[str, ...], device: str) -> None:
    """One short trial on each worker of the cluster, as a task pinned to that worker."""
    addresses = list(client.scheduler_info()["workers"])
    trials = expand_trials(SweepSpec(base=base, grid={"train.seed": tuple(range(len(addresses)))}))
    request = SweepRequest(store=store, out_dir=out, trial=TrialSettings(labels=(), eval_split=None), device=device)
    futures = [client.submit(trial_task, trial, request, workers=[address], allow_other_workers=False, pure=False)
               for trial, address in zip(trials, addresses)]
    failed = [record for record in client.gather(futures) if record.state != DONE]
    if failed:
        raise click.ClickException(f"a warm-up trial failed: {failed[0].reason}")


def peak_gb(device: str) -> str:
    """The peak device memory of the last `time_sweep` in this process, in GB; "-" off CUDA."""
    return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f}" if device.startswith("cuda") else "-"


def worker_counts(ctx, param, text: str) -> tuple[int, ...]:
    """ "1,2" -> (1, 2); "" -> () (no cluster runs)."""
    if not text:
        return ()
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError as e:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of worker counts") from e
    if min(counts) < 1:
        raise click.BadParameter(f"worker counts must be >= 1, got {text!r}")
    return counts


@click.command()
@click.option("--device", default="cpu", show_default=True)
@click.option("--images", default=400, show_default=True, help="Rows of the synthetic store.")
@click.option("--tokens", default=16, show_default=True, help="Image tokens per row (P).")
@click.option("--token-dim", default=64, show_default=True, help="Width of an image token (D).")
@click.option("--trials", default=4, show_default=True, help="Trials of the sweep (seeds 0..N-1).")
@click.option("--concurrency", default=2, show_default=True, help="Trials run at once on the device.")
@click.option("--fuse-max", default=16, show_default=True,
              help="Also time the N trials fused, at most this many per fused model (1: skip that row).")
@click.option("--steps", default=60, show_default=True, help="Training steps per trial.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--full-adapter", is_flag=True, help="The default adapter (d_model 768, K 16) instead of a small one.")
@click.option("--workers-list", default="", callback=worker_counts,
              help="Also run the N trials on a dask LocalCluster of W workers, for each W of this list (e.g. 1,2).")
def main(device, images, tokens, token_dim, trials, concurrency, fuse_max, steps, batch_size, full_adapter,
         workers_list):
    base = (*(() if full_adapter else SMALL_ADAPTER), f"train.max_steps={steps}", f"train.batch_size={batch_size}",
            f"train.eval_every={steps}", "train.log_every=20")
    warm_up_base = (*base, "train.max_steps=5", "train.eval_every=5")
    clusters = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store.zarr"
        write_store(store, images, tokens, token_dim, tars=4)
        # Untimed: imports, allocator and kernel warm-up would otherwise be charged to the first timing.
        time_sweep(store, Path(tmp) / "warm-up", 1, 1, warm_up_base, device)
        single = time_sweep(store, Path(tmp) / "one", 1, 1, base, device)
        rows = [(1, 1, 1, single, peak_gb(device))]
        many = time_sweep(store, Path(tmp) / "many", trials, concurrency, base, device)
        rows.append((trials, concurrency, 1, many, peak_gb(device)))
        if fuse_max > 1:  # keyed dropout masks and stacked weights: the peak grows with the trials fused
            fused = time_sweep(store, Path(tmp) / "fused", trials, 1, base, device, fuse_max=fuse_max)
            rows.append((trials, 1, fuse_max, fused, peak_gb(device)))
        if workers_list:
            warm_up_store = Path(tmp) / "warm-up.zarr"
            write_store(warm_up_store, WARM_UP_IMAGES, tokens, token_dim, tars=2, seed=1)
            clusters = [time_on_cluster(store, warm_up_store, Path(tmp) / f"cluster-{w}", w, trials, base,
                                        warm_up_base, device) for w in workers_list]
    adapter = "default (d_model 768, K 16)" if full_adapter else "small (d_model 64, K 4)"
    click.echo(f"# {device}; adapter {adapter}; store {images} x {tokens} x {token_dim} fp16; "
               f"{steps} steps of batch {batch_size} per trial")
    click.echo(f"{'trials':>7} {'concurrency':>12} {'fuse max':>9} {'wall s':>9} {'s/trial':>9} {'trials/min':>11} "
               f"{'peak GB':>8} {'vs 1 trial':>11}")
    for n, c, f, seconds, peak in rows:
        click.echo(f"{n:>7} {c:>12} {f:>9} {seconds:>9.1f} {seconds / n:>9.2f} {60 * n / seconds:>11.1f} "
                   f"{peak:>8} {seconds / single:>10.2f}x")
    if clusters:
        print_cluster_table(clusters, trials)


def print_cluster_table(clusters: list[ClusterTiming], trials: int) -> None:
    """One row per cluster: trials per minute and its ratio to the first cluster's."""
    threads = sorted(frozenset().union(*(c.threads for c in clusters)))
    click.echo(f"# {trials} trials on a dask LocalCluster of W workers (one trial per worker at a time); "
               f"torch threads: this process {torch.get_num_threads()}, each worker {','.join(str(n) for n in threads)}")
    click.echo(f"{'workers':>7} {'start s':>8} {'wall s':>9} {'trials/min':>11} {f'vs W={clusters[0].workers}':>9}")
    reference = trials / clusters[0].sweep_s
    for cluster in clusters:
        rate = trials / cluster.sweep_s
        click.echo(f"{cluster.workers:>7} {cluster.start_s:>8.1f} {cluster.sweep_s:>9.1f} {60 * rate:>11.1f} "
                   f"{rate / reference:>8.2f}x")


if __name__ == "__main__":
    main()
