"""One sweep trial in its folder: train, evaluate the best checkpoint, record the outcome.

A trial's folder, SWEEP/trial-<id>/, holds

    config.json    the trial's overrides and fully resolved run config (written first)
    best.pt, last.pt, history.jsonl    the training run (rankpipe train's outputs)
    results.json, results.md           `rankpipe eval` of best.pt on the evaluation split
    metrics.json   validation SRCC of best.pt and its evaluation metrics (point values)
    status.json    {"state": "running" | "done" | "failed", "reason": ...}  (written last)

A trial whose status is "done" is finished and never run again. Any other folder is unfinished: a
rerun continues its training from last.pt, if one was written, and evaluates again. A trial that
raised (a non-finite loss, out of memory, anything else) is "failed" with its reason; it is retried
only when asked, since most failures repeat.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rankpipe.adapter.evaluation.evaluate import EvalConfig, evaluate, write_results
from rankpipe.adapter.evaluation.metrics import MetricConfig
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.adapter.experiments.sweep.spec import Trial
from rankpipe.adapter.training.checkpoint import LAST
from rankpipe.adapter.training.loop import TrainResult, train_adapter
from rankpipe.adapter.training.streaming import TrainingFeatures
from rankpipe.files import write_text_atomic
from rankpipe.pipeline.labelled_store import LabelledStore

log = logging.getLogger(__name__)

CONFIG, METRICS_FILE, STATUS = "config.json", "metrics.json", "status.json"
DONE, FAILED, RUNNING, PENDING = "done", "failed", "running", "pending"


@dataclasses.dataclass(frozen=True)
class TrialSettings:
    """How every trial of a sweep is trained and evaluated (the parts that are not the run config)."""

    # Labels (queries) to train together; empty = every label of the store.
    labels: tuple[str, ...] = ()
    # Split role the best checkpoint is evaluated on; None skips the evaluation.
    eval_split: str | None = "test"
    # Bootstrap resamples for the evaluation's intervals (0: point values only, the fastest).
    bootstrap: int = 0


@dataclasses.dataclass(frozen=True)
class TrialRecord:
    """What is known about a trial, read from its folder."""

    # The trial's id and folder.
    id: str
    folder: Path
    # DONE, FAILED, RUNNING (unfinished, maybe interrupted) or PENDING (no folder yet).
    state: str
    # Why it failed (FAILED only).
    reason: str | None = None
    # Metrics of a finished trial: metrics.json as plain data (see `trial_metrics`).
    metrics: dict[str, Any] | None = None

    @property
    def mean_val_srcc(self) -> float:
        value = (self.metrics or {}).get("mean_val_srcc")
        return math.nan if value is None else float(value)


def trial_folder(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / f"trial-{trial_id}"


def read_record(folder: Path, trial_id: str) -> TrialRecord:
    """The state of a trial's folder (PENDING when it has no status yet)."""
    status_path = folder / STATUS
    if not status_path.is_file():
        return TrialRecord(trial_id, folder, PENDING)
    status = json.loads(status_path.read_text())
    metrics = json.loads((folder / METRICS_FILE).read_text()) if status["state"] == DONE else None
    return TrialRecord(trial_id, folder, status["state"], status.get("reason"), metrics)


def run_trial(
    trial: Trial,
    sweep_dir: str | Path,
    features: TrainingFeatures,
    data: LabelledStore,
    settings: TrialSettings,
    device: str | torch.device = "cpu",
) -> TrialRecord:
    """Train and evaluate one trial in its folder, unless it is already done; never raises for a failed trial.

    Args:
        trial: the trial (its id names the folder).
        sweep_dir: the sweep's folder.
        features: the training features: resident ones may be shared by concurrent trials (only read);
            streamed ones belong to this trial.
        data: the labelled store the features came from (its provenance goes into checkpoints; its
            manifest gives the split roles and targets to evaluate with).
        settings: labels and evaluation settings.
        device: where to train and evaluate.

    Returns:
        The trial's record: DONE with metrics, or FAILED with the reason.
    """
    folder = trial_folder(sweep_dir, trial.id)
    done = begin_trial(trial, folder)
    if done is not None:
        return done
    try:
        result = train_adapter(features, folder, trial.config, data.provenance, device, resume=(folder / LAST).is_file(),
                               splits=data.manifest.splits, store_identity=data.identity,
                               val_from_train=data.val_share)
    except Exception as e:  # recorded by finish_trial; the sweep goes on
        result = e
    return finish_trial(trial, folder, result, data, settings, device)


def begin_trial(trial: Trial, folder: Path) -> TrialRecord | None:
    """The record of a trial that is already done, or None after marking its folder as running."""
    record = read_record(folder, trial.id)
    if record.state == DONE:
        return record
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(folder, trial)
    _write_status(folder, RUNNING)
    return None


def finish_trial(
    trial: Trial,
    folder: Path,
    trained: TrainResult | BaseException,
    data: LabelledStore,
    settings: TrialSettings,
    device: str | torch.device,
) -> TrialRecord:
    """Evaluate a trained trial and record it as done, or record why it failed; never raises for a failed trial.

    Args:
        trained: how its training ended: the result, or the exception that stopped it.
        Others: as for run_trial.
    """
    evaluating = time.monotonic()
    try:
        if isinstance(trained, BaseException):
            raise trained
        result = trained
        metrics = {
            "best_step": result.best_step,
            "steps": result.steps,
            "val_srcc": {name: _json_float(value) for name, value in result.best_srcc.items()},
            "mean_val_srcc": _json_float(result.best_mean_srcc),
            "eval_split": settings.eval_split,
            "eval": {},
        }
        if settings.eval_split is not None:
            loaded = load_checkpoint(result.best_path, device)
            config = EvalConfig(split=settings.eval_split, labels=settings.labels,
                                metrics=MetricConfig(bootstrap=settings.bootstrap),
                                batch_size=trial.config.train.eval_batch_size)
            results = evaluate(loaded, data.store, config, data.manifest)
            write_results(results, folder)
            metrics["eval"] = trial_metrics(results)
        # Its own training (in a fused unit, until its run ended) and its own evaluation.
        metrics["seconds"] = round(result.seconds + time.monotonic() - evaluating, 3)
        _write_json(folder / METRICS_FILE, metrics)
        _write_status(folder, DONE)
        log.info("trial %s done: mean val SRCC %s", trial.id, metrics["mean_val_srcc"])
        return TrialRecord(trial.id, folder, DONE, None, json.loads((folder / METRICS_FILE).read_text()))
    except Exception as e:  # any failure of one trial is recorded; the sweep goes on
        reason = failure_reason(e)
        if isinstance(e, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        log.info("trial %s failed: %s", trial.id, reason)
        _write_status(folder, FAILED, reason)
        return TrialRecord(trial.id, folder, FAILED, reason)


def trial_metrics(results) -> dict[str, dict[str, float | None]]:
    """{label: {metric: point value}} of an EvalResults (NaN as None)."""
    return {
        q.label: {name: _json_float(e.value) for name, e in q.metrics.estimates.items()}
        for q in results.queries
    }


def failure_reason(error: BaseException) -> str:
    """One line naming the kind of failure and its message."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        kind = "out of memory"
    else:
        kind = type(error).__name__
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{kind}: {message}" if message else kind


def mark_failed(sweep_dir: str | Path, trial: Trial, reason: str) -> TrialRecord:
    """Record a trial as failed from outside it (e.g. the worker running it was lost too often)."""
    folder = trial_folder(sweep_dir, trial.id)
    folder.mkdir(parents=True, exist_ok=True)
    _write_config(folder, trial)
    _write_status(folder, FAILED, reason)
    return TrialRecord(trial.id, folder, FAILED, reason)


def _write_config(folder: Path, trial: Trial) -> None:
    path = folder / CONFIG
    record = {"id": trial.id, "overrides": list(trial.overrides), "values": trial.values,
              "run_config": trial.config.to_dict()}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved["run_config"] != record["run_config"]:
            raise RuntimeError(f"{path} holds another run config than trial {trial.id}; the trial id hash collided")
        return
    _write_json(path, record)


def _write_status(folder: Path, state: str, reason: str | None = None) -> None:
    _write_json(folder / STATUS, {"state": state, "reason": reason, "host": socket.gethostname(),
                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    write_text_atomic(path, json.dumps(data, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _json_float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
