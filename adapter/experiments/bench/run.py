"""`rankpipe bench`: embed a task set once, then train and evaluate every variant × seed into one table.

Layout under OUT (docs/bench.md):

    OUT/photo-tasks/                 the task set, when bench built it (no --tasks)
    OUT/store.zarr                   the token store, embedded once and resumed if unfinished
    OUT/runs/<variant>/seed<k>/      best.pt, last.pt, history.jsonl, metrics.json and scores.npz of one run
    OUT/results.md, OUT/results.csv  the tables over all runs: mean ± std over seeds, the paired
                                     comparison against the reference row and the query matrix
    OUT/comparison.csv               the paired comparison
    OUT/curves.png, .csv, .json      validation SRCC against step, per variant and seed
    OUT/query_matrix.json            SRCC of every query's scores against every label, per variant

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
from rankpipe.adapter.experiments.bench.bootstrap import METRICS, BootstrapConfig
from rankpipe.adapter.experiments.bench.steps import BENCH_STEPS, QUICK_STEPS
from rankpipe.adapter.experiments.bench.table import (
    results_csv,
    results_markdown,
    table_rows,
)
from rankpipe.adapter.experiments.bench.variants import Variant
from rankpipe.adapter.training.run_config import SMALL_ADAPTER_OVERRIDES
from rankpipe.devices import torch_device_for
from rankpipe.errors import InputError
from rankpipe.files import write_text_atomic
from rankpipe.pipeline.embed.backbone import RANDOM_WEIGHTS, BackboneSpec

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
TASKS_RECORD = "photo_tasks.json"
# --quick trains the small adapter of the demo, so each run takes seconds on a CPU.
QUICK_OVERRIDES = SMALL_ADAPTER_OVERRIDES
# Without --quick: the paper's adapter design at a width a CPU trains, sized so the default bench
# (4 variants × 3 seeds on photo-tasks --size bench, ViT-B-32 at 224 px) takes about an hour on 2
# CPU cores (docs/bench.md has the measurement). `--set adapter.d_model=768 ...` gives the paper's width.
BENCH_OVERRIDES = (
    *SMALL_ADAPTER_OVERRIDES,  # later assignments win: the bench's own batch and schedule below
    "train.batch_size=16",
    "train.eval_every=500",
    "train.log_every=100",
)
# The task set built when --tasks is left out.
QUICK_SIZE, BENCH_SIZE = "small", "bench"


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
    # into OUT/photo-tasks (size "small" with --quick, "bench" otherwise).
    tasks: Path | None = None
    # Small adapter and QUICK_STEPS steps, for a CPU check of the whole bench in minutes.
    quick: bool = False
    # Training steps of every run; None = QUICK_STEPS with quick, else BENCH_STEPS.
    steps: int | None = None
    # `section.field=value` overrides for every run, applied before each variant's own.
    overrides: tuple[str, ...] = ()
    # Labels to train and table, in place of the task set's; None = the task set's train labels and,
    # for photo-tasks, its held-out counting labels as unseen queries (there are none with `labels`).
    labels: tuple[str, ...] | None = None
    # Where the backbone and the adapters run: "cpu" or "cuda[:i]".
    device: str = "cpu"
    # Images per backbone forward pass while embedding.
    embed_batch_size: int = 64
    # Decoding processes while embedding.
    workers: int = 2
    # Split the table is computed on.
    split: str = "test"
    # The row every other is compared with; None = "default" when it is among the variants, else the first.
    reference: str | None = None
    # The metric of the intervals, comparisons (a key of bootstrap.METRICS).
    metric: str = "srcc"
    # How the test images are resampled for intervals and paired differences.
    bootstrap: BootstrapConfig = BootstrapConfig()

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise InputError(f"--seeds must be at least 1, not {self.seeds}")
        if self.steps is not None and self.steps < 1:
            raise InputError(f"--steps must be at least 1, not {self.steps}")
        if not self.variants:
            raise InputError("name at least one variant with --variants")
        if self.labels is not None and not self.labels:
            raise InputError("--labels names no label; give comma-separated labels of the task set, or leave it out")
        if self.reference is not None and self.reference not in self.variant_names:
            raise InputError(f"--reference {self.reference} is not among --variants; add it there or name "
                             f"one of {', '.join(self.variant_names)}")
        if self.metric not in METRICS:
            raise InputError(f"unknown comparison metric {self.metric!r}; use one of {', '.join(METRICS)}")

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    @property
    def reference_row(self) -> str:
        """The variant the comparison is against."""
        if self.reference is not None:
            return self.reference
        return "default" if "default" in self.variant_names else self.variant_names[0]


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

    # The tables as markdown (also OUT/results.md) and the CSV's path.
    markdown: str
    results_md: Path
    results_csv: Path
    # The learning curves' plot; None when no run has a curve (baselines only).
    curves_png: Path | None
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

    manifest = load_manifest(tasks.manifest)
    for name in config.labels or ():  # a misspelt --labels fails now, not after the embedding
        manifest.label(name)
    store_path = out / "store.zarr"
    on_stage(f"embedding {tasks.manifest} with {config.backbone.model} ({_weights(config.backbone)}) into {store_path}")
    embed(manifest, store_path, config.backbone, device=config.device,
          batch_size=config.embed_batch_size, workers=config.workers, progress=False)
    store = TokenStore.open(store_path)
    if config.labels is not None:
        train_labels, unseen = list(LabelledStore.open(store, labels=config.labels).labels), []
    else:
        train_labels = list(LabelledStore.open(store, among=tasks.train_labels).labels)
        unseen = [name for name in tasks.unseen_labels if name in store.label_names and name not in train_labels]

    records, trained = [], 0
    for i, (variant, seed, run_config) in enumerate(plan, 1):
        run_dir = out / "runs" / variant.name / f"seed{seed}"
        record = finished_run(run_dir, run_config, train_labels)
        if record is None:
            what = f"({run_config.train.max_steps} steps)" if variant.method == ADAPTER_METHOD else "(baseline)"
            on_stage(f"[{i}/{len(plan)}] training {variant.name} seed {seed} {what} into {run_dir}")
            record = run_one(store, variant, seed, run_config, train_labels, unseen, run_dir, config)
            trained += 1
        else:
            on_stage(f"[{i}/{len(plan)}] {variant.name} seed {seed}: finished earlier, reusing {run_dir / METRICS_FILE}")
        records.append(record)

    on_stage(f"comparing against {config.reference_row} ({config.bootstrap.resamples} bootstrap resamples)")
    scores = {(v.name, seed): run_scores(out / "runs" / v.name / f"seed{seed}", store, unseen, config)
              for v, seed, _ in plan}
    header = header_lines(config, store, tasks, plan)
    rows = table_rows(records, config.variant_names)
    markdown = results_markdown(header, rows)
    markdown += "\n" + write_comparison(out, records, scores, config)
    markdown += "\n" + write_query_matrices(out, store, scores, config)
    curves_png, curves_section = write_curves(out, plan, header[0])
    markdown += "\n" + curves_section
    md_path, csv_path = out / "results.md", out / "results.csv"
    write_text_atomic(md_path, markdown)
    write_text_atomic(csv_path, results_csv(rows))
    return BenchResult(markdown, md_path, csv_path, curves_png, trained, len(plan) - trained)


def run_scores(run_dir: Path, store, unseen: Sequence[str], config: BenchConfig):
    """A finished run's saved test scores; a run finished before scores were saved is scored again from best.pt."""
    from rankpipe.adapter.evaluation.scoring import load_checkpoint
    from rankpipe.adapter.experiments.bench.runs import SCORES_FILE, RunScores, evaluate_run

    path = run_dir / SCORES_FILE
    if not path.is_file():
        loaded = load_checkpoint(run_dir / "best.pt", config.device)
        held_out = unseen if loaded.method == ADAPTER_METHOD else ()  # baselines score trained queries only
        evaluate_run(loaded, store, held_out, config.split)[1].save(path)
    return RunScores.load(path)


def write_comparison(out: Path, records: Sequence[dict], scores, config: BenchConfig) -> str:
    """Write comparison.csv; return the comparison section of results.md."""
    from rankpipe.adapter.experiments.bench.compare import (
        compare_rows,
        comparison_csv,
        comparison_markdown,
    )

    unseen = {q["label"]: q["unseen"] for record in records for q in record["queries"]}
    rows = compare_rows(scores, unseen, config.variant_names, config.reference_row, config.metric, config.bootstrap)
    write_text_atomic(out / "comparison.csv", comparison_csv(rows, config.metric))
    return comparison_markdown(rows, config.variant_names, config.reference_row, config.metric, config.bootstrap)


def write_query_matrices(out: Path, store, scores, config: BenchConfig) -> str:
    """Write query_matrix.json; return the query-matrix section of results.md."""
    import numpy as np

    from rankpipe.adapter.experiments.bench.query_matrix import (
        matrices_markdown,
        truth_matrix,
        variant_matrix,
    )

    rows = next(iter(scores.values())).rows
    labels = {name: np.asarray(store.label(name), dtype=np.float64)[rows] for name in store.label_names}
    matrices = [variant_matrix(name, [s for (v, _), s in scores.items() if v == name], labels)
                for name in config.variant_names]
    widest = max(matrices, key=lambda m: len(m.labels))
    truth = truth_matrix(labels, widest.labels)
    data = {"truth": truth.to_dict(), "variants": [m.to_dict() for m in matrices]}
    write_text_atomic(out / "query_matrix.json", json.dumps(data, indent=1) + "\n")
    return matrices_markdown(matrices, truth)


def write_curves(out: Path, plan, title: str) -> tuple[Path | None, str]:
    """Write curves.csv, curves.json and curves.png from the adapter runs' histories.

    Returns the plot's path (None when no run has a curve: baselines only) and the learning-curve
    section of results.md.
    """
    from rankpipe.adapter.experiments.bench.curves import (
        curves_csv,
        curves_json,
        curves_markdown,
        plot_curves,
        read_curve,
    )
    from rankpipe.adapter.training.loop import HISTORY

    curves = [read_curve(v.name, seed, out / "runs" / v.name / f"seed{seed}" / HISTORY)
              for v, seed, _ in plan if v.method == ADAPTER_METHOD]
    if not curves:
        return None, "## Learning curves\n\nNo adapter runs: baselines are fitted, not trained by steps.\n"
    write_text_atomic(out / "curves.csv", curves_csv(curves))
    write_text_atomic(out / "curves.json", curves_json(curves))
    plot_curves(curves, out / "curves.png", title.replace("`", ""))
    return out / "curves.png", curves_markdown(curves)


def run_config_for(variant: Variant, seed: int, config: BenchConfig):
    """The run config of one (variant, seed): defaults, quick settings, the bench's --set, the variant's.

    Raises:
        InputError: an override names an unknown field or gives a bad value.
    """
    from rankpipe.adapter.training.run_config import load_run_config

    if variant.method != ADAPTER_METHOD:  # a baseline trains no adapter: only the seed is recorded
        return load_run_config(None, [f"train.seed={seed}"])
    steps = config.steps if config.steps is not None else (QUICK_STEPS if config.quick else BENCH_STEPS)
    overrides = [*(QUICK_OVERRIDES if config.quick else BENCH_OVERRIDES), *config.overrides,
                 f"train.max_steps={steps}"]
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

            size = QUICK_SIZE if config.quick else BENCH_SIZE
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


def finished_run(run_dir: Path, run_config, train_labels: Sequence[str] | None = None) -> dict | None:
    """The metrics record of a finished run, None when it has not finished.

    Raises:
        InputError: the run finished with other settings than `run_config`, or trained other labels
            than `train_labels` (when given).
    """
    from rankpipe.adapter.training.run_config import RunConfig

    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    # Read as checkpoints are: a record saved before a config field changed keeps the behaviour it was
    # trained with, so it reads as trained with other settings rather than failing on the old field.
    changed = RunConfig.from_saved(record["run_config"], where=str(path)).differences(run_config)
    if changed:
        raise InputError(f"{run_dir} was trained with other settings ({', '.join(changed)} differ); "
                         "use another --out, or delete that run folder to train it again")
    trained = [q["label"] for q in record.get("queries", []) if not q["unseen"]]
    if train_labels is not None and "queries" in record and sorted(trained) != sorted(train_labels):
        raise InputError(f"{run_dir} was trained on other labels ({', '.join(trained)}); use another --out, "
                         "or delete that run folder to train it again")
    return record


def run_one(store, variant: Variant, seed: int, run_config, train_labels: Sequence[str], unseen: Sequence[str],
            run_dir: Path, config: BenchConfig) -> dict:
    """Train one (variant, seed), evaluate it and write its metrics.json; returns the record.

    A run folder with a last.pt but no metrics.json was interrupted: training continues from it.
    """
    from rankpipe.adapter.baselines.fit import train_baseline
    from rankpipe.adapter.evaluation.scoring import load_checkpoint
    from rankpipe.adapter.experiments.bench.runs import SCORES_FILE, evaluate_run
    from rankpipe.adapter.training.checkpoint import LAST
    from rankpipe.adapter.training.loop import train_from_store

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
    queries, scores = evaluate_run(load_checkpoint(best_path, config.device), store, unseen, config.split,
                                   run_config.train.eval_batch_size)
    scores.save(run_dir / SCORES_FILE)  # before metrics.json, which marks the run finished
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


def header_lines(config: BenchConfig, store, tasks: TaskSet, plan) -> list[str]:
    """What the tables' numbers depend on, one line each, for the top of results.md."""
    spec = config.backbone
    weights = ("RANDOM weights (no pretrained CLIP): the numbers show the pipeline and how variants compare on "
               "this backbone, not what a pretrained CLIP achieves") if spec.pretrained == RANDOM_WEIGHTS \
        else f"pretrained weights `{spec.pretrained}`"
    height, width = store.provenance["image_size"]
    grid = store.provenance["token_grid"]
    per_split = ", ".join(f"{role} {len(store.rows(list(store.manifest.splits.values(role))))}"
                          for role in ("train", "val", "test"))
    adapter_runs = [run_config for v, _, run_config in plan if v.method == ADAPTER_METHOD]
    lines = [
        f"Backbone `{spec.model}` at {height}×{width} px ({grid[0]}×{grid[1]} patch tokens), {weights}.",
        f"Task set `{tasks.manifest.parent}` ({store.num_rows} images: {per_split}); split `{config.split}`.",
    ]
    if config.labels is not None:
        lines.append(f"Trained and tabled queries: {', '.join(config.labels)} only (`--labels`).")
    if adapter_runs:
        run = adapter_runs[0]
        a = run.adapter
        lines.append(f"Adapter d_model {a.d_model}, {a.heads} heads, {a.blocks} blocks + {a.plain_layers} plain layers, "
                     f"{a.text_extra_tokens} extra text tokens; {run.train.max_steps} training steps per run, "
                     f"batch {run.train.batch_size}, lr {run.optim.lr:g}{' (quick: small adapter)' if config.quick else ''}.")
    lines.append(f"Device `{config.device}`; "
                 + (f"seeds 0..{config.seeds - 1}, mean ± sample std over seeds." if config.seeds > 1 else "seed 0."))
    if tasks.sources:
        photos = ", ".join(tasks.sources.get("photos", {}))
        cutouts = ", ".join(tasks.sources.get("cutouts", {}))
        lines.append(f"Photos from {photos}; cut-outs from {cutouts}.")
    return lines


def _weights(spec: BackboneSpec) -> str:
    return "random weights" if spec.pretrained == RANDOM_WEIGHTS else f"weights {spec.pretrained}"
