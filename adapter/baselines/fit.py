"""Fitting a baseline on a token store and writing its checkpoint (`rankpipe train --method NAME`).

A baseline checkpoint is a rankpipe checkpoint (adapter/training/checkpoint.py) with these keys:

    rankpipe_checkpoint  format version
    method               the registered method name
    kind                 "best" (baselines are fitted once; there is no last.pt to resume)
    step                 0
    method_config        the method's settings as a JSON string
    provenance           the token store's provenance
    labels               [{name, query, target}]: target = the TargetScale as plain data
    model                the baseline's per-label parameters (tensors, numbers, strings, lists)
    val_srcc, best       validation SRCC per label, and {step, mean_srcc, srcc}
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

from rankpipe.adapter.baselines import get_method
from rankpipe.adapter.baselines.base import Baseline
from rankpipe.adapter.baselines.data import LabelSplits, load_label_splits
from rankpipe.adapter.baselines.prompts import PromptEncoder
from rankpipe.adapter.training.checkpoint import BEST, FORMAT_VERSION, refuse_existing_run, save_checkpoint
from rankpipe.errors import InputError
from rankpipe.files import exclusive_output
from rankpipe.pipeline.data.manifest import SPLIT_ROLES, Manifest
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore
from rankpipe.settings import (
    field_names,
    instantiate_config,
    merge_settings,
    split_assignment,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaselineResult:
    """What fitting a baseline produced."""

    # The method name.
    method: str
    # Validation SRCC per label.
    val_srcc: dict[str, float]
    # Their mean over finite values (NaN when none is).
    mean_srcc: float
    # OUT/best.pt.
    path: Path


def method_config(cls: type[Baseline], overrides: Sequence[str] = ()) -> Any:
    """The method's settings: its defaults, then `FIELD=VALUE` overrides converted to the fields' types.

    Raises:
        InputError: an override not of the form FIELD=VALUE, an unknown field or a bad value.
    """
    where = f"{cls.name} settings"
    data: dict[str, Any] = {}
    form = f"FIELD=VALUE for method {cls.name} (fields: {', '.join(field_names(cls.config_class))})"
    for item in overrides:
        field, value = split_assignment(item, form)
        if "." in field:
            raise InputError(f"--set {item!r} is not of the form {form}")
        data = merge_settings(cls.config_class, data, {field: value}, "--set", prefix="")
    return instantiate_config(cls.config_class, data, where, prefix="")


def train_baseline(
    store: TokenStore,
    out_dir: str | Path,
    method: str,
    overrides: Sequence[str] = (),
    labels: Sequence[str] | None = None,
    manifest: Manifest | None = None,
    device: str | torch.device = "cpu",
    backbone_weights: str | Path | None = None,
) -> BaselineResult:
    """Fit baseline `method` on a TokenStore's pooled embeddings and write OUT/best.pt.

    Args:
        store: an open TokenStore.
        out_dir: the run folder.
        method: a registered baseline name.
        overrides: `FIELD=VALUE` settings of the method.
        labels: the labels to fit; None = every label of the store.
        manifest: overrides the store's split roles and target transforms (same labels and queries).
        device: where the text tower runs for prompt-based methods.
        backbone_weights: the backbone's weights file when its provenance needs one (see recorded_backbone).

    Raises:
        InputError: an unknown method, label or setting, too few train/val images, or backbone weights
            that cannot be loaded.
    """
    cls = get_method(method)
    config = method_config(cls, overrides)
    labelled = LabelledStore.open(store, manifest, labels or ())  # checked before anything is written
    manifest = labelled.manifest
    # A fit never replaces a run's best.pt: the folder's other files would no longer match it. The lock
    # keeps a second job from starting in the folder between this check and the write.
    with exclusive_output(out_dir, f"rankpipe train --method {method}"):
        refuse_existing_run(out_dir)
        data = load_label_splits(labelled)
        prompts = PromptEncoder(store.provenance, device, backbone_weights, f"store {store.path}")
        baseline = cls.fit(config, data, prompts)
        val_srcc = {split.name: validation_srcc(baseline, split) for split in data}
        finite = [v for v in val_srcc.values() if math.isfinite(v)]
        mean = float(np.mean(finite)) if finite else math.nan
        payload = {
            "rankpipe_checkpoint": FORMAT_VERSION,
            "method": method,
            "kind": "best",
            "step": 0,
            "method_config": baseline.config_json(),
            "provenance": store.provenance,
            "labels": [{"name": s.name, "query": s.query, "target": s.scale.to_dict()} for s in data],
            "model": baseline.state(),
            "val_srcc": val_srcc,
            "best": {"step": 0, "mean_srcc": mean, "srcc": dict(val_srcc)},
            # The split roles it was fitted with, as adapter checkpoints record them (for k-fold eval).
            "splits": {role: list(manifest.splits.values(role)) for role in SPLIT_ROLES},
        }
        if labelled.val_share:  # the store had no val split: this share of the train split validated
            payload["val_from_train"] = labelled.val_share
        path = save_checkpoint(payload, Path(out_dir) / BEST)
        return BaselineResult(method, val_srcc, mean, path)


def validation_srcc(baseline: Baseline, split: LabelSplits) -> float:
    """Spearman correlation of the baseline's val predictions with the val targets (NaN if undefined)."""
    pred = baseline.predict(split.name, split.val_embed)
    with np.errstate(invalid="ignore"):
        return float(scipy.stats.spearmanr(pred, split.val_targets).statistic)

