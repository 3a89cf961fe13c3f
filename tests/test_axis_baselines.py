"""The rank-axis and text-axis baselines: scores against a direct numpy / open_clip computation from
the store's cached embeddings, the choice of the k extremes, and train / eval / rank through the CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner

from rankpipe.adapter.baselines import get_method
from rankpipe.adapter.baselines.data import LabelSplits, load_label_splits
from rankpipe.adapter.baselines.fit import method_config, train_baseline
from rankpipe.adapter.baselines.rank_axis import extreme_rows
from rankpipe.adapter.baselines.text_axis import TextAxisConfig, axis_prompts, query_attribute
from rankpipe.adapter.evaluation.rank import RankConfig
from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict
from rankpipe.adapter.evaluation.store_rank import rank_store
from rankpipe.adapter.experiments.bench.variants import get_variant
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.datasets.photo_tasks import PhotoTasksConfig, build_photo_tasks
from rankpipe.pipeline.datasets.photo_tasks.sources import SourcesConfig
from rankpipe.pipeline.embed.backbone import TINY_VIT
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

from conftest import assert_rank_matches_store, embedding_scores

# Fitted runs: name -> (method, settings).
RUNS = {"rank-axis": ("rank-axis", ()), "rank-axis-k3": ("rank-axis", ("k=3",)),
        "rank-axis-all": ("rank-axis", ("k=all",)), "text-axis": ("text-axis", ())}
LABELS = ["squares", "brightness"]


@pytest.fixture(scope="module")
def store(tiny_store):
    return TokenStore.open(tiny_store)


@pytest.fixture(scope="module")
def splits(store) -> dict[str, LabelSplits]:
    return {s.name: s for s in load_label_splits(LabelledStore.open(store, labels=store.label_names))}


@pytest.fixture(scope="module")
def fitted(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("axis_baselines")
    return {name: train_baseline(store, out / name, method, settings) for name, (method, settings) in RUNS.items()}


def _unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _least_squares(scores, targets) -> tuple[float, float]:
    slope, intercept = np.polyfit(scores, targets, 1)
    return float(slope), float(intercept)


def test_splits_are_the_stores_cached_embeddings(store, splits):
    for label, split in splits.items():
        rows = store.rows(["train"], label=label)
        np.testing.assert_array_equal(split.train_embed, store.image_embed(rows).astype(np.float32))
        np.testing.assert_array_equal(split.train_targets, store.label(label)[rows].astype(np.float64))


@pytest.mark.parametrize("run, k", [("rank-axis", 1), ("rank-axis-k3", 3)])
@pytest.mark.parametrize("label", LABELS)
def test_rank_axis_is_the_difference_of_the_extremes_means(store, splits, fitted, run, k, label):
    split = splits[label]
    t = split.train_targets
    # The k lowest and highest by target, ties to the earlier train row (lexsort: last key is primary).
    positions = np.arange(t.size)
    low = np.lexsort((positions, t))[:k]
    high = np.lexsort((positions, -t))[:k]
    x = _unit(split.train_embed)  # [n, E]
    axis = _unit(x[high].mean(0) - x[low].mean(0))  # [E]
    used = np.concatenate([low, high])
    slope, intercept = _least_squares(x[used] @ axis, t[used])
    rows = store.rows()
    expected = slope * (_unit(store.image_embed(rows)) @ axis) + intercept

    loaded = load_checkpoint(fitted[run].path)
    params = loaded.ranker.baseline.params[label]
    assert params["low_rows"] == low.tolist() and params["high_rows"] == high.tolist()
    assert params["fit_images"] == 2 * k and slope > 0
    np.testing.assert_allclose(predict(loaded, store, label, rows[::-1], batch_size=7)[::-1], expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(embedding_scores(loaded, label, store.image_embed(rows)), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("label", LABELS)
def test_rank_axis_all_is_the_ridge_direction_on_unit_embeddings(store, splits, fitted, label):
    split = splits[label]
    loaded = load_checkpoint(fitted["rank-axis-all"].path)
    params = loaded.ranker.baseline.params[label]
    x, y = _unit(split.train_embed), split.train_targets
    xc = x - x.mean(0)
    weights = np.linalg.solve(xc.T @ xc + params["penalty"] * np.eye(x.shape[1]), xc.T @ (y - y.mean()))  # [E]
    axis = _unit(weights)
    slope, intercept = _least_squares(x @ axis, y)
    rows = store.rows()
    expected = slope * (_unit(store.image_embed(rows)) @ axis) + intercept
    assert params["fit_images"] == y.size
    np.testing.assert_allclose(predict(loaded, store, label, rows), expected, rtol=1e-7, atol=1e-8)


@pytest.fixture(scope="module")
def text_tower(store):
    """open_clip built directly with the store's recorded seed: the text tower the store's backbone has."""
    torch.manual_seed(store.provenance["seed"])
    model, _, _ = open_clip.create_model_and_transforms(TINY_VIT, pretrained=None)
    return model.eval(), open_clip.get_tokenizer(TINY_VIT)


@pytest.mark.parametrize("label, prompts", [("squares", ["A photo of many squares.", "A photo of no squares."]),
                                            ("brightness", ["A photo with high brightness.", "A photo with low brightness."])])
def test_text_axis_is_the_high_minus_low_prompt_direction(store, splits, fitted, text_tower, label, prompts):
    model, tokenizer = text_tower
    with torch.inference_mode():
        text = _unit(model.encode_text(tokenizer(prompts)).double().numpy())  # [2, E]
    axis = _unit(text[0] - text[1])
    split = splits[label]
    slope, intercept = _least_squares(_unit(split.train_embed) @ axis, split.train_targets)
    rows = store.rows()
    embed = store.image_embed(rows)
    raw = _unit(embed) @ axis

    loaded = load_checkpoint(fitted["text-axis"].path)
    baseline = loaded.ranker.baseline
    assert baseline.params[label]["prompts"] == prompts
    np.testing.assert_allclose(baseline.raw_scores(label, embed), raw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(predict(loaded, store, label, rows), slope * raw + intercept, rtol=1e-4, atol=1e-5)


def test_text_axis_prompts_are_settable_and_checked():
    config = method_config(get_method("text-axis"), ["high_prompt=An old {attribute}.", "low_prompt=A new {attribute}."])
    assert axis_prompts("Sort images by the age of the car.", config) == ("An old age of the car.", "A new age of the car.")
    assert axis_prompts("Sort images by the number of cats", config) == ("A photo of many cats.", "A photo of no cats.")
    assert query_attribute("How sharp is it?") == "How sharp is it?"
    with pytest.raises(InputError, match="only the placeholder"):
        method_config(get_method("text-axis"), ["high_prompt=A photo of {count}."])
    with pytest.raises(InputError, match="must differ"):
        method_config(get_method("text-axis"), ["high_prompt=x {attribute}", "low_prompt=x {attribute}"])
    with pytest.raises(ValueError, match="must differ"):
        TextAxisConfig(count_high_prompt="{category}", count_low_prompt="{category}")


def test_extremes_break_ties_by_train_order():
    targets = np.array([3.0, 1.0, 1.0, 5.0, 5.0, 2.0, 1.0])
    low, high = extreme_rows(targets, 1, "y")
    assert low.tolist() == [1] and high.tolist() == [3]
    low, high = extreme_rows(targets, 3, "y")
    assert low.tolist() == [1, 2, 6] and high.tolist() == [3, 4, 0]



def test_extremes_never_share_an_image_when_targets_tie():
    low, high = extreme_rows(np.array([1.0, 1.0, 1.0, 2.0]), 2, "y")
    assert low.tolist() == [0, 1] and high.tolist() == [3, 2]
    low, high = extreme_rows(np.ones(6), 3, "y")  # all equal: the first half is low, the rest high
    assert low.tolist() == [0, 1, 2] and high.tolist() == [3, 4, 5]


@pytest.mark.parametrize("n, k", [(5, 3), (1, 1)])
def test_more_extremes_than_half_the_split_is_refused(n, k):
    with pytest.raises(InputError, match=rf"k={k} needs 2k = {2 * k} train images but the train split has {n}"):
        extreme_rows(np.arange(n, dtype=float), k, "y")
    low, high = extreme_rows(np.arange(2 * k, dtype=float), k, "y")  # exactly half per end is allowed
    assert set(low) | set(high) == set(range(2 * k))


@pytest.mark.parametrize("setting, message", [("k=0", "positive integer or 'all'"), ("k=many", "field 'k' expects"),
                                              ("normalize=maybe", "field 'normalize' expects")])
def test_bad_settings_are_input_errors(setting, message):
    with pytest.raises(InputError, match=message):
        method_config(get_method("rank-axis"), [setting])


def test_cli_refuses_k_beyond_half_the_train_split_and_writes_nothing(tiny_store, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--store", str(tiny_store), "--out", str(out), "--method", "rank-axis",
                                      "--set", "k=10", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "k=10 needs 2k = 20 train images but the train split has 18" in result.output
    assert not (out / "best.pt").exists()


@pytest.mark.parametrize("method, settings", [("rank-axis", ["--set", "k=2"]), ("text-axis", [])])
def test_cli_trains_evaluates_and_ranks(tiny_store, store, tmp_path, method, settings):
    run = tmp_path / method
    runner = CliRunner()
    result = runner.invoke(cli, ["train", "--store", str(tiny_store), "--out", str(run), "--method", method, *settings,
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    checkpoint = run / "best.pt"
    loaded = load_checkpoint(checkpoint)
    assert loaded.method == method and loaded.ranker.reads == "embed"

    result = runner.invoke(cli, ["eval", "--store", str(tiny_store), "--checkpoint", str(checkpoint), "--split", "test",
                                 "--bootstrap", "20", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    queries = json.loads((tmp_path / "eval" / "results.json").read_text())["queries"]
    assert {q["label"] for q in queries} == set(LABELS)

    # rank --images over the store's own tars scores every image as the store's cached embeddings do.
    assert_rank_matches_store(checkpoint, store, "squares")

    # rank --store: the same scores from the cached embeddings.
    out = tmp_path / "store_rank.csv"
    result = runner.invoke(cli, ["rank", "--store", str(tiny_store), "--checkpoint", str(checkpoint),
                                 "--query", store.query("brightness"), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as f:
        got = {row["key"]: float(row["score"]) for row in csv.DictReader(f)}
    rows = store.rows()
    expected = dict(zip(store.keys()[rows], predict(loaded, store, "brightness", rows)))
    assert set(got) == set(expected)
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=1e-6, atol=1e-9)


def test_library_store_rank_refuses_an_unfitted_query(tiny_store, fitted):
    with pytest.raises(InputError, match="scores only the queries it was fitted on"):
        rank_store(fitted["rank-axis"].path, tiny_store, RankConfig(("Sort images by something unseen.",)), device="cpu")


def test_bench_rows_name_the_methods_and_settings():
    assert (get_variant("rank-axis").method, get_variant("rank-axis").overrides) == ("rank-axis", ())
    assert (get_variant("rank-axis-all").method, get_variant("rank-axis-all").overrides) == ("rank-axis", ("k=all",))
    assert get_variant("text-axis").method == "text-axis"
    method_config(get_method("rank-axis"), get_variant("rank-axis-all").overrides)  # the row's settings parse


def test_bench_fits_the_axis_rows(tmp_path):
    tasks = tmp_path / "tasks"
    build_photo_tasks(tasks, PhotoTasksConfig(images={"quality": 40, "attributes": 12, "counting": 36}, image_size=64,
                                              sources=SourcesConfig(mode="builtin"), samples_per_tar=1000))
    out = tmp_path / "bench"
    result = CliRunner().invoke(cli, ["bench", "--tasks", str(tasks), "--model", TINY_VIT, "--pretrained", "none",
                                      "--variants", "rank-axis,rank-axis-all,text-axis", "--seeds", "1", "--out", str(out),
                                      "--quick", "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    with (out / "results.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["variant"] for r in rows} == {"rank-axis", "rank-axis-all", "text-axis"}
    assert {r["section"] for r in rows} == {"trained"}
    k = {v: load_checkpoint(out / "runs" / v / "seed0" / "best.pt").ranker.baseline.config.k
         for v in ("rank-axis", "rank-axis-all")}
    assert k == {"rank-axis": 1, "rank-axis-all": "all"}
