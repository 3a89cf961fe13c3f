"""`rankpipe bench`: embed a task set once, then train and evaluate every variant × seed into one table.

Layout under OUT (docs/bench.md):

    OUT/photo-tasks/                 the task set, when bench built it (no --tasks)
    OUT/store.zarr                   the token store, embedded once and resumed if unfinished
    OUT/runs/<variant>/seed<k>/      best.pt, last.pt, history.jsonl and metrics.json of one run
    OUT/results.md, OUT/results.csv  the table over all runs

Every stage resumes: a finished store is reused, a run whose metrics.json exists is skipped (after
checking it was trained with the same settings), and a run interrupted mid-training continues from
its last.pt. Each run is evaluated on the test split for the labels it trained on, and — for a
photo-tasks set — for the held-out counting labels it never saw (adapter/experiments/bench/runs.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.adapter.experiments.bench.table import (
    results_csv,
    results_markdown,
    table_rows,
)
from rankpipe.adapter.experiments.bench.variants import Variant
from rankpipe.adapter.training.run_config import SMALL_ADAPTER_OVERRIDES
from rankpipe.devices import torch_device_for
from rankpipe.errors import InputError
from rankpipe.pipeline.embed.backbone import RANDOM_WEIGHTS, BackboneSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TASKS_RECORD = "photo_tasks.json"
# --quick trains the small adapter of the demo, so each run takes seconds on a CPU.
QUICK_OVERRIDES = SMALL_ADAPTER_OVERRIDES
# Training steps of each --quick run unless --steps says otherwise.
QUICK_STEPS = 150


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One `rankpipe bench` invocation."""

    # Where everything goes (see the module docstring).
    out_dir: Path
    # The frozen CLIP that embeds the task set.
    backbone: BackboneSpec
    # The rows to train, in table order.
    variants: tuple[Variant, ...]
    # Training seeds per variant: 0 .. seeds-1.
    seeds: int = 3
    # Folder holding manifest.yaml (and, for photo-tasks, photo_tasks.json); None = build photo-tasks
    # into OUT/photo-tasks (size "small" with --quick, "full" otherwise).
    tasks: Path | None = None
    # Small adapter and QUICK_STEPS steps, for a CPU check of the whole bench in minutes.
    quick: bool = False
    # Training steps of every run; None = QUICK_STEPS with quick, else the run config's default.
    steps: int | None = None
    # `section.field=value` overrides for every run, applied before each variant's own.
    overrides: tuple[str, ...] = ()
    # Where the backbone and the adapters run: "cpu" or "cuda[:i]".
    device: str = "cpu"
    # Images per backbone forward pass while embedding.
    embed_batch_size: int = 64
    # Decoding processes while embedding.
    workers: int = 2
    # Split the table is computed on.
    split: str = "test"

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise InputError(f"--seeds must be at least 1, not {self.seeds}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}")
        if not self.variants:
            raise InputError("name at least one variant with --variants")


@dataclasses.dataclass(frozen=True)
class TaskSet:
    """The dataset a bench runs on."""

    # Its manifest.yaml.
    manifest: Path
    # Labels to train on; None = every label of the store with training images.
    train_labels: tuple[str, ...] | None
    # Labels never trained on that the table evaluates as unseen queries (held-out counting categories).
    unseen_labels: tuple[str, ...]
    # Where its photos and cut-outs came from (photo-tasks only), for the table's header.
    sources: dict


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """What a bench wrote."""

    # The table as markdown (also OUT/results.md) and the CSV's path.
    markdown: str
    results_md: Path
    results_csv: Path
    # Runs trained now and runs reused from an earlier invocation.
    trained: int
    reused: int


def run_bench(config: BenchConfig, on_stage: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Embed once, train and evaluate every (variant, seed), write results.md and results.csv.

    Args:
        config: what to run.
        on_stage: called with one line before each stage and run.

    Raises:
        InputError: a missing task set, an unusable device, a store or earlier run made with other
            settings, or a mistake in the overrides.
    """
    from rankpipe.pipeline.data.manifest import load_manifest
    from rankpipe.pipeline.embed.job import embed
    from rankpipe.pipeline.labelled_store import LabelledStore
    from rankpipe.pipeline.store import TokenStore

    torch_device_for(config.device)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Every run config is resolved before any work, so a bad override fails at once.
    plan = [(v, seed, run_config_for(v, seed, config)) for v in config.variants for seed in range(config.seeds)]
    tasks = resolve_tasks(config, on_stage)

    store_path = out / "store.zarr"
    on_stage(f"embedding {tasks.manifest} with {config.backbone.model} ({_weights(config.backbone)}) into {store_path}")
    embed(load_manifest(tasks.manifest), store_path, config.backbone, device=config.device,
          batch_size=config.embed_batch_size, workers=config.workers, progress=False)
    store = TokenStore.open(store_path)
    train_labels = list(LabelledStore.open(store, among=tasks.train_labels).labels)
    unseen = [name for name in tasks.unseen_labels if name in store.label_names and name not in train_labels]

    records, trained = [], 0
    for i, (variant, seed, run_config) in enumerate(plan, 1):
        run_dir = out / "runs" / variant.name / f"seed{seed}"
        record = finished_run(run_dir, run_config)
        if record is None:
            what = f"({run_config.train.max_steps} steps)" if variant.method == ADAPTER_METHOD else "(baseline)"
            on_stage(f"[{i}/{len(plan)}] training {variant.name} seed {seed} {what} into {run_dir}")
            record = run_one(store, variant, seed, run_config, train_labels, unseen, run_dir, config)
            trained += 1
        else:
            on_stage(f"[{i}/{len(plan)}] {variant.name} seed {seed}: finished earlier, reusing {run_dir / METRICS_FILE}")
        records.append(record)

    header = header_lines(config, store, tasks, plan[0][2].train.max_steps)
    rows = table_rows(records, [v.name for v in config.variants])
    markdown = results_markdown(header, rows)
    md_path, csv_path = out / "results.md", out / "results.csv"
    md_path.write_text(markdown, encoding="utf-8")
    csv_path.write_text(results_csv(rows), encoding="utf-8")
    return BenchResult(markdown, md_path, csv_path, trained, len(plan) - trained)


def run_config_for(variant: Variant, seed: int, config: BenchConfig):
    """The run config of one (variant, seed): defaults, quick settings, the bench's --set, the variant's.

    Raises:
        InputError: an override names an unknown field or gives a bad value.
    """
    from rankpipe.adapter.training.run_config import load_run_config

    if variant.method != ADAPTER_METHOD:  # a baseline trains no adapter: only the seed is recorded
        return load_run_config(None, [f"train.seed={seed}"])
    steps = config.steps if config.steps is not None else (QUICK_STEPS if config.quick else None)
    overrides = [*(QUICK_OVERRIDES if config.quick else ()), *config.overrides]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    return load_run_config(None, [*overrides, *variant.overrides, f"train.seed={seed}"])


def resolve_tasks(config: BenchConfig, on_stage: Callable[[str], None]) -> TaskSet:
    """The task set of --tasks, or photo-tasks built into OUT/photo-tasks (reused when already built).

    Raises:
        InputError: --tasks has no manifest.yaml.
    """
    folder = config.tasks
    if folder is None:
        folder = Path(config.out_dir) / "photo-tasks"
        if not (folder / TASKS_RECORD).is_file():
            from rankpipe.pipeline.datasets.photo_tasks import (
                build_photo_tasks,
                config_for_size,
            )

            size = "small" if config.quick else "full"
            on_stage(f"building photo-tasks ({size}) into {folder}")
            build_photo_tasks(folder, config_for_size(size))
    folder = Path(folder)
    manifest = folder / "manifest.yaml"
    if not manifest.is_file():
        raise InputError(f"--tasks {folder} has no manifest.yaml; pass a folder made by "
                         "`rankpipe datasets build photo-tasks` (or leave --tasks out to build one)")
    record_path = folder / TASKS_RECORD
    if not record_path.is_file():
        return TaskSet(manifest, None, (), {})
    record = json.loads(record_path.read_text())
    return TaskSet(manifest, tuple(record["train_labels"]), tuple(record["counting"]["held_out_labels"]),
                   record.get("sources", {}))


def finished_run(run_dir: Path, run_config) -> dict | None:
    """The metrics record of a finished run, None when it has not finished.

    Raises:
        InputError: the run finished with other settings than `run_config`.
    """
    from rankpipe.adapter.training.run_config import RunConfig

    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    changed = RunConfig.from_dict(record["run_config"]).differences(run_config)
    if changed:
        raise InputError(f"{run_dir} was trained with other settings ({', '.join(changed)} differ); "
                         "use another --out, or delete that run folder to train it again")
    return record


def run_one(store, variant: Variant, seed: int, run_config, train_labels: Sequence[str], unseen: Sequence[str],
            run_dir: Path, config: BenchConfig) -> dict:
    """Train one (variant, seed), evaluate it and write its metrics.json; returns the record.

    A run folder with a last.pt but no metrics.json was interrupted: training continues from it.
    """
    from rankpipe.adapter.baselines.fit import train_baseline
    from rankpipe.adapter.evaluation.scoring import load_checkpoint
    from rankpipe.adapter.experiments.bench.runs import evaluate_run
    from rankpipe.adapter.training.checkpoint import LAST
    from rankpipe.adapter.training.loop import train_from_store
    from rankpipe.files import write_text_atomic

    started = time.monotonic()
    if variant.method == ADAPTER_METHOD:
        result = train_from_store(store, run_dir, run_config, labels=list(train_labels), device=config.device,
                                  resume=(run_dir / LAST).exists())
        best_path, best_step, steps = result.best_path, result.best_step, result.steps
    else:
        # A baseline's checkpoint holds prompts or a probe for the labels it was fitted on only, so it
        # has no score for held-out queries: its rows leave the unseen section empty.
        result = train_baseline(store, run_dir, variant.method, _baseline_settings(variant, seed),
                                labels=list(train_labels), device=config.device)
        best_path, best_step, steps, unseen = result.path, None, 0, ()
    train_seconds = time.monotonic() - started
    queries = evaluate_run(load_checkpoint(best_path, config.device), store, unseen, config.split,
                           run_config.train.eval_batch_size)
    record = {
        "variant": variant.name,
        "method": variant.method,
        "seed": seed,
        "split": config.split,
        "best_step": best_step,
        "steps": steps,
        "train_seconds": round(train_seconds, 3),
        "run_config": run_config.to_dict(),
        "queries": queries,
    }
    write_text_atomic(run_dir / METRICS_FILE, json.dumps(record, indent=1) + "\n")
    return record


def _baseline_settings(variant: Variant, seed: int) -> tuple[str, ...]:
    """A baseline's settings for one bench seed: its variant's, plus `seed=N` when the method is seeded."""
    from rankpipe.adapter.baselines import get_method

    fields = {field.name for field in dataclasses.fields(get_method(variant.method).config_class)}
    return (*variant.overrides, f"seed={seed}") if "seed" in fields else variant.overrides


def header_lines(config: BenchConfig, store, tasks: TaskSet, steps: int) -> list[str]:
    """What the table's numbers depend on, one line each, for the top of results.md."""
    spec = config.backbone
    weights = ("RANDOM weights (no pretrained CLIP): the numbers show the pipeline and how variants compare on "
               "this backbone, not what a pretrained CLIP achieves") if spec.pretrained == RANDOM_WEIGHTS \
        else f"pretrained weights `{spec.pretrained}`"
    lines = [
        f"Backbone `{spec.model}`, {weights}.",
        f"Task set `{tasks.manifest.parent}` ({store.num_rows} store rows); split `{config.split}`.",
        f"Device `{config.device}`; {steps} training steps per run"
        f"{' (quick: small adapter)' if config.quick else ''}; "
        + (f"seeds 0..{config.seeds - 1}, mean ± sample std over seeds." if config.seeds > 1 else "seed 0."),
    ]
    if tasks.sources:
        photos = ", ".join(tasks.sources.get("photos", {}))
        cutouts = ", ".join(tasks.sources.get("cutouts", {}))
        lines.append(f"Photos from {photos}; cut-outs from {cutouts}.")
    return lines


def _weights(spec: BackboneSpec) -> str:
    return "random weights" if spec.pretrained == RANDOM_WEIGHTS else f"weights {spec.pretrained}"
