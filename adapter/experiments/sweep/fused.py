"""Sweep trials of the same shapes trained as one fused model (see rankpipe.adapter.training.fused).

The runner splits the pending trials into work units: trials of one fusion key, up to `fuse_max` at a
time, train together; a trial with no partner, or one that cannot fuse (train.compile, pair_checkpoint),
trains alone as before. Each fused trial is evaluated and recorded in its own folder
exactly as a solo trial is; a trial whose fused pass failed as a whole (e.g. out of memory with that
many trials at once) continues alone from its last.pt.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from rankpipe.adapter.experiments.sweep.spec import Trial
from rankpipe.adapter.experiments.sweep.trial import (
    TrialRecord,
    TrialSettings,
    begin_trial,
    finish_trial,
    run_trial,
    trial_folder,
)
from rankpipe.adapter.training.checkpoint import LAST
from rankpipe.adapter.training.features import ResidentFeatures
from rankpipe.adapter.training.fused import FusedJob, fusion_key, train_fused
from rankpipe.pipeline.labelled_store import LabelledStore


def work_units(trials: Sequence[Trial], fuse_max: int) -> list[list[Trial]]:
    """The trials in groups that train together: same fusion key, at most `fuse_max` each (1: every trial
    alone), in the order of their first trial."""
    groups: dict[object, list[list[Trial]]] = {}
    units: list[list[Trial]] = []
    for index, trial in enumerate(trials):
        key = fusion_key(trial.config) if fuse_max > 1 else None
        open_units = groups.setdefault(key if key is not None else ("alone", index), [])
        if not open_units or len(open_units[-1]) >= fuse_max:
            open_units.append([])
            units.append(open_units[-1])
        open_units[-1].append(trial)
    return units


def run_unit(unit: Sequence[Trial], sweep_dir: str | Path, features: ResidentFeatures, data: LabelledStore,
             settings: TrialSettings, device: str | torch.device) -> list[TrialRecord]:
    """Train and evaluate one work unit's trials (fused when there are several); their records, in order."""
    if len(unit) == 1:
        return [run_trial(unit[0], sweep_dir, features, data, settings, device)]
    records: dict[str, TrialRecord] = {}
    to_train = []
    for trial in unit:
        done = begin_trial(trial, trial_folder(sweep_dir, trial.id))
        if done is not None:
            records[trial.id] = done
        else:
            to_train.append(trial)
    folders = [trial_folder(sweep_dir, trial.id) for trial in to_train]
    outcomes = train_fused(
        features, [FusedJob(folder, trial.config, (folder / LAST).is_file()) for trial, folder in zip(to_train, folders)],
        data.provenance, device, splits=data.manifest.splits, store_identity=data.identity,
        val_from_train=data.val_share,
    ) if to_train else []
    for trial, folder, outcome in zip(to_train, folders, outcomes):
        if outcome is None:  # the fused pass failed as a whole: the trial continues alone
            records[trial.id] = run_trial(trial, sweep_dir, features, data, settings, device)
        else:
            records[trial.id] = finish_trial(trial, folder, outcome, data, settings, device)
    return [records[trial.id] for trial in unit]
