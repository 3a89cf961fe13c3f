"""The embed job on a dask cluster: one task per input tar, all writing into one store.

One task first creates (or reopens) the store on a worker, as `embed` would: the store's layout, its
text features and its provenance come from the backbone, so they are made where the tar tasks run,
on the same kind of device. Then each unfinished tar is one task calling `embed_tar`. A tar owns
whole Zarr shards in every array (docs/store.md), so workers never write the same file, and its
`done` flag is written last: a task retried after its worker died rewrites the tar's block whole,
and a tar already done is skipped. Each worker loads the backbone once and keeps it for its next tars.

The result equals a single-process `embed` byte for byte on the CPU (both embed a tar in the same
batches; see tests/test_distributed_embed.py). Every worker must see the tars and the store at the
same paths (one machine, or a shared filesystem).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.files import exclusive_output
from rankpipe.pipeline.data.manifest import Manifest
from rankpipe.pipeline.embed.backbone import Backbone, BackboneSpec, load_backbone
from rankpipe.pipeline.embed.job import (
    MODES,
    EmbedSummary,
    embed_tar,
    input_tars,
    open_or_create_store,
    plan_for_backbone,
    refuse_unusable,
    torch_device_for,
)
from rankpipe.pipeline.store import StoreConfig, TokenStore

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TarJob:
    """What a worker needs to embed one tar: everything but the tar's index."""

    # The store folder (absolute; the same path on every worker).
    store: Path
    # The frozen CLIP to run.
    backbone: BackboneSpec
    # "cpu" or "cuda" (a worker's own, pinned GPU).
    device: str
    # Images per forward pass; the same as a single-process run's for identical bytes.
    batch_size: int
    # Also embed every image mirrored left to right (the store's views).
    flip_view: bool = False


def embed_distributed(manifest: Manifest, store_path: str | Path, backbone_spec: BackboneSpec, client,
                      device: str = "cpu", batch_size: int = 256, mode: str = "incremental",
                      compress: bool = False, store_config: StoreConfig | None = None, retries: int = 2,
                      progress: Callable[[int, int], None] | None = None, flip_view: bool = False) -> EmbedSummary:
    """Embed every tar of the manifest into the store on the workers of a dask cluster.

    Args:
        manifest: the dataset (tars, labels and their queries).
        store_path: the Zarr store folder; every worker must reach it at this path.
        backbone_spec: which frozen CLIP to run.
        client: a `distributed.Client`.
        device: "cpu" or "cuda" (each worker uses its own visible GPU).
        batch_size: images per forward pass.
        mode: "incremental" resumes a compatible store; "overwrite" replaces it.
        compress: zstd-compress the arrays of a new store.
        store_config: chunk and shard sizes (defaults to StoreConfig(compress=compress)).
        retries: times dask reruns a tar task that raised (a dead worker's tasks are rescheduled by dask).
        progress: called with (tars finished, tars to embed) after each tar.
        flip_view: also embed every image mirrored left to right, as `embed` does.

    Returns:
        What was embedded, summed over the tar tasks.

    Raises:
        InputError: bad arguments, unreadable inputs, or a store made from other inputs (incremental).
    """
    import distributed

    start = time.perf_counter()
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if batch_size < 1:
        raise InputError(f"need batch size >= 1, got {batch_size}")
    config = store_config or StoreConfig(compress=compress)
    job = TarJob(Path(store_path).resolve(), backbone_spec, device, batch_size, flip_view)
    # The coordinator holds the store's lock for its workers: another embed into it is refused.
    with exclusive_output(job.store, "rankpipe embed (distributed)"):
        run = uuid.uuid4().hex[:8]
        prepare = client.submit(prepare_store, manifest, job, mode, config, key=f"rankpipe-embed-prepare-{run}",
                                pure=False, retries=retries)
        pending, total = prepare.result()
        summary = EmbedSummary(store=job.store, tars_skipped=total - len(pending))
        streaming = time.perf_counter()
        futures = [client.submit(embed_tar_task, job, t, key=f"rankpipe-embed-tar-{t}-{run}", pure=False, retries=retries)
                   for t in pending]
        for finished, future in enumerate(distributed.as_completed(futures), start=1):
            _add(summary, future.result())
            if progress is not None:
                progress(finished, len(pending))
        summary.embed_seconds = time.perf_counter() - streaming
        if pending:
            refuse_unusable(TokenStore.open(job.store))
        summary.seconds = time.perf_counter() - start
        logger.info(summary.line())
        return summary


def prepare_store(manifest: Manifest, job: TarJob, mode: str, config: StoreConfig) -> tuple[list[int], int]:
    """Create or reopen the store for the manifest's tars (a task); returns (unfinished tar indices, all tars)."""
    tars = input_tars(manifest)
    backbone = _worker_backbone(job)
    plan = plan_for_backbone(tars, backbone, config)
    store = open_or_create_store(job.store, mode, backbone, manifest, plan, config, job.flip_view)
    return [t for t, done in enumerate(store.done()) if not done], len(plan.tars)


def embed_tar_task(job: TarJob, t: int) -> EmbedSummary:
    """Embed tar `t` into the store (a task); a tar already done is skipped."""
    store = TokenStore.open(job.store, allow_incomplete=True, writable=True)
    if store.done()[t]:
        return EmbedSummary(store=job.store, tars_skipped=1)
    return embed_tar(store, t, _worker_backbone(job), batch_size=job.batch_size, workers=0)


# The backbone a worker process loaded, kept for its next tars: ((spec, device), backbone).
_BACKBONE: dict[tuple[BackboneSpec, str], Backbone] = {}
_BACKBONE_LOCK = threading.Lock()


def _worker_backbone(job: TarJob) -> Backbone:
    key = (job.backbone, job.device)
    with _BACKBONE_LOCK:
        if key not in _BACKBONE:
            _BACKBONE.clear()
            _BACKBONE[key] = load_backbone(job.backbone, torch_device_for(job.device))
        return _BACKBONE[key]


def _add(total: EmbedSummary, part: EmbedSummary) -> None:
    total.images_embedded += part.images_embedded
    total.invalid += part.invalid
    total.tars_embedded += part.tars_embedded
    total.tars_skipped += part.tars_skipped
    total.errors.update(part.errors)
