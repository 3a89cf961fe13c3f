"""The checkpoint file: what it holds, and writing and reading it safely.

A checkpoint is `torch.save` of a dict holding only tensors, plain dicts/lists, strings and numbers,
so it opens with `torch.load(path, weights_only=True)` — no pickled code runs. Keys:

    rankpipe_checkpoint  format version (1)
    method               "adapter" (absent in older files, meaning the same); a baseline's checkpoint
                         names its method and has the keys listed in adapter/baselines/fit.py
    kind                 "best" (weights only) or "last" (also optimiser, scheduler and RNG state)
    step                 optimiser steps done
    model                the adapter's state_dict
    dims                 {image_token_dim, text_token_dim} to rebuild the adapter
    run_config           the RunConfig as a JSON string
    provenance           the token store's provenance (the frozen backbone the features came from, and
                         what the store caches: resize mode, views, token normalisation; docs/store.md)
    splits               {train, val, test: [split values]} the run's split roles (absent in older files
                         and in runs trained from features without a manifest)
    labels               [{name, query, text_tokens [L, Dt] fp16, text_tokens_shape, target}]
                         target = the TargetScale as plain data (transform and train mean/std)
    val_srcc             {label: SRCC} at `step`;  best  {step, mean_srcc, srcc} of the run so far
    device_type          "cpu" or "cuda": the device whose RNG state is saved
    optimizer, scheduler, sampler, rng   (last only) what `--resume` needs to continue the same run; the
                         process RNG state is restored too, though training draws nothing from it
                         now (dropout masks are keyed by seed and step), so files keep one format

Writes go to a temporary file in the same folder that is then renamed over the target, so a crash
never leaves a half-written checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.training.features import BatchSampler
from rankpipe.adapter.training.run_config import RunConfig
from rankpipe.adapter.training.streaming import TrainingFeatures
from rankpipe.errors import InputError
from rankpipe.files import atomic_target
from rankpipe.pipeline.data.manifest import SPLIT_ROLES, SplitSpec
from rankpipe.pipeline.embed.backbone import BACKBONE_FIELDS, compatibility_problem
from rankpipe.pipeline.embed.cache_choices import TRAINING_FIELDS, describe, first_difference

FORMAT_VERSION = 1
BEST, LAST = "best.pt", "last.pt"


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """Write `payload` to `path` atomically (temporary file + rename); returns the path."""
    path = Path(path)
    with atomic_target(path) as partial:
        torch.save(payload, partial)
    return path


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`.

    Raises:
        InputError: the file is missing or is not a rankpipe checkpoint of a known format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; pass a .pt file written by `rankpipe train`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types, with pages of advice, for foreign or corrupt files
        raise InputError(
            f"{path} is not a readable rankpipe checkpoint ({type(e).__name__}); pass a .pt file written by `rankpipe train`"
        ) from e
    if not isinstance(payload, dict) or "rankpipe_checkpoint" not in payload:
        raise InputError(f"{path} is not a rankpipe checkpoint; pass a .pt file written by `rankpipe train`")
    if payload["rankpipe_checkpoint"] != FORMAT_VERSION:
        raise InputError(
            f"{path} has checkpoint format {payload['rankpipe_checkpoint']}, this rankpipe reads {FORMAT_VERSION}"
        )
    return payload


def checkpoint_method(payload: dict[str, Any]) -> str:
    """The method a checkpoint was trained with: "adapter" or a baseline's name."""
    return str(payload.get("method", ADAPTER_METHOD))


def saved_run_config(path: str | Path) -> RunConfig:
    """The run config stored in an adapter checkpoint (the base of a resumed run).

    Raises:
        InputError: the checkpoint is a baseline's, which has no run config and cannot be resumed.
    """
    payload = read_checkpoint(path)
    if checkpoint_method(payload) != ADAPTER_METHOD:
        raise InputError(f"{path} holds a {checkpoint_method(payload)} baseline, not an adapter run; train into another --out")
    return RunConfig.from_json(payload["run_config"])


def run_method(out_dir: str | Path) -> str | None:
    """The method of the run folder `out_dir` already holds ("adapter" or a baseline's name), or None.

    Raises:
        InputError: the folder holds a best.pt that is not a readable checkpoint.
    """
    out_dir = Path(out_dir)
    if (out_dir / LAST).exists():
        return ADAPTER_METHOD
    if not (out_dir / BEST).exists():
        return None
    return checkpoint_method(read_checkpoint(out_dir / BEST))


def refuse_existing_run(out_dir: str | Path, allowed: str | None = None) -> None:
    """Refuse to start a run in `out_dir` when it already holds one, unless of method `allowed`.

    Raises:
        InputError: naming what the folder holds.
    """
    held = run_method(out_dir)
    if held is not None and held != allowed:
        what = "an adapter run" if held == ADAPTER_METHOD else f"a {held} baseline"
        raise InputError(f"{out_dir} already holds {what}; choose another --out")


class CheckpointWriter:
    """Builds and writes a run's best.pt and last.pt in the format above."""

    def __init__(
        self, out_dir: Path, cfg: RunConfig, features: TrainingFeatures, provenance: dict, device: torch.device,
        splits: SplitSpec | None = None, store_identity: str | None = None, val_from_train: float = 0.0,
    ):
        self.out_dir = out_dir
        self.common = {
            "rankpipe_checkpoint": FORMAT_VERSION,
            "method": ADAPTER_METHOD,
            "dims": {"image_token_dim": features.image_token_dim, "text_token_dim": features.text_token_dim},
            "run_config": cfg.to_json(),
            "provenance": provenance,
            "labels": [
                {
                    "name": q.name,
                    "query": q.query,
                    "text_tokens": q.text_tokens.detach().to("cpu", torch.float16),
                    "text_tokens_shape": list(q.text_tokens.shape),
                    "target": q.scale.to_dict(),
                }
                for q in features.queries
            ],
            "device_type": device.type,
        }
        if store_identity is not None:  # a resumed run must read the same store (LabelledStore.identity)
            self.common["store_identity"] = store_identity
        if val_from_train:  # the store had no val split: this share of the train split validated
            self.common["val_from_train"] = val_from_train
        if splits is not None:  # lets `rankpipe eval` find each fold's own test split
            self.common["splits"] = {role: list(splits.values(role)) for role in SPLIT_ROLES}
        last = out_dir / LAST
        self.last_good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"

    def _payload(self, kind: str, model: RankingAdapter, step: int, val_srcc: dict, best: dict) -> dict:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {**self.common, "kind": kind, "step": step, "model": weights, "val_srcc": dict(val_srcc), "best": best}

    def save_best(self, model: RankingAdapter, step: int, val_srcc: dict, best: dict) -> None:
        save_checkpoint(self._payload("best", model, step, val_srcc, best), self.out_dir / BEST)

    def save_last(
        self,
        model: RankingAdapter,
        step: int,
        val_srcc: dict,
        best: dict,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        sampler: BatchSampler,
        rng: dict,
    ) -> None:
        """Write last.pt; `rng` is the generator state to resume with (`rng_state`'s form)."""
        payload = self._payload("last", model, step, val_srcc, best)
        payload.update(
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            sampler=sampler.state_dict(),
            rng=rng,
        )
        save_checkpoint(payload, self.out_dir / LAST)
        self.last_good = f"the last good checkpoint is {self.out_dir / LAST} (step {step})"


def load_resume_state(path: Path, cfg: RunConfig, labels: list[str], provenance: dict, device: torch.device,
                      store_identity: str | None = None) -> dict:
    """The last.pt of a run to continue, after checking that this run matches it.

    Raises:
        InputError: missing file, another backbone or cache choice (resize, views, token
            normalisation), other labels, a changed setting (other than
            train.max_steps) or another device type.
    """
    if not path.exists():
        raise InputError(f"--resume: {path} does not exist; start the run without --resume")
    saved = read_checkpoint(path)
    problem = compatibility_problem(saved["provenance"], provenance, BACKBONE_FIELDS)
    difference = first_difference(saved["provenance"], provenance, TRAINING_FIELDS)
    if problem is None and difference is not None:
        field, trained, theirs = difference
        raise InputError(f"--resume: {path} was trained on a store embedded with {describe(field, trained)}, but this "
                         f"run's store was embedded with {describe(field, theirs)}; resume with the store it was "
                         "trained on, or start a new run in another --out")
    problem = problem or compatibility_problem(saved["provenance"], provenance)
    if problem is not None:
        raise InputError(f"--resume: {path} was trained on features of another backbone ({problem}); use its store")
    recorded = saved.get("store_identity")
    if recorded is not None and store_identity is not None and recorded != store_identity:
        raise InputError(f"--resume: {path} was trained on another store (same backbone, other images, labels or "
                         "splits), and its target normalisation belongs to that one; resume with its store")
    saved_labels = [entry["name"] for entry in saved["labels"]]
    if saved_labels != labels:
        raise InputError(f"--resume: {path} trains labels {saved_labels}, this run {labels}; pass the same --label")
    changed = [f for f in RunConfig.from_json(saved["run_config"]).differences(cfg) if f != "train.max_steps"]
    if changed:
        raise InputError(f"--resume: the run config differs from {path} in {', '.join(changed)}; resume with the same settings")
    if saved["device_type"] != device.type:
        raise InputError(f"--resume: {path} was trained on {saved['device_type']}; resume it with --device {saved['device_type']}")
    return saved


def rng_state(device: torch.device) -> dict:
    """The global torch RNG states (CPU, and the CUDA device's); a run records them as its initialisation
    left them (training draws nothing from them: its dropout masks are keyed, adapter/model/dropout.py)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
