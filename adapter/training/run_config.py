"""The run configuration: everything one training run depends on, in four typed sections.

`adapter` and `loss` are the model's own dataclasses (rankpipe.adapter.model.config); `optim` and `train`
live here. A run config is built from defaults, then an optional YAML file (`--config`), then
`--set section.field=value` overrides. Values from either source are converted to the field's
declared type here, at the boundary; an unknown section or field, or a value of the wrong type, is an
InputError that names it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rankpipe.adapter.model.config import AdapterConfig, LossConfig
from rankpipe.errors import InputError
from rankpipe.settings import (
    field_names,
    instantiate_config,
    load_yaml,
    merge_settings,
    split_assignment,
)

# train.compile values: "off" trains eagerly; the others are torch.compile modes.
COMPILE_MODES = ("off", "default", "reduce-overhead")
# train.sampling values: how each step's query and images are drawn (see features.BatchSampler).
SAMPLINGS = ("proportional", "released")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a linear warm-up followed by a cosine decay."""

    # Peak learning rate (the released training command uses 5e-5).
    lr: float = 5e-5
    # AdamW decoupled weight decay.
    weight_decay: float = 0.01
    # Also decay biases, LayerNorm gains and other 1-D parameters. False (released code): only weight
    # matrices and token tables decay.
    decay_norms_and_biases: bool = False
    # AdamW's AMSGrad variant (the released code uses it): each step divides by the largest second
    # moment seen so far instead of the current one.
    amsgrad: bool = True
    # AdamW moment coefficients.
    betas: tuple[float, float] = (0.9, 0.999)
    # Steps of linear warm-up from 0 to `lr`; the cosine decay spans the remaining steps.
    warmup_steps: int = 500
    # Learning rate at the end of the cosine, as a fraction of `lr`.
    min_lr_ratio: float = 0.0
    # Clip the global gradient norm to this value; 0 turns clipping off, as released. Clipping at 1.0 is a
    # deliberate default, a guard against single bad batches (docs/fidelity.md says why).
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, not {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), not {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, not {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], not {self.min_lr_ratio}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, not {self.grad_clip}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How long to train, how batches are drawn, and how often to validate and checkpoint."""

    # Total optimiser steps of the run (also the length of the learning-rate schedule).
    max_steps: int = 10_000
    # Images per step; every batch holds images of one query. Capped by the query's training images.
    batch_size: int = 64
    # Seeds the adapter's initial weights, dropout and batch sampling.
    seed: int = 0
    # How each step's batch is drawn. "proportional": a query with probability proportional to its
    # training images, then a uniform subset of them, so every training image is seen equally often.
    # "released" (the released data loader): a query uniformly, then its images weighted by the inverse
    # frequency of their label value, so rare values (e.g. large counts) are seen as often as common ones.
    sampling: str = "proportional"
    # Share of each batch filled with training images of the other labels, given the target of a zero
    # label (the released loader mixes in 20% for counting). Only for labels that are counts, where an
    # image without the label holds none of the thing counted; needs 2+ labels trained together and
    # every training label a non-negative integer, and at least 2 of each batch's images left to the
    # label itself. 0 = off.
    negative_share: float = 0.0
    # Validate on the val split, write last.pt and maybe best.pt every this many steps (and at the end).
    eval_every: int = 500
    # Report the running loss (and check it is finite) every this many steps.
    log_every: int = 20
    # Images per forward pass during validation and prediction (no pairs are computed there).
    eval_batch_size: int = 256
    # Largest image-token cache, in GB, kept on the device. Training streams a store whose train/val
    # tokens exceed it, a window of whole row blocks at a time (see window_steps).
    max_resident_gb: float = 16.0
    # Steps trained on one window of a streamed store before the next (read in the background)
    # replaces it; the mean over an epoch, as each window's share follows its training images.
    window_steps: int = 500
    # torch.compile the forward pass and loss of each step (not the optimiser): "off" (eager),
    # "default" or "reduce-overhead" (also replays CUDA graphs, which cuts launch overhead on a GPU;
    # elsewhere it compiles as "default"). Validation and checkpoints use the plain module.
    compile: str = "off"

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "log_every", "eval_batch_size", "window_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (pairs need two images), not {self.batch_size}")
        if not 0 <= self.seed < 2**63:  # numpy's and torch's generators take non-negative 64-bit seeds
            raise ValueError(f"seed must be a non-negative integer below 2**63, not {self.seed}")
        if self.max_resident_gb <= 0:
            raise ValueError(f"max_resident_gb must be positive, not {self.max_resident_gb}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {self.compile!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {', '.join(SAMPLINGS)}, not {self.sampling!r}")
        if not 0 <= self.negative_share < 1:
            raise ValueError(f"negative_share must be in [0, 1), not {self.negative_share}")
        # The batch's own images, as BatchSampler.draw counts them: a pair needs two of them.
        own = int(self.batch_size * (1 - self.negative_share) + 1e-9)
        if self.negative_share > 0 and own < 2:
            raise ValueError(f"negative_share={self.negative_share} leaves {own} of batch_size={self.batch_size} "
                             "images to the label itself; lower negative_share or raise batch_size so at least 2 remain")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """All settings of a training run; saved as JSON inside every checkpoint."""

    # The adapter's architecture.
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig)
    # The regression + pairwise ranking loss.
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    # Optimiser and learning-rate schedule.
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    # Steps, batches, validation and memory budget.
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (tuples become lists)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """The config as a JSON string, the form stored in checkpoints."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "run config") -> RunConfig:
        """Build a config from plain data; missing fields keep their defaults.

        Raises:
            InputError: an unknown section or field, a value of the wrong type, or an invalid setting.
        """
        return instantiate_config(cls, merge_settings(cls, {}, data, where, prefix=""), where, prefix="")

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        """Inverse of `to_json`; a config saved before a field existed keeps the behaviour it was trained with."""
        return cls.from_saved(json.loads(text))

    @classmethod
    def from_saved(cls, data: Any, where: str = "checkpoint run config") -> RunConfig:
        """A config a checkpoint or metrics record saved as plain data, read as `from_json` reads its text."""
        return cls.from_dict(_saved_behaviour(data, where), where=where)

    def differences(self, other: RunConfig) -> list[str]:
        """Dotted names of the fields whose values differ between two configs."""
        return _diff(self.to_dict(), other.to_dict(), "")


# A small adapter for a tiny backbone (width 64, 16 tokens), trained with a larger learning rate: the
# settings of `rankpipe demo` and of `rankpipe bench --quick`, so either trains in seconds on a CPU.
# The number of relational tokens is left to the caller (the bench's k-variants set it).
SMALL_ADAPTER_OVERRIDES = (
    "adapter.d_model=64",
    "adapter.heads=4",
    "adapter.text_extra_tokens=8",
    "adapter.head_hidden=64",
    "optim.lr=1e-3",
    "optim.warmup_steps=30",
    "train.batch_size=32",
    "train.eval_every=50",
    "train.log_every=10",
)


def load_run_config(
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: RunConfig | None = None,
    overrides_from: str = "--set",
) -> RunConfig:
    """The run config from `base` (or the defaults), then a YAML file, then `--set` overrides.

    Settings are gathered as plain data and the dataclasses are built once at the end, so a field
    whose default depends on another (e.g. the loss's regression form on `loss.pairwise`) follows
    the final value of that field unless it was set itself.

    Args:
        config_path: YAML file with optional sections adapter, loss, optim, train.
        overrides: `section.field=value` strings, applied in order; values are converted to the field's type.
        base: the starting config (a resumed run's); None starts from the defaults.
        overrides_from: where the overrides came from, named in error messages.

    Raises:
        InputError: the file is missing or not YAML, or a section, field or value is wrong.
    """
    data: dict[str, Any] = merge_settings(RunConfig, {}, base.to_dict(), "base config", "") if base is not None else {}
    if config_path is not None:
        loaded = load_yaml(config_path, "config file", "pass the path of a YAML run config")
        data = merge_settings(RunConfig, data, loaded if loaded is not None else {}, str(config_path), prefix="")
    form = f"section.field=value (sections: {', '.join(field_names(RunConfig))})"
    for item in overrides:
        dotted, value = split_assignment(item, form, overrides_from)
        path_parts = dotted.split(".")
        if len(path_parts) < 2 or not all(path_parts):
            raise InputError(f"{overrides_from} {item!r} is not of the form {form}")
        update: Any = value
        for part in reversed(path_parts):
            update = {part: update}
        data = merge_settings(RunConfig, data, update, overrides_from, prefix="")
    return instantiate_config(RunConfig, data, "run config", prefix="")


# The regression pooling that concatenated the sum and the spread into one MLP, replaced by sum_spread.
REMOVED_POOLING = "sum_std"


def _saved_behaviour(data: Any, where: str) -> Any:
    """A checkpoint's config with the values that fields added later had implicitly when it was saved.

    Checkpoints store every field, so a missing one means the file predates it: its adapter had the
    paper's fusion blocks and one `dropout` for the whole encoder, and its optimiser decayed every
    parameter without AMSGrad. Without this, the new defaults would rebuild another architecture
    (whose weights do not load) or resume with another optimiser.

    Raises:
        InputError: the run used a regression pooling that no longer exists (`sum_std`, whose single
            MLP read the sum and the spread side by side; its weights fit no head of today's).
    """
    if not isinstance(data, dict):
        return data
    data = {**data}
    adapter = data.get("adapter")
    if isinstance(adapter, dict) and adapter.get("regression_pooling") == REMOVED_POOLING:
        raise InputError(f"{where} uses adapter.regression_pooling={REMOVED_POOLING}, a head rankpipe no longer has "
                         "(its weights fit no current head); train it again, with sum_spread for the spread, or "
                         "delete its run folder")
    if isinstance(adapter, dict) and "fusion_block" not in adapter:
        adapter = {**adapter, "fusion_block": "paper"}
        dropout = adapter.pop("dropout", 0.0)
        adapter.setdefault("fusion_dropout", dropout)
        adapter.setdefault("plain_dropout", dropout)
        data["adapter"] = adapter
    optim = data.get("optim")
    if isinstance(optim, dict) and "amsgrad" not in optim:
        data["optim"] = {"amsgrad": False, "decay_norms_and_biases": True, **optim}
    return data


def _diff(a: Any, b: Any, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
