"""Running a sweep's trials: concurrently on this machine's device, or as tasks on a dask cluster.

Locally, the store's features are read onto the device once and every trial trains from that one
resident copy. Trials of the same shapes (see adapter/training/fused.py) train as one fused model, up
to `fuse_max` at a time: one forward and backward pass per step for all of them. The work units —
fused groups and trials alone — run `concurrency` at a time in threads, each with its own models and
optimisers (and, on a GPU, its own CUDA stream), so small adapters keep the device busy together. A store whose
train and val tokens exceed `train.max_resident_gb` is streamed instead, as `rankpipe train` streams
it: each trial reads its own windows, and trials run one at a time so that only one trial's windows
are in memory.

On a dask cluster each trial is one task (`client.submit`, `pure=False`, `retries=`). A worker opens
the store itself — it must be reachable at the same path from every worker — and keeps the features
it loaded for the next trial it runs. The scheduler re-runs the tasks of a worker that died on
another worker; a trial whose worker was lost too often (dask's KilledWorker) is recorded as failed.
A trial already done is never submitted, and a retried task finds a finished trial's status and
returns it without training.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from rankpipe.adapter.evaluation.evaluate import split_rows
from rankpipe.adapter.experiments.sweep.fused import run_unit, work_units
from rankpipe.adapter.experiments.sweep.results import write_results_table
from rankpipe.adapter.experiments.sweep.spec import Trial
from rankpipe.adapter.experiments.sweep.trial import (
    DONE,
    FAILED,
    TrialRecord,
    TrialSettings,
    mark_failed,
    read_record,
    run_trial,
    trial_folder,
)
from rankpipe.adapter.training.features import (
    ResidentFeatures,
    load_features,
    train_val_gigabytes,
)
from rankpipe.adapter.training.sampling import refuse_non_counts
from rankpipe.adapter.training.streaming import open_features
from rankpipe.errors import InputError
from rankpipe.files import exclusive_output, write_text_atomic
from rankpipe.pipeline.cluster import ClusterSpec, open_client
from rankpipe.pipeline.data.manifest import Manifest
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

log = logging.getLogger(__name__)

TRIALS_FILE = "trials.json"


@dataclasses.dataclass(frozen=True)
class SweepRequest:
    """Where a sweep reads and writes, and how its trials run."""

    # Token store folder; with a cluster, a path every worker can read.
    store: Path
    # Sweep folder: one trial-<id>/ per trial, results.csv, results.md, trials.json.
    out_dir: Path
    # Manifest overriding the store's split roles and targets (same labels and queries); None = the store's.
    manifest: Manifest | None = None
    # Labels, evaluation split and bootstrap of every trial.
    trial: TrialSettings = TrialSettings()
    # "cpu" or "cuda"; on a cluster, "cuda" means each worker's own (pinned) GPU.
    device: str = "cpu"
    # Trials trained at once on this machine (local runs only; a cluster runs one per worker thread).
    concurrency: int = 1
    # Run trials recorded as failed again (by default a failure is final, since most failures repeat).
    retry_failed: bool = False
    # Times dask reruns a trial task that raised on a worker (a worker's death is retried by the scheduler).
    retries: int = 2
    # Most trials of the same shapes trained as one fused model (local runs of resident features; see
    # adapter/experiments/sweep/fused.py); 1 trains every trial alone.
    fuse_max: int = 16

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise InputError(f"--concurrency must be >= 1, not {self.concurrency}")
        if self.retries < 0:
            raise InputError(f"retries must be >= 0, not {self.retries}")
        if self.fuse_max < 1:
            raise InputError(f"--fuse-max must be >= 1, not {self.fuse_max}")


@dataclasses.dataclass(frozen=True)
class SweepOutcome:
    """What a sweep run did and where the table is."""

    # Every trial's record, in the sweep's order.
    records: list[TrialRecord]
    # Trials trained (or retried) in this run, and trials skipped because they were done or failed.
    ran: int
    skipped: int
    # results.csv, results.md and the markdown table.
    csv_path: Path
    md_path: Path
    table: str


def run_sweep(
    trials: Sequence[Trial],
    request: SweepRequest,
    varied: Sequence[str] = (),
    client=None,
    cluster: ClusterSpec | None = None,
    progress: Callable[[TrialRecord], None] | None = None,
) -> SweepOutcome:
    """Run every unfinished trial, then write the results table.

    Args:
        trials: the trials (from `expand_trials`).
        request: store, sweep folder and execution settings.
        varied: the fields that differ between trials (columns of the table).
        client: a dask `distributed.Client` to run the trials on.
        cluster: a cluster to start (or connect to) only if some trial is left to run; with neither
            `client` nor `cluster` the trials run here.
        progress: called with each trial's record when it finishes in this run.

    Raises:
        InputError: a missing store, an unknown label, a manifest that does not match the store, an empty
            evaluation split, or features too large for the device (local runs).
    """
    if not trials:
        raise InputError("the sweep has no trials; give a grid: or random: section")
    data = LabelledStore.open(TokenStore.open(request.store), request.manifest, request.trial.labels)
    if request.trial.eval_split is not None:
        split_rows(data.store, request.trial.eval_split, data.manifest.splits)
    if any(t.config.train.negative_share > 0 for t in trials):
        # Refused before any trial runs: a label that is not a count is the sweep's mistake, not a trial's.
        refuse_non_counts(data)
    # One sweep at a time per folder (trials on dask workers lock their own trial folders).
    with exclusive_output(request.out_dir, "rankpipe sweep"):
        out_dir = Path(request.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / TRIALS_FILE, json.dumps(
            [{"id": t.id, "overrides": list(t.overrides), "folder": trial_folder(out_dir, t.id).name} for t in trials],
            indent=2) + "\n")

        records = {t.id: read_record(trial_folder(out_dir, t.id), t.id) for t in trials}
        pending = [t for t in trials if records[t.id].state != DONE and (request.retry_failed or records[t.id].state != FAILED)]
        log.info("%d trials: %d to run, %d done or failed", len(trials), len(pending), len(trials) - len(pending))
        if pending:
            if client is not None:
                finished = _run_on_cluster(pending, request, client, progress)
            elif cluster is not None:
                with open_client(cluster, request.device) as started:
                    finished = _run_on_cluster(pending, request, started, progress)
            else:
                finished = _run_here(pending, request, data, progress)
            records.update({record.id: record for record in finished})
        ordered = [records[t.id] for t in trials]
        values = {t.id: t.values for t in trials}
        csv_path, md_path, table = write_results_table(out_dir, ordered, values, list(varied))
        return SweepOutcome(ordered, len(pending), len(trials) - len(pending), csv_path, md_path, table)


def _run_here(pending: Sequence[Trial], request: SweepRequest, data: LabelledStore,
              progress: Callable[[TrialRecord], None] | None) -> list[TrialRecord]:
    """Trials on this machine's device from one resident copy of the features, `concurrency` at a time."""
    device = torch.device(request.device)
    max_gb = max(t.config.train.max_resident_gb for t in pending)
    if train_val_gigabytes(data) > max_gb:
        return _run_streamed_here(pending, request, data, progress)
    features = load_features(data, device, max_gb)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the features are read on other streams from here on

    def one(unit: list[Trial]) -> list[TrialRecord]:
        with _own_stream(device):
            records = run_unit(unit, request.out_dir, features, data, request.trial, device)
        if progress is not None:
            for record in records:
                progress(record)
        return records

    units = work_units(pending, request.fuse_max)
    if request.concurrency == 1 or len(units) == 1:
        return [record for unit in units for record in one(unit)]
    with concurrent.futures.ThreadPoolExecutor(min(request.concurrency, len(units)), thread_name_prefix="trial") as pool:
        return [record for records in pool.map(one, units) for record in records]


def _run_streamed_here(pending: Sequence[Trial], request: SweepRequest, data: LabelledStore,
                       progress: Callable[[TrialRecord], None] | None) -> list[TrialRecord]:
    """Trials of a store larger than their memory budget, one at a time, each streaming its own windows."""
    if request.concurrency > 1:
        log.warning("the store's train and val tokens exceed train.max_resident_gb: trials stream it one at a "
                     "time (--concurrency %d would hold one set of windows per trial in memory)", request.concurrency)
    device = torch.device(request.device)
    records = []
    for trial in pending:
        record = _run_on_own_features(trial, request, data, device)
        if progress is not None:
            progress(record)
        records.append(record)
    return records


def _run_on_own_features(trial: Trial, request: SweepRequest, data: LabelledStore, device: torch.device) -> TrialRecord:
    """Run a trial on features of its own (resident or streamed, by its budget); it fails when its budget
    cannot hold a training window (the budget may be a swept field)."""
    try:
        features = open_features(data, device, trial.config.train)
    except InputError as e:
        return mark_failed(request.out_dir, trial, f"InputError: {e}")
    return run_trial(trial, request.out_dir, features, data, request.trial, device)


@contextlib.contextmanager
def _own_stream(device: torch.device) -> Iterator[None]:
    """On CUDA, run the block on a new stream and wait for it at the end; elsewhere do nothing."""
    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        yield
    stream.synchronize()


def _run_on_cluster(pending: Sequence[Trial], request: SweepRequest, client,
                    progress: Callable[[TrialRecord], None] | None) -> list[TrialRecord]:
    """One dask task per trial; results are gathered as they finish."""
    import distributed

    run = uuid.uuid4().hex[:8]
    futures = {
        client.submit(trial_task, trial, request, key=f"rankpipe-trial-{trial.id}-{run}", pure=False,
                      retries=request.retries): trial
        for trial in pending
    }
    out = []
    for future in distributed.as_completed(futures):
        trial = futures[future]
        try:
            record = future.result()
        except Exception as e:  # the task could not run at all: e.g. its workers kept dying (KilledWorker)
            record = mark_failed(request.out_dir, trial, f"{type(e).__name__}: {e}")
        if progress is not None:
            progress(record)
        out.append(record)
    return out


# Features a worker process loaded, kept for its next trial: (store, manifest, labels, device) -> features.
_WORKER_FEATURES: dict[tuple, ResidentFeatures] = {}
_WORKER_LOCK = threading.Lock()


def trial_task(trial: Trial, request: SweepRequest) -> TrialRecord:
    """Run one trial on a dask worker: open the store, load (or reuse) the features, train, evaluate."""
    record = read_record(trial_folder(request.out_dir, trial.id), trial.id)
    if record.state == DONE:
        return record
    data = LabelledStore.open(TokenStore.open(request.store), request.manifest, request.trial.labels)
    device = torch.device(request.device)
    if train_val_gigabytes(data) > trial.config.train.max_resident_gb:
        # Streamed features are the trial's own (its windows follow its seed): nothing to keep.
        return _run_on_own_features(trial, request, data, device)
    key = (str(Path(request.store).resolve()), json.dumps(data.manifest.to_dict(), sort_keys=True), data.labels, str(device))
    with _WORKER_LOCK:
        features = _WORKER_FEATURES.get(key)
        if features is None:
            _WORKER_FEATURES.clear()  # one feature set per worker: a new store replaces the old one
            features = load_features(data, device, trial.config.train.max_resident_gb)
            _WORKER_FEATURES[key] = features
    return run_trial(trial, request.out_dir, features, data, request.trial, device)
