"""The regression head's pooling against a linear probe, one query at a time, on a finished token store.

For each label, on the same store and splits, in one run:

    linear-probe   ridge on the pooled image embedding (`rankpipe train --method linear-probe`)
    sum            the bench adapter trained on that query alone, `adapter.regression_pooling=sum` (the paper)
    sum_spread     the same with `adapter.regression_pooling=sum_spread`

Each adapter run uses the bench's adapter settings (`BENCH_OVERRIDES`), `--steps` steps and its
val-best checkpoint; the table gives test SRCC per seed and the best checkpoint's step. Training one
query alone isolates what the head can read from the tokens from how a run shares its steps among
queries (the bench's own rows do that).

    python -m rankpipe.benchmarks.pooling_probe --store bench-results/store.zarr \
        --labels blur,noise,pixelation,jpeg,brightness,count_fruits
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from rankpipe.adapter.baselines.fit import train_baseline
from rankpipe.adapter.evaluation.evaluate import EvalConfig, evaluate
from rankpipe.adapter.evaluation.metrics import MetricConfig
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.adapter.experiments.bench.run import BENCH_OVERRIDES
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.run_config import load_run_config
from rankpipe.pipeline.store import TokenStore

POOLINGS = ("sum", "sum_spread")


def test_srcc(checkpoint: Path, store: TokenStore, label: str) -> float:
    """Test-split SRCC of a checkpoint's scores for one label."""
    results = evaluate(load_checkpoint(checkpoint, "cpu"), store, EvalConfig(split="test", metrics=MetricConfig(bootstrap=0)))
    (query,) = [q for q in results.queries if q.label == label]
    return query.metrics.estimates["srcc"].value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="a finished token store with train/val/test splits")
    parser.add_argument("--labels", required=True, help="comma-separated labels, each trained alone")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=100)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    store = TokenStore.open(args.store)
    labels = [name.strip() for name in args.labels.split(",") if name.strip()]

    print(f"store {args.store}: backbone {store.provenance['model']} weights {store.provenance['pretrained']}; "
          f"bench adapter, {args.steps} steps of batch 16 per run, one query per run, device cpu")
    print("| label | linear-probe | " + " | ".join(f"{p} (seed: SRCC @ best step)" for p in POOLINGS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in POOLINGS) + " |")
    with tempfile.TemporaryDirectory() as tmp:
        for label in labels:
            probe = train_baseline(store, Path(tmp) / label / "probe", "linear-probe", labels=[label])
            cells = [f"{test_srcc(probe.path, store, label):+.2f}"]
            for pooling in POOLINGS:
                runs = []
                for seed in range(args.seeds):
                    run_config = load_run_config(None, [*BENCH_OVERRIDES, f"train.max_steps={args.steps}",
                                                        f"train.eval_every={args.eval_every}", f"train.seed={seed}",
                                                        f"adapter.regression_pooling={pooling}"])
                    result = train_from_store(store, Path(tmp) / label / pooling / str(seed), run_config, labels=[label])
                    runs.append(f"{seed}: {test_srcc(result.best_path, store, label):+.2f} @ {result.best_step}")
                cells.append(", ".join(runs))
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
