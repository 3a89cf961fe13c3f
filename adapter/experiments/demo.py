"""The whole pipeline on built-in data: shards → embed → train → eval, offline and on the CPU.

The backbone is the tiny `rankpipe-tiny-vit` architecture with random weights (no pretrained weights
can be fetched offline), so the metrics show that every stage works end to end, not what a
pretrained CLIP achieves. The adapter is scaled down to match that backbone.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path

from rankpipe.errors import InputError

# Written into the demo folder so that a rerun may replace it, and nothing else.
MARKER = ".rankpipe-demo"

# The small adapter of rankpipe.adapter.training.run_config.SMALL_ADAPTER_OVERRIDES with 4 relational tokens:
# trained in well under a minute on 2 cores.
DEMO_RELATIONAL_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class DemoPaths:
    """Where each stage of the demo wrote its output."""

    shards: Path
    manifest: Path
    store: Path
    run: Path
    checkpoint: Path
    eval_dir: Path
    rankings: Path
    report: Path


def demo_paths(out_dir: Path) -> DemoPaths:
    """The demo's layout under `out_dir`."""
    return DemoPaths(
        shards=out_dir / "shards",
        manifest=out_dir / "shards" / "manifest.yaml",
        store=out_dir / "demo.zarr",
        run=out_dir / "run",
        checkpoint=out_dir / "run" / "best.pt",
        eval_dir=out_dir / "eval",
        rankings=out_dir / "eval" / "rankings.csv",
        report=out_dir / "eval" / "report",
    )


def prepare_demo_folder(out_dir: Path) -> None:
    """Empty a previous demo folder, refusing to touch a folder the demo did not make."""
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / MARKER).exists():
            raise InputError(f"{out_dir} exists and was not made by `rankpipe demo`; choose another --out")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("made by rankpipe demo; rerunning the demo replaces this folder\n")


def run_demo(out_dir: Path, n_images: int = 240, steps: int = 300, device: str = "cpu",
             on_stage: Callable[[str], None] = lambda stage: None,
             train_progress: Callable | None = None):
    """Run every stage on the built-in dataset.

    Args:
        out_dir: the demo folder (replaced if an earlier demo made it).
        n_images: images in the built-in dataset.
        steps: adapter training steps.
        device: "cpu" or "cuda".
        on_stage: called with a line before each stage starts.
        train_progress: receives training events (see rankpipe.adapter.training.loop.TrainEvent).

    Returns:
        (DemoPaths, EvalResults).
    """
    from rankpipe.adapter.evaluation.command import EvalRequest, run_evaluation
    from rankpipe.adapter.evaluation.evaluate import EvalConfig
    from rankpipe.adapter.evaluation.metrics import MetricConfig
    from rankpipe.adapter.training.loop import train_from_store
    from rankpipe.adapter.training.run_config import (
        SMALL_ADAPTER_OVERRIDES,
        load_run_config,
    )
    from rankpipe.pipeline.data.manifest import load_manifest
    from rankpipe.pipeline.datasets.demo_data import build_demo_dataset
    from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
    from rankpipe.pipeline.embed.job import embed
    from rankpipe.pipeline.store import TokenStore

    paths = demo_paths(out_dir)
    prepare_demo_folder(out_dir)

    on_stage(f"1/4 building {n_images} demo images from scikit-image photos into {paths.shards}")
    build_demo_dataset(paths.shards, n_images=n_images)

    on_stage(f"2/4 embedding with {TINY_VIT} (random weights) into {paths.store}")
    embed(load_manifest(paths.manifest), paths.store, BackboneSpec(model=TINY_VIT, pretrained="none"),
          device=device, batch_size=64, workers=1)

    on_stage(f"3/4 training the adapter for {steps} steps into {paths.run}")
    run_config = load_run_config(None, [*SMALL_ADAPTER_OVERRIDES, f"adapter.relational_tokens={DEMO_RELATIONAL_TOKENS}",
                                        f"train.max_steps={steps}"])
    train_from_store(TokenStore.open(paths.store), paths.run, run_config, device=device, progress=train_progress)

    on_stage(f"4/4 evaluating the best checkpoint on the test split into {paths.eval_dir}")
    outputs = run_evaluation(EvalRequest(
        store=paths.store, checkpoint=paths.checkpoint,
        config=EvalConfig(split="test", metrics=MetricConfig(bootstrap=200)),
        out_dir=paths.eval_dir, exports=(paths.rankings,), report_dir=paths.report, device=device,
    ))
    return paths, outputs.results
