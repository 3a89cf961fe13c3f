"""k-fold `rankpipe eval`: one checkpoint per fold on its own split, mean ± std over folds, fold exports."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from rankpipe.adapter.evaluation.evaluate import (
    EvalConfig,
    evaluate,
    markdown_table,
    results_markdown,
    results_table,
)
from rankpipe.adapter.evaluation.folds import (
    STD_DDOF,
    evaluate_folds,
    fold_stat,
    recorded_splits,
)
from rankpipe.adapter.evaluation.metrics import MetricConfig
from rankpipe.adapter.evaluation.query_rankings import (
    COLUMNS,
    FOLD_COLUMN,
    QueryRanking,
    read_rankings,
    write_rankings,
)
from rankpipe.adapter.evaluation.scoring import load_checkpoint
from rankpipe.adapter.training.checkpoint import read_checkpoint, save_checkpoint
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.run_config import load_run_config
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import (
    LabelSpec,
    Manifest,
    SplitSpec,
    load_manifest,
)
from rankpipe.pipeline.embed.backbone import TextFeatures
from rankpipe.pipeline.store import (
    TokenStore,
)

from conftest import SYNTHETIC_PROVENANCE, TINY_RUN, write_store_rows

K = 3
TINY = [*TINY_RUN, "optim.warmup_steps=3", "train.eval_every=5", "train.max_steps=10"]
PROVENANCE = SYNTHETIC_PROVENANCE
LABELS = (
    LabelSpec("count", "Sort images by the number of dots."),
    LabelSpec("age", "Sort people by age.", metric="ordinal", classes=(0.0, 1.0, 2.0, 3.0, 4.0)),
)


def fold_splits(k: int) -> SplitSpec:
    """Fold k of K: test on fold k, validate on the next fold, train on the rest."""
    return SplitSpec(
        train=tuple(f"fold{i}" for i in range(K) if i not in (k, (k + 1) % K)),
        val=(f"fold{(k + 1) % K}",),
        test=(f"fold{k}",),
    )


def write_fold_store(path: Path, n: int = 96, seed: int = 0) -> TokenStore:
    """A learnable store whose split values are fold0..fold2; its own manifest is fold 0's.

    "count" is written into channel 0 of the tokens and "age" (5 classes) into channel 1, plus noise.
    """
    rng = np.random.default_rng(seed)
    P, D, L, Dt = 4, 16, 6, 12
    labels = {"count": rng.uniform(0, 10, n).astype(np.float32), "age": rng.integers(0, 5, n).astype(np.float32)}
    tokens = rng.normal(0, 1, (n, P, D))
    tokens[:, :, 0] = (labels["count"][:, None] - 5) / 3 + rng.normal(0, 0.3, (n, P))
    tokens[:, :, 1] = (labels["age"][:, None] - 2) / 1.5 + rng.normal(0, 0.3, (n, P))
    labels["count"][::13] = np.nan  # images without a label are ranked but not measured
    splits = np.array([f"fold{i % K}" for i in range(n)])
    keys = np.array([f"img{i:04d}" for i in range(n)])
    manifest = Manifest(name="folds", shards="x-{000000..000001}.tar", labels=LABELS, splits=fold_splits(0))
    texts = {
        label.query: TextFeatures(tokens=rng.normal(0, 1, (L, Dt)).astype(np.float16), length=4, embed=np.zeros(8, np.float16))
        for label in LABELS
    }
    half = n // 2
    columns = {"tokens": tokens, "keys": keys, "valid": np.ones(n, bool), "splits": splits}
    return write_store_rows(path, PROVENANCE, manifest, texts, [half, n - half], columns, labels)


@dataclasses.dataclass
class Folds:
    store: TokenStore
    checkpoints: list[Path]
    manifests: list[Path]


@pytest.fixture(scope="module")
def folds(tmp_path_factory) -> Folds:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices run fastest on one thread
    root = tmp_path_factory.mktemp("folds")
    store = write_fold_store(root / "folds.zarr")
    checkpoints, manifests = [], []
    for k in range(K):
        manifest = dataclasses.replace(store.manifest, splits=fold_splits(k))
        manifests.append(root / f"fold{k}.yaml")
        manifest.save(manifests[-1])
        run = train_from_store(store, root / f"run{k}", load_run_config(None, [*TINY, f"train.seed={k}"]), manifest=manifest)
        checkpoints.append(Path(run.best_path))
    torch.set_num_threads(threads)
    return Folds(store, checkpoints, manifests)


def _args(folds: Folds, out: Path, with_manifests: bool = True, n: int = K) -> list[str]:
    args = ["eval", "--store", str(folds.store.path), "--out", str(out), "--bootstrap", "50"]
    for k in range(n):
        args += ["--checkpoint", str(folds.checkpoints[k])]
        if with_manifests:
            args += ["--manifest", str(folds.manifests[k])]
    return args


def test_checkpoint_records_the_split_roles_it_was_trained_with(folds, tmp_path) -> None:
    for k, checkpoint in enumerate(folds.checkpoints):
        assert recorded_splits(checkpoint) == fold_splits(k)
        assert load_checkpoint(checkpoint).splits == fold_splits(k)
    payload = read_checkpoint(folds.checkpoints[0])
    del payload["splits"]  # as in checkpoints written before split roles were recorded
    old = save_checkpoint(payload, tmp_path / "old.pt")
    assert recorded_splits(old) is None
    assert load_checkpoint(old).splits is None


@pytest.mark.parametrize("source", ["manifests", "recorded"])
def test_three_folds_each_on_its_own_split_with_mean_and_std(folds, tmp_path, source) -> None:
    exports = [tmp_path / f"rankings.{ext}" for ext in ("csv", "jsonl", "h5")]
    args = _args(folds, tmp_path / "out", with_manifests=source == "manifests")
    args += [arg for path in exports for arg in ("--export", str(path))]
    if source == "recorded":
        args += ["--report", str(tmp_path / "report"), "--top-k", "3"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert f"Mean ± std over {K} folds" in result.output and "## Fold 2" in result.output

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(data) == {"folds", "summary"}
    assert [f["split_values"] for f in data["folds"]] == [[f"fold{k}"] for k in range(K)]
    assert [f["checkpoint"] for f in data["folds"]] == [str(p) for p in folds.checkpoints]
    assert data["summary"]["std_ddof"] == STD_DDOF == 1
    # Each fold is exactly what evaluating its checkpoint alone on its split gives.
    config = EvalConfig(metrics=MetricConfig(bootstrap=50))
    for k, fold in enumerate(data["folds"]):
        manifest = load_manifest(folds.manifests[k])
        alone = evaluate(load_checkpoint(folds.checkpoints[k]), folds.store, config, manifest).to_dict()
        assert {**fold, "fold": None} == {**alone, "fold": None}
    summary = {q["label"]: q for q in data["summary"]["queries"]}
    assert set(summary) == {"count", "age"}
    assert set(summary["age"]["metrics"]) >= {"class_acc", "class_mae", "srcc"}
    for label, q in summary.items():
        per_fold = [next(x for x in f["queries"] if x["label"] == label) for f in data["folds"]]
        assert q["n"] == sum(x["n"] for x in per_fold) and q["folds"] == list(range(K))
        for name, stat in q["metrics"].items():
            values = np.array([x["metrics"][name]["value"] for x in per_fold], dtype=np.float64)
            assert stat["values"] == pytest.approx(values.tolist())
            assert stat["mean"] == pytest.approx(np.mean(values))
            assert stat["std"] == pytest.approx(np.std(values, ddof=1))
    md = (tmp_path / "out" / "results.md").read_text()
    assert f"{summary['count']['metrics']['srcc']['mean']:.3f} ± {summary['count']['metrics']['srcc']['std']:.3f}" in md

    tables = [read_rankings(path) for path in exports]
    for table in tables:
        assert tuple(table) == COLUMNS + (FOLD_COLUMN,)
        np.testing.assert_array_equal(table[FOLD_COLUMN], tables[0][FOLD_COLUMN])
        np.testing.assert_array_equal(table["score"], tables[0]["score"])
    table = tables[0]
    for k in range(K):
        rows = table[FOLD_COLUMN] == k
        assert set(table["split"][rows]) == {f"fold{k}"}
        assert rows.sum() == 2 * len(folds.store.rows([f"fold{k}"]))  # two queries
    if source == "recorded":
        page = (tmp_path / "report" / "index.html").read_text()
        assert "00-fold-0-count-scatter.png" in page and "05-fold-2-age-top.png" in page
        assert "mean ± std" in page


@pytest.mark.parametrize("manifests", [1, 2, 4])
def test_mismatched_number_of_manifests_and_checkpoints_exits_2(folds, tmp_path, manifests) -> None:
    args = _args(folds, tmp_path / "out", with_manifests=False)
    args += [arg for k in range(manifests) for arg in ("--manifest", str(folds.manifests[k % K]))]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "one --manifest per --checkpoint" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_single_checkpoint_output_is_unchanged(folds, tmp_path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, [*_args(folds, out, with_manifests=False, n=1), "--export", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output
    # The store's own manifest is fold 0's, as a single checkpoint has always been evaluated.
    results = evaluate(load_checkpoint(folds.checkpoints[0]), folds.store, EvalConfig(metrics=MetricConfig(bootstrap=50)))
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results.to_dict()))
    assert (out / "results.md").read_text() == results_markdown(results)
    assert result.output.startswith(markdown_table(*results_table(results)) + "\n")
    assert tuple(read_rankings(tmp_path / "r.csv")) == COLUMNS


def test_single_checkpoint_with_a_manifest_uses_its_split(folds, tmp_path) -> None:
    args = ["eval", "--store", str(folds.store.path), "--out", str(tmp_path), "--bootstrap", "0",
            "--checkpoint", str(folds.checkpoints[1]), "--manifest", str(folds.manifests[1])]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "results.json").read_text())["split_values"] == ["fold1"]


def test_folds_without_recorded_splits_need_manifests(folds, tmp_path) -> None:
    payload = read_checkpoint(folds.checkpoints[1])
    del payload["splits"]
    old = save_checkpoint(payload, tmp_path / "old.pt")
    loaded = [load_checkpoint(folds.checkpoints[0]), load_checkpoint(old)]
    with pytest.raises(InputError, match="does not record the split roles"):
        evaluate_folds(loaded, folds.store, EvalConfig(metrics=MetricConfig(bootstrap=0)))
    manifests = [load_manifest(folds.manifests[0]), load_manifest(folds.manifests[1])]
    results = evaluate_folds(loaded, folds.store, EvalConfig(metrics=MetricConfig(bootstrap=0)), manifests)
    assert [f.split_values for f in results.folds] == [("fold0",), ("fold1",)]


def test_manifest_with_another_query_is_refused(folds, tmp_path) -> None:
    other = Manifest(name="x", shards="x.tar", labels=(LabelSpec("count", "Sort by something else."), LABELS[1]),
                     splits=fold_splits(1))
    with pytest.raises(InputError, match="asks 'Sort by something else.' for label 'count'"):
        evaluate(load_checkpoint(folds.checkpoints[1]), folds.store, EvalConfig(metrics=MetricConfig(bootstrap=0)), other)


@pytest.mark.parametrize(
    "values",
    [(0.5, 0.7, 0.6), (0.1, math.nan, 0.3, 0.2), (0.4,), (math.nan, math.nan), (1.0, 1.0, 1.0)],
)
def test_fold_stat_is_numpy_mean_and_sample_std_of_the_defined_folds(values) -> None:
    stat = fold_stat(values)
    finite = np.asarray(values)[np.isfinite(values)]
    assert stat.n_folds == len(finite)
    if len(finite):
        assert stat.mean == pytest.approx(np.mean(finite))
    else:
        assert math.isnan(stat.mean)
    if len(finite) >= 2:
        assert stat.std == pytest.approx(np.std(finite, ddof=1))
    else:
        assert math.isnan(stat.std)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".h5"])
def test_fold_column_round_trips_and_is_all_or_nothing(tmp_path, suffix) -> None:
    keys = np.array(["a", "b", "c"])
    rankings = [
        QueryRanking("q", keys, np.array([1.0, 3.0, 2.0]), np.array([1.0, np.nan, 2.0]), np.array(["fold0"] * 3), fold=0),
        QueryRanking("q", keys, np.array([2.0, 1.0, 3.0]), np.array([1.0, 2.0, 3.0]), np.array(["fold1"] * 3), fold=1),
    ]
    back = read_rankings(write_rankings(tmp_path / f"r{suffix}", rankings))
    assert back[FOLD_COLUMN].tolist() == [0, 0, 0, 1, 1, 1]
    assert back["key"].tolist() == ["b", "c", "a", "c", "a", "b"]
    np.testing.assert_array_equal(back["label"], [np.nan, 2.0, 1.0, 3.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="every ranking or none"):
        write_rankings(tmp_path / f"mixed{suffix}", [rankings[0], dataclasses.replace(rankings[1], fold=None)])
