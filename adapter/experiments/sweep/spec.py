"""A sweep file: which run configs to try, expanded into a list of trials with stable ids.

A sweep file is YAML with these keys (all optional except that it must name at least one trial):

    config: base.yaml            # a run-config YAML file, relative to the sweep file
    set: [train.max_steps=2000]  # `--set`-style overrides applied to every trial
    grid:                        # cartesian product over dotted fields
      optim.lr: [5e-5, 1e-4]
      loss.pairwise: [hinge, bce]
    random:                      # `trials` random draws per grid point
      optim.weight_decay: {loguniform: [1e-4, 1e-1]}
      adapter.relational_tokens: {choice: [4, 16]}
      loss.weight: {uniform: [0.1, 1.0]}
    trials: 8
    seed: 0                      # seeds the random draws

A trial is the resolved RunConfig; its id is a hash of that config, so the same settings keep the same
folder when the file is edited, reordered or rerun, and two points that resolve to the same config
are one trial.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from rankpipe.adapter.training.run_config import RunConfig, load_run_config
from rankpipe.errors import InputError
from rankpipe.settings import load_yaml

# Hex digits of the config hash used as a trial id (48 bits: collisions are negligible for any sweep).
TRIAL_ID_DIGITS = 12
# Significant digits kept of a drawn uniform/loguniform value, so configs and tables stay readable.
DRAWN_DIGITS = 4
DISTRIBUTIONS = ("choice", "uniform", "loguniform")
# The most trials one sweep file may expand to.
MAX_TRIALS = 10_000
_KEYS = ("config", "set", "grid", "random", "trials", "seed")


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep file."""

    # Run-config YAML every trial starts from (None: the defaults).
    config: Path | None = None
    # `section.field=value` overrides applied to every trial before its own.
    base: tuple[str, ...] = ()
    # Dotted field -> the values the grid tries (cartesian product over fields, in file order).
    grid: dict[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    # Dotted field -> (distribution, its arguments): "choice" (values), "uniform"/"loguniform" (low, high).
    random: dict[str, tuple[str, tuple[Any, ...]]] = dataclasses.field(default_factory=dict)
    # Random draws per grid point (1 when there is no `random` section).
    trials: int = 1
    # Seed of the random draws.
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise InputError(f"sweep: trials must be >= 1, not {self.trials}")
        for field, values in self.grid.items():
            if not values:
                raise InputError(f"sweep: grid field {field!r} lists no values; give at least one")
        count = math.prod(len(values) for values in self.grid.values()) * (self.trials if self.random else 1)
        if count > MAX_TRIALS:  # refused before any config is built: expanding them alone would take hours
            raise InputError(f"sweep: {count:,} trials is more than {MAX_TRIALS:,}; shrink the grid or 'trials', "
                             "or split the sweep into several files")
        for field, (kind, args) in self.random.items():
            if kind not in DISTRIBUTIONS:
                raise InputError(f"sweep: random field {field!r} uses {kind!r}; use one of {', '.join(DISTRIBUTIONS)}")
            if kind == "choice" and not args:
                raise InputError(f"sweep: random field {field!r} has an empty choice list")
            if kind != "choice":
                if len(args) != 2 or not all(_is_number(a) for a in args) or not args[0] < args[1]:
                    raise InputError(f"sweep: random field {field!r}: {kind} takes [low, high] with low < high, not {list(args)}")
                if kind == "loguniform" and args[0] <= 0:
                    raise InputError(f"sweep: random field {field!r}: loguniform needs low > 0, not {args[0]}")
        overlap = set(self.grid) & set(self.random)
        if overlap:
            raise InputError(f"sweep: {', '.join(sorted(overlap))} is both in grid and random; keep it in one")

    @property
    def varied(self) -> list[str]:
        """The dotted fields that differ between trials, in file order (the results table's columns)."""
        return [*self.grid, *self.random]


@dataclasses.dataclass(frozen=True)
class Trial:
    """One point of a sweep."""

    # Hash of the resolved run config; names the trial's folder.
    id: str
    # The trial's own overrides (its grid point and random draws), applied after the sweep's base.
    overrides: tuple[str, ...]
    # The fully resolved run config.
    config: RunConfig
    # Value of each varied field as written in the overrides (the table shows these).
    values: dict[str, str]


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Parse a sweep YAML file.

    Raises:
        InputError: the file is missing or not YAML, an unknown key, or a malformed grid/random entry.
    """
    path = Path(path)
    data = load_yaml(path, "sweep file", "pass a YAML file with grid: and/or random: sections")
    if not isinstance(data, dict):
        raise InputError(f"sweep file {path} must be a mapping with keys {', '.join(_KEYS)}")
    unknown = sorted(set(data) - set(_KEYS))
    if unknown:
        raise InputError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_KEYS)}")
    base = data.get("set") or []
    if isinstance(base, dict):
        base = [f"{key}={_override_value(value)}" for key, value in base.items()]
    if not isinstance(base, list) or not all(isinstance(item, str) for item in base):
        raise InputError(f"sweep file {path}: 'set' must be a list of section.field=value strings or a mapping")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        raise InputError(f"sweep file {path}: 'grid' must map dotted fields to lists of values")
    random = data.get("random") or {}
    if not isinstance(random, dict):
        raise InputError(f"sweep file {path}: 'random' must map dotted fields to {{choice|uniform|loguniform: [...]}}")
    draws = {}
    for field, dist in random.items():
        if not isinstance(dist, dict) or len(dist) != 1:
            raise InputError(f"sweep file {path}: random field {field!r} must be one of "
                             f"{{choice: [values]}}, {{uniform: [low, high]}}, {{loguniform: [low, high]}}")
        (kind, args), = dist.items()
        args = tuple(args) if isinstance(args, list) else (args,)
        if kind in ("uniform", "loguniform"):
            # YAML 1.1 reads 1e-4 (no decimal point) as a string.
            args = tuple(_number(a) for a in args)
        draws[str(field)] = (str(kind), args)
    config = data.get("config")
    trials, seed = data.get("trials", 1), data.get("seed", 0)
    if not isinstance(trials, int) or not isinstance(seed, int):
        raise InputError(f"sweep file {path}: 'trials' and 'seed' must be integers")
    if random and "trials" not in data:
        raise InputError(f"sweep file {path}: a random section needs 'trials: N' (draws per grid point)")
    return SweepSpec(
        config=(path.parent / config) if config is not None else None,
        base=tuple(base),
        grid={str(k): tuple(v) if isinstance(v, list) else (v,) for k, v in grid.items()},
        random=draws,
        trials=trials,
        seed=seed,
    )


def expand_trials(spec: SweepSpec, extra: tuple[str, ...] = ()) -> list[Trial]:
    """Every trial of the sweep, in grid order then draw order; configs that resolve equal appear once.

    Args:
        spec: the parsed sweep file.
        extra: overrides applied after the sweep's base and before each trial's own (e.g. a CLI --set).

    Raises:
        InputError: a field or value that the run config rejects (the message names the field).
    """
    # Settings shared by every trial are checked first, so that an error in them is not blamed on a trial.
    load_run_config(spec.config, [*spec.base, *extra], overrides_from="the sweep's set list or --set")
    rng = np.random.default_rng(spec.seed)
    fields = list(spec.grid)
    out: dict[str, Trial] = {}
    for point in itertools.product(*(spec.grid[f] for f in fields)):
        for _ in range(spec.trials if spec.random else 1):
            values = {f: _override_value(v) for f, v in zip(fields, point)}
            values.update({f: _override_value(_draw(rng, kind, args)) for f, (kind, args) in spec.random.items()})
            overrides = tuple(f"{f}={v}" for f, v in values.items())
            config = load_run_config(spec.config, [*spec.base, *extra, *overrides],
                                     overrides_from="sweep trial " + ", ".join(overrides))
            trial_id = config_id(config)
            out.setdefault(trial_id, Trial(trial_id, overrides, config, values))
    return list(out.values())


def config_id(config: RunConfig) -> str:
    """The trial id of a run config: the first hex digits of the SHA-256 of its canonical JSON."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()[:TRIAL_ID_DIGITS]


def _draw(rng: np.random.Generator, kind: str, args: tuple[Any, ...]) -> Any:
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    low, high = float(args[0]), float(args[1])
    if kind == "uniform":
        value = rng.uniform(low, high)
    else:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    return float(f"{value:.{DRAWN_DIGITS}g}")


def _override_value(value: Any) -> str:
    """A YAML value as the text of a `--set` override (lists as JSON, which the run config parses)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number(value: Any) -> Any:
    """A numeric string as a float; anything else unchanged (validation reports it)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
