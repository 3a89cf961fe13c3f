"""Training the ranking adapter from cached tokens: the loop, validation, checkpoints, resume.

One step draws a query (see features.BatchSampler), gathers a batch of its training images from the
resident token tensor (or from the current window of a streamed store, see adapter/training/streaming.py), and
takes an AdamW step on the regression + pairwise loss. Loss values stay on
the device between reports: every `train.log_every` steps they are read once, together with a
device-side record of the first non-finite step, so the loop has no other host syncs. Each step's
loss parts and rows go into preallocated device buffers (see _LossMonitor) and batches are gathered
with index_select, so the loop adds a few small copies to the step and allocates nothing of its own.
Dropout masks are keyed by (seed, step) and the dropout's site (adapter/model/dropout.py), not drawn
from the process's generator: a resumed run, or one trained fused with others, draws the same masks.

Every `train.eval_every` steps (and at the last) the val split is scored, SRCC per query is computed
with scipy, and OUT/last.pt (resumable), OUT/best.pt (best mean val SRCC) and a line of
OUT/history.jsonl are written.

With `train.compile` the step's forward pass and loss run through torch.compile (the optimiser step
stays eager). The compiled function closes over the plain module, so validation and checkpoints are
those of an eager run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.adapter.model.adapter import RankingAdapter, score_batches
from rankpipe.adapter.model.config import LossConfig
from rankpipe.adapter.model.dropout import StepKeys
from rankpipe.adapter.model.losses import LossParts, ranking_loss
from rankpipe.adapter.training.checkpoint import (
    BEST,
    LAST,
    CheckpointWriter,
    load_resume_state,
    refuse_existing_run,
    rng_state,
    set_rng_state,
)
from rankpipe.adapter.training.features import BatchSampler, TrainBatch
from rankpipe.adapter.training.optimizer import make_optimizer
from rankpipe.adapter.training.run_config import OptimConfig, RunConfig
from rankpipe.adapter.training.sampling import refuse_non_counts, refuse_single_label
from rankpipe.adapter.training.streaming import TrainingFeatures, open_features
from rankpipe.devices import autocast
from rankpipe.errors import InputError
from rankpipe.files import exclusive_output
from rankpipe.pipeline.data.manifest import Manifest, SplitSpec
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
_INIT_LOCK = threading.Lock()
LOSS_PARTS = ("total", "regression", "pairwise")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the batch and the last good checkpoint."""


@dataclasses.dataclass(frozen=True)
class TrainEvent:
    """What the loop reports to its caller every `log_every` steps and after every validation."""

    # Optimiser steps done.
    step: int
    # Steps of the whole run.
    max_steps: int
    # Learning rate of the last step.
    lr: float
    # Mean loss parts (total, regression, pairwise) since the previous report.
    loss: dict[str, float]
    # Validation SRCC per query when this event follows a validation, else None.
    val_srcc: dict[str, float] | None
    # The latest validation's mean SRCC (NaN before the first).
    latest_mean_srcc: float


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """How a run ended."""

    # Optimiser steps done.
    steps: int
    # Step of the best checkpoint.
    best_step: int
    # Validation SRCC per query of the best checkpoint.
    best_srcc: dict[str, float]
    # Their mean.
    best_mean_srcc: float
    # OUT/best.pt.
    best_path: Path
    # OUT/last.pt.
    last_path: Path
    # Wall-clock seconds this process trained the run: from its first step here to its last, validations
    # and checkpoints included (a fused run's own share ends when it does).
    seconds: float


def train_from_store(
    store: TokenStore,
    out_dir: str | Path,
    run_config: RunConfig,
    labels: list[str] | None = None,
    manifest: Manifest | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: Callable[[TrainEvent], None] | None = None,
) -> TrainResult:
    """Train an adapter on a TokenStore's cached tokens.

    Args:
        store: an open TokenStore.
        out_dir: where best.pt, last.pt and history.jsonl go.
        run_config: the full run configuration.
        labels: the queries to train together; None = every label of the store.
        manifest: overrides the store's split roles and target transforms (same labels and queries).
        device: "cpu" or "cuda[:i]".
        resume: continue the run in out_dir from its last.pt.
        progress: called with a TrainEvent at every report.

    Raises:
        InputError: an unknown label, a manifest that does not match the store, a row block too large
            for a streaming window of `train.max_resident_gb`, or a resume that does not match the saved run.
        TrainingDiverged: the loss became non-finite.
    """
    data = LabelledStore.open(store, manifest, labels or ())
    if run_config.train.negative_share > 0:
        refuse_non_counts(data)
    device = torch.device(device)
    features = open_features(data, device, run_config.train)
    return train_adapter(features, out_dir, run_config, data.provenance, device, resume, progress,
                         splits=data.manifest.splits, store_identity=data.identity, val_from_train=data.val_share)


def train_adapter(
    features: TrainingFeatures,
    out_dir: str | Path,
    run_config: RunConfig,
    provenance: dict,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress: Callable[[TrainEvent], None] | None = None,
    splits: SplitSpec | None = None,
    store_identity: str | None = None,
    val_from_train: float = 0.0,
) -> TrainResult:
    """Train an adapter on resident or streamed features (see train_from_store for the arguments).

    `splits`, the split roles the features were drawn with, `store_identity`, the identity of the
    store they came from (LabelledStore.identity), and `val_from_train`, the share of training images
    that validated (a store without a val split), are recorded in the checkpoints; a resumed run must
    come from a store of the same identity.
    """
    out_dir = Path(out_dir)
    with exclusive_output(out_dir, "rankpipe train"):  # a second run into this folder is refused meanwhile
        existed = out_dir.exists()
        try:
            return _train_adapter(features, out_dir, run_config, provenance, device, resume, progress, splits,
                                  store_identity, val_from_train)
        except BaseException:
            if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()  # a run that failed before writing anything leaves no empty folder behind
            raise


def _train_adapter(
    features: TrainingFeatures,
    out_dir: str | Path,
    run_config: RunConfig,
    provenance: dict,
    device: str | torch.device,
    resume: bool,
    progress: Callable[[TrainEvent], None] | None,
    splits: SplitSpec | None,
    store_identity: str | None,
    val_from_train: float,
) -> TrainResult:
    run = TrainingRun(features, out_dir, run_config, provenance, device, resume, progress, splits, store_identity,
                      val_from_train)
    mode = compile_mode(run_config.train.compile, run.device)
    step_loss = make_step_loss(run.model, run_config.loss, run.device, mode)
    pad = BatchPadder(run_config.train.batch_size, run.device) if mode is not None else None
    if mode is not None and len({q.text_tokens.shape[0] for q in features.queries}) > 1:
        # One graph for every query: the text length is symbolic from the first compilation on.
        for query in features.queries:
            torch._dynamo.mark_dynamic(query.text_tokens, 0)
    while not run.finished:
        batch = run.begin_step()  # [B, P, D] fp16 tokens of one query's images
        if mode == "reduce-overhead":
            # CUDA-graph replays reuse their output buffers: this step's overwrites the previous
            # step's loss parts, which the loss monitor has copied; nothing else keeps them.
            torch.compiler.cudagraph_mark_step_begin()
        text_tokens = features.queries[batch.query_index].text_tokens
        if pad is None:
            parts = step_loss(batch.image_tokens, text_tokens, batch.targets, None, run.dropout_key)
        else:  # compiled: every batch has train.batch_size rows, so one graph serves them all
            image_tokens, targets, valid = pad(batch.image_tokens, batch.targets)
            parts = step_loss(image_tokens, text_tokens, targets, valid, run.dropout_key)
        parts.total.backward()
        run.end_step(parts, batch)
    return run.result()


class TrainingRun:
    """One run's model, optimiser, schedule, sampler and bookkeeping: everything of a step but its forward
    and backward pass, which the caller does between `begin_step` and `end_step` (the fused trainer of
    adapter/training/fused.py does it for several runs at once).

    Raises (constructor): InputError for a resume that does not match the saved run or a folder that
    holds another run.
    """

    def __init__(
        self,
        features: TrainingFeatures,
        out_dir: str | Path,
        cfg: RunConfig,
        provenance: dict,
        device: str | torch.device,
        resume: bool,
        progress: Callable[[TrainEvent], None] | None = None,
        splits: SplitSpec | None = None,
        store_identity: str | None = None,
        val_from_train: float = 0.0,
    ):
        out_dir = Path(out_dir)
        device = torch.device(device)
        self.features, self.out_dir, self.cfg, self.device, self.progress = features, out_dir, cfg, device, progress
        labels = [q.name for q in features.queries]
        if cfg.train.negative_share > 0:
            refuse_single_label(len(labels))
        saved = load_resume_state(out_dir / LAST, cfg, labels, provenance, device, store_identity) if resume else None
        if saved is None and (out_dir / LAST).exists():
            raise InputError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        # An adapter's best.pt without last.pt is a first run killed early: it starts again.
        refuse_existing_run(out_dir, allowed=ADAPTER_METHOD)
        out_dir.mkdir(parents=True, exist_ok=True)

        # Seeding and initialising read the process-wide generator; runs in concurrent threads take turns.
        with _INIT_LOCK:
            torch.manual_seed(cfg.train.seed)
            model = RankingAdapter(cfg.adapter, features.image_token_dim, features.text_token_dim)
            # The generator state this run starts from, which last.pt records: training draws nothing
            # from the process's generator (dropout masks are keyed), so it is also the state at every
            # step, whatever other runs of the process draw meanwhile.
            self.start_rng = rng_state(device) if saved is None else saved["rng"]
        self.dropout_keys = StepKeys(cfg.train.seed, cfg.train.max_steps, device)
        self.model = model.to(device)
        self.model.train()
        self.optimizer = make_optimizer(self.model, cfg.optim)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_factor(cfg.optim, cfg.train.max_steps))
        self.sampler = BatchSampler(features.train_sizes, cfg.train.batch_size, cfg.train.seed, device,
                                    cfg.train.sampling, cfg.train.negative_share)
        self.step, self.best, self.val_srcc = 0, None, {}
        if saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
            self.sampler.load_state_dict(saved["sampler"])
            with _INIT_LOCK:
                set_rng_state(saved["rng"], device)
            self.step, self.best, self.val_srcc = int(saved["step"]), saved["best"], saved["val_srcc"]
            _truncate_history(out_dir / HISTORY, self.step)
            log.info("resumed %s at step %d", out_dir, self.step)

        self.writer = CheckpointWriter(out_dir, cfg, features, provenance, device, splits=splits,
                                       store_identity=store_identity, val_from_train=val_from_train)
        # A report comes every log_every steps, at every eval and at the last step (see end_step), so
        # no more steps than this are ever buffered between two.
        steps_between_reports = min(cfg.train.log_every, cfg.train.eval_every, cfg.train.max_steps)
        self.monitor = _LossMonitor(device, cfg.train.batch_size, steps_between_reports)
        self.latest_mean = _mean(self.val_srcc)
        self.started = time.monotonic()

    @property
    def finished(self) -> bool:
        return self.step >= self.cfg.train.max_steps

    @property
    def dropout_key(self) -> torch.Tensor:
        """int64 [2], on the device: the key of the current step's dropout masks (after begin_step)."""
        return self.dropout_keys[self.step]

    def begin_step(self, batch: TrainBatch | None = None) -> TrainBatch:
        """Count the step, clear the gradients and return its batch (drawn here unless given)."""
        self.step += 1
        if batch is None:
            batch = self.features.train_batch(self.step, self.sampler)
        # Before the forward pass: the previous step's gradients may live in CUDA-graph memory.
        self.optimizer.zero_grad(set_to_none=True)
        return batch

    def end_step(self, parts: LossParts, batch: TrainBatch) -> None:
        """After the backward pass: clip, step the optimiser and the schedule, and report when due.

        Raises:
            TrainingDiverged: a report found a non-finite loss.
        """
        cfg, step = self.cfg, self.step
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.monitor.update(step, parts, batch.rows, batch.query_index)  # copies the loss parts

        is_eval = step % cfg.train.eval_every == 0 or self.finished
        if step % cfg.train.log_every == 0 or is_eval:
            self.monitor.raise_if_diverged(self.features, self.writer.last_good)
            loss = self.monitor.pop_means()
            new_srcc = self._validate_and_save(step, loss) if is_eval else None
            if self.progress is not None:
                self.progress(TrainEvent(step, cfg.train.max_steps, self.scheduler.get_last_lr()[0], loss, new_srcc,
                                         self.latest_mean))

    def _validate_and_save(self, step: int, loss: dict[str, float]) -> dict[str, float]:
        new_srcc = validate(self.model, self.features, self.cfg.train.eval_batch_size, self.device)
        self.val_srcc, self.latest_mean = new_srcc, _mean(new_srcc)
        if self.best is None or _better(self.latest_mean, self.best["mean_srcc"]):
            self.best = {"step": step, "mean_srcc": self.latest_mean, "srcc": dict(new_srcc)}
            self.writer.save_best(self.model, step, new_srcc, self.best)
        self.writer.save_last(self.model, step, new_srcc, self.best, self.optimizer, self.scheduler, self.sampler,
                              rng=self.start_rng)
        _append_history(
            self.out_dir / HISTORY,
            {
                "step": step, "lr": self.scheduler.get_last_lr()[0], "loss": loss, "val_srcc": new_srcc,
                "mean_val_srcc": self.latest_mean, "best_step": self.best["step"],
                "seconds": round(time.monotonic() - self.started, 3),
            },
        )
        log.info("step %d: val SRCC %s (mean %.4f)", step, new_srcc, self.latest_mean)
        return new_srcc

    def result(self) -> TrainResult:
        """How the finished run ended; called when it ends, which dates its `seconds`."""
        best = self.best
        if best is None:
            raise InputError(f"{self.out_dir}/{LAST} records no validation; the run has no best checkpoint to report")
        return TrainResult(
            steps=self.step, best_step=best["step"], best_srcc=dict(best["srcc"]), best_mean_srcc=best["mean_srcc"],
            best_path=self.out_dir / BEST, last_path=self.out_dir / LAST,
            seconds=round(time.monotonic() - self.started, 3),
        )


def validate(model: RankingAdapter, features: TrainingFeatures, batch_size: int, device: torch.device) -> dict[str, float]:
    """Spearman correlation between the adapter's scores and the targets of each query's val images."""
    out = {}
    for index, query in enumerate(features.queries):
        scores = score_batches(model, query.text_tokens, features.val_batches(index, batch_size), device)
        out[query.name] = spearman(scores, query.val_targets)
    return out


def spearman(prediction: np.ndarray, target: np.ndarray) -> float:
    """scipy's Spearman correlation; NaN (without a warning) when either side is constant or non-finite."""
    if not (np.isfinite(prediction).all() and np.isfinite(target).all()):
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return float(scipy.stats.spearmanr(prediction, target).statistic)


def compile_mode(setting: str, device: torch.device) -> str | None:
    """The torch.compile mode that `train.compile` asks for on `device`; None trains eagerly.

    "reduce-overhead" replays CUDA graphs; on another device it compiles as "default" (logged).
    """
    if setting == "off":
        return None
    if setting == "reduce-overhead" and device.type != "cuda":
        log.info("train.compile=reduce-overhead: %s has no CUDA graphs; compiling with mode 'default'", device.type)
        return "default"
    return setting


def make_step_loss(
    model: RankingAdapter, loss_cfg: LossConfig, device: torch.device, mode: str | None
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], LossParts]:
    """Forward pass and loss of one step: image tokens [B, P, D], text tokens [L, Dt], targets [B],
    which rows count, valid [B] bool (None: all; see BatchPadder), and the step's dropout key, int64 [2].

    Compiled with `mode` unless it is None. The pairwise branch's chunking fixes the batch size, so the
    compiled loop pads every batch to `train.batch_size` (BatchPadder) and marks the text length
    dynamic when queries' lengths differ: one graph serves the whole run.
    """

    def loss_of(image_tokens: torch.Tensor, text_tokens: torch.Tensor, targets: torch.Tensor,
                valid: torch.Tensor | None, dropout_key: torch.Tensor) -> LossParts:
        with autocast(device):
            output = model(image_tokens, text_tokens, with_pairs=True, dropout_key=dropout_key)
        return ranking_loss(output, targets, loss_cfg, valid)

    return loss_of if mode is None else _compile(loss_of, mode)


class BatchPadder:
    """Pads a batch of fewer than `size` images (a query with fewer training images than the batch
    size) to `size` rows by repeating its rows, with a mask that leaves them out of the loss.

    Every image is scored independently and the loss reads only pairs and rows of valid images, so the
    padding changes neither the loss nor the gradients; a compiled step then sees one batch shape.
    """

    def __init__(self, size: int, device: torch.device):
        self.size = size
        self.all_valid = torch.ones(size, dtype=torch.bool, device=device)  # [size], shared by full batches
        self.positions = torch.arange(size, device=device)  # [size]

    def __call__(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image tokens [size, P, D], targets [size], valid [size]) of a batch of b <= size rows."""
        b = image_tokens.shape[0]
        if b == self.size:
            return image_tokens, targets, self.all_valid
        cycle = self.positions % b  # [size]: 0..b-1, 0..b-1, ...
        return image_tokens.index_select(0, cycle), targets.index_select(0, cycle), self.positions < b


def _compile(fn: Callable, mode: str) -> Callable:
    """torch.compile with Inductor; a separate function so tests can swap in a faster backend."""
    return torch.compile(fn, mode=mode)


def _lr_factor(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak lr after `done` steps: linear warm-up, then cosine down to min_lr_ratio."""

    def factor(done: int) -> float:
        if done < optim.warmup_steps:
            return (done + 1) / optim.warmup_steps
        progress = min(1.0, (done - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _LossMonitor:
    """Each step's loss parts and rows, kept on the device until a report reads them.

    A step costs two small copies into preallocated buffers (no host sync, no allocation); a report
    finds the first non-finite step and the mean of the finite ones over the buffered steps at once.
    `steps` is the most steps between two reports: that many rows are enough.
    """

    def __init__(self, device: torch.device, batch_size: int, steps: int):
        self.values = torch.zeros(steps, len(LOSS_PARTS), device=device)  # [S, 3] loss parts of each step
        self.rows = torch.full((steps, batch_size), -1, dtype=torch.int64, device=device)  # [S, B], -1 padded
        self.steps: list[int] = []  # the buffered steps
        self.queries: list[int] = []  # their query indices

    def update(self, step: int, parts: LossParts, rows: torch.Tensor, query_index: int) -> None:
        slot = len(self.steps)
        torch.stack([parts.total.detach(), parts.regression.detach(), parts.pairwise.detach()], out=self.values[slot])
        self.rows[slot, : rows.shape[0]] = rows
        if rows.shape[0] < self.rows.shape[1]:  # a query with fewer training images than the batch size
            self.rows[slot, rows.shape[0]:] = -1
        self.steps.append(step)
        self.queries.append(query_index)

    def raise_if_diverged(self, features: TrainingFeatures, last_good: str) -> None:
        count = len(self.steps)
        finite = torch.isfinite(self.values[:count]).all(dim=1)  # [S]
        first_bad = int(torch.where(finite, count, torch.arange(count, device=finite.device)).min()) if count else 0
        if first_bad >= count:
            return
        rows = self.rows[first_bad].cpu().numpy()
        keys = [str(k) for k in features.keys[rows[rows >= 0]]]
        query = features.queries[self.queries[first_bad]].name
        raise TrainingDiverged(
            f"the loss became non-finite at step {self.steps[first_bad]} (label {query!r}, batch keys: "
            f"{', '.join(keys)}); training stopped, {last_good}. Lower optim.lr or check these images' features."
        )

    def pop_means(self) -> dict[str, float]:
        values = self.values[: len(self.steps)]  # [S, 3]
        finite = torch.isfinite(values).all(dim=1, keepdim=True)  # [S, 1]
        sums = torch.where(finite, values, torch.zeros_like(values)).sum(dim=0)  # [3] sums of finite steps
        means = (sums / max(1, len(self.steps))).tolist()
        self.steps.clear()
        self.queries.clear()
        return dict(zip(LOSS_PARTS, means))


def _mean(srcc: dict[str, float]) -> float:
    values = [v for v in srcc.values() if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def _better(new: float, old: float) -> bool:
    """Whether mean SRCC `new` beats `old`; any finite value beats NaN."""
    if not math.isfinite(new):
        return False
    return not math.isfinite(old) or new > old


def _append_history(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_history(path: Path, step: int) -> None:
    """Drop history lines written after `step` (by a run interrupted after its last checkpoint)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))
