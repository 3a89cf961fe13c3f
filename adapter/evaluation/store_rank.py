"""Ranking a whole token store from its cached features: no image is decoded and no image tower runs.

`rank_store` scores every valid row of a store (labelled or not) for one or more queries with a
checkpoint of the store's backbone, and combines the queries as `rankpipe rank --images` does
(adapter/evaluation/ranking.py), so the two agree on the same images to fp16 rounding.

- Queries: a sentence the checkpoint was trained on uses the checkpoint's text tokens; any other is
  encoded by the text tower of the store's backbone, built alone (pipeline/embed/text_tower.py) and
  only when such a sentence is asked for.
- Scale: each tar's rows are a block. Blocks are read piece by piece in the background
  (adapter/evaluation/store_blocks.py) within a memory budget, scored in batches on the device, and
  each finished block's scores are written to the run's score folder (score_folder.py). With a dask
  client the blocks are tasks on its workers instead; either way a rerun with the same arguments
  skips the blocks already written. The blocks are then merged (store_merge.py) into every image's
  row, or only the two ends of the order when no ranking file is asked for.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from rankpipe.adapter.evaluation.rank import RankConfig, query_texts
from rankpipe.adapter.evaluation.ranking import Ranking
from rankpipe.adapter.evaluation.score_folder import open_score_folder, run_id
from rankpipe.adapter.evaluation.scoring import check_compatible, load_checkpoint
from rankpipe.adapter.evaluation.store_blocks import piece_rows
from rankpipe.adapter.evaluation.store_merge import merge_blocks
from rankpipe.adapter.evaluation.store_scoring import BlockJob, QuerySpec, score_block_task, score_blocks
from rankpipe.devices import default_device, torch_device_for
from rankpipe.errors import InputError
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.embed.text_tower import TextTower, load_recorded_text_tower
from rankpipe.pipeline.embed.weights import file_sha256
from rankpipe.pipeline.store import TokenStore

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StoreReadConfig:
    """How `rank_store` reads the store and what it keeps."""

    # Megabytes of cached features held in memory at once (three pieces: scored, waiting, being read).
    memory_mb: float = 1024.0
    # Without `full`: the images kept at each end of the order (the printed table and contact sheets).
    keep: int = 20
    # Keep every image (for a ranking file) instead of only both ends of the order.
    full: bool = False
    # The run's score folder; None = "<store>.rank-<run id>" beside the store.
    work_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.memory_mb > 0 or self.keep < 1:
            raise InputError(f"need --memory-mb > 0 and --top >= 1, got {self.memory_mb} and {self.keep}")


@dataclasses.dataclass(frozen=True)
class StoreRanking:
    """What `rank_store` returns."""

    # Every ranked image (config.full), or the kept ends of the order with their ranks among all.
    ranking: Ranking
    # Images ranked, and samples of the store's tars that hold no image.
    ranked: int
    invalid: int
    # Blocks (tars) scored in this run, and blocks whose scores an earlier run had written.
    blocks_scored: int
    blocks_reused: int
    # Images scored in this run, and the seconds their blocks took (reading and scoring, on the
    # workers too); the rest of a run (checkpoint, text tower, merge) is a fixed cost.
    images_scored: int = 0
    score_seconds: float = 0.0

    @property
    def score_rate(self) -> float:
        """Images per second of the scoring part of the run (0 when nothing was scored)."""
        return self.images_scored / self.score_seconds if self.score_seconds > 0 else 0.0


def rank_store(
    checkpoint: str | Path,
    store_path: str | Path,
    config: RankConfig,
    read: StoreReadConfig = StoreReadConfig(),
    device: str | None = None,
    backbone_weights: str | Path | None = None,
    client=None,
    progress: bool = False,
) -> StoreRanking:
    """Rank every valid image of a token store by one or more queries, from its cached features.

    Args:
        checkpoint: a checkpoint .pt written by `rankpipe train`, or its run folder (best.pt).
        store_path: a finished token store embedded with the checkpoint's backbone.
        config: queries, weights, combination rule and images per forward pass (`workers` is unused).
        read: memory budget, what to keep, and where block scores go.
        device: where the ranker runs ("cpu", "cuda[:i]"); None = the GPU when there is one. With
            `client`, the kind of device each worker uses.
        backbone_weights: the backbone's weights file, when a sentence the checkpoint was not trained on
            needs the text tower and the provenance names a file or an unavailable tag.
        client: a dask `distributed.Client` whose workers score the blocks; None scores them here.
        progress: show a progress bar (images/s).

    Raises:
        InputError: a missing or unfinished store, a checkpoint of another backbone, bad queries, a
            memory budget too small for three images, a work folder of another run, or no valid image.
    """
    # With a client the device is the workers' (checked there), not this machine's.
    torch_device = torch_device_for(default_device(device)) if client is None else _device_kind(default_device(device))
    store = TokenStore.open(store_path)
    # With a client the ranker runs on the workers; here it only resolves the queries.
    loaded = load_checkpoint(checkpoint, torch_device if client is None else "cpu")
    check_compatible(loaded.provenance, store, f"checkpoint {loaded.path}")
    tower = _LazyTextTower(store, backbone_weights)
    queries = query_texts(loaded, tower.encode_text, config.queries)
    rows = piece_rows(store, loaded.ranker.reads, read.memory_mb)
    valid = store.valid()  # [N]
    if not valid.any():
        raise InputError(f"store {store.path} has no valid image to rank; its image/error array says why")
    run = _run_record(store, loaded.path, config, rows, torch_device.type)
    folder = open_score_folder(read.work_dir or _default_work_dir(store.path, run), run)
    done = folder.finished()
    pending = [b for b in range(len(store.blocks)) if b not in done]
    if done:
        log.info("%d of %d blocks were scored by an earlier run; scoring the other %d", len(done), len(store.blocks),
                 len(pending))
    images = sum(int(valid[b.row_start:b.row_start + b.count].sum()) for b in (store.blocks[i] for i in pending))
    start = time.perf_counter()
    with tqdm(total=images, unit="img", disable=not progress, desc="rank", dynamic_ncols=True) as bar:
        if client is None:
            score_blocks(store, loaded.ranker, queries, pending, rows, config.batch_size, torch_device, folder, bar.update)
        else:
            job = BlockJob(store.path.resolve(), loaded.path.resolve(), torch_device.type,
                           tuple(QuerySpec.of(q) for q in queries), rows, config.batch_size, folder.path.resolve())
            _score_on_cluster(client, job, pending, bar)
    seconds = time.perf_counter() - start
    ranking, ranked, invalid = merge_blocks(store, folder, queries, config.query_weights, config.combine,
                                            keep=None if read.full else read.keep)
    shutil.rmtree(folder.path)
    return StoreRanking(ranking, ranked, invalid, len(pending), len(done), images, seconds)


def _score_on_cluster(client, job: BlockJob, pending: list[int], bar: tqdm) -> None:
    """One dask task per pending block; the bar moves by each finished block's images."""
    import distributed

    futures = [client.submit(score_block_task, job, b, key=f"rankpipe-rank-{job.folder.name}-{b}", pure=False, retries=2)
               for b in pending]
    for future in distributed.as_completed(futures):
        bar.update(future.result())


def _device_kind(device: str) -> torch.device:
    """The device a --device value names, without asking whether this machine has it."""
    try:
        kind = torch.device(device)
    except RuntimeError as e:
        raise InputError(f"unknown device {device!r}; use cpu or cuda") from e
    if kind.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported; use cpu or cuda")
    return kind


def _run_record(store: TokenStore, checkpoint: Path, config: RankConfig, rows: int, device: str) -> dict:
    """Everything that decides a run's block scores (its score folder is named by the record's hash)."""
    return {
        "store": str(store.path.resolve()),
        "tars": [[block.url, block.count] for block in store.blocks],
        "provenance": store.provenance,
        "checkpoint": str(checkpoint.resolve()),
        "checkpoint_sha256": file_sha256(checkpoint),
        "queries": list(config.queries),
        "batch_size": config.batch_size,
        "piece_rows": rows,
        "device": device,
    }


def _default_work_dir(store_path: Path, run: dict) -> Path:
    return store_path.parent / f"{store_path.name}.rank-{run_id(run)}"


class _LazyTextTower:
    """The text tower of the store's backbone, built on the first sentence that needs it (on the CPU)."""

    def __init__(self, store: TokenStore, backbone_weights: str | Path | None) -> None:
        self.store = store
        self.backbone_weights = backbone_weights
        self.tower: TextTower | None = None

    def encode_text(self, sentence: str) -> TextFeatures:
        if self.tower is None:
            self.tower = load_recorded_text_tower(self.store.provenance, torch.device("cpu"), self.backbone_weights,
                                                  f"store {self.store.path}")
        return self.tower.encode_text(sentence)

