"""Checkpoints: safe loading, atomic writes, round trip to predictions, target normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict, predict_labels
from rankpipe.adapter.training.checkpoint import read_checkpoint, save_checkpoint
from rankpipe.adapter.training.loop import spearman, train_from_store
from rankpipe.adapter.training.run_config import RunConfig
from rankpipe.adapter.training.targets import (
    TargetScale,
    fit_target_scale,
    transform_target,
)
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import TargetTransform

from conftest import SYNTHETIC_PROVENANCE as PROVENANCE
from conftest import tiny_config, write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A store and a short training run on it (best.pt, last.pt)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ckpt")
    store = write_synthetic_store(folder / "synthetic.zarr", distance_ref=None)
    result = train_from_store(store, folder / "run", tiny_config("train.max_steps=100"))
    return store, result


@pytest.mark.parametrize("name", ["best.pt", "last.pt"])
def test_checkpoints_load_with_weights_only(run, name):
    store, result = run
    payload = torch.load(result.best_path.parent / name, weights_only=True)
    assert payload["rankpipe_checkpoint"] == 1 and payload["kind"] == name[:-3]
    assert RunConfig.from_json(payload["run_config"]) == tiny_config("train.max_steps=100")
    assert payload["provenance"] == store.provenance
    assert [entry["name"] for entry in payload["labels"]] == ["count", "size"]
    for entry in payload["labels"]:
        assert entry["query"] == store.query(entry["name"])
        text = store.text(entry["name"])
        assert entry["text_tokens_shape"] == [text.length, text.tokens.shape[1]]
        assert np.array_equal(entry["text_tokens"].numpy(), text.tokens[: text.length])
        assert set(entry["target"]) == {"kind", "reference", "mean", "std"}
    assert ("optimizer" in payload) == (name == "last.pt")
    assert payload["step"] == (result.best_step if name == "best.pt" else 100)


def test_loaded_checkpoint_reproduces_the_recorded_validation(run):
    store, result = run
    loaded = load_checkpoint(result.best_path)
    assert not loaded.ranker.model.training and loaded.step == result.best_step
    for name in ("count", "size"):
        rows = store.rows(store.manifest.splits.values("val"), label=name)
        scores = predict(loaded, store, name, rows, batch_size=7)
        assert spearman(scores, store.label(name)[rows]) == pytest.approx(result.best_srcc[name], abs=1e-12)
        again = predict(load_checkpoint(result.best_path.parent), store, name, rows, batch_size=7)  # folder = best.pt
        np.testing.assert_array_equal(scores, again)
        # Other batch sizes change only float rounding.
        np.testing.assert_allclose(predict(loaded, store, name, rows, batch_size=256), scores, rtol=1e-5)


def test_predictions_are_in_label_units_and_row_order(run):
    store, result = run
    loaded = load_checkpoint(result.best_path)
    rows = store.rows(["val"], label="count")
    labels = store.label("count")[rows]
    scores = predict(loaded, store, "count", rows)
    # Normalised scores would have mean ~0 and std ~1; label units have mean ~5 and std ~2.9.
    assert abs(scores.mean() - labels.mean()) < 1.0
    assert np.corrcoef(scores, labels)[0, 1] > 0.7
    tokens = torch.from_numpy(store.image_tokens(rows))
    with torch.no_grad():
        normalised = loaded.ranker.model(tokens, loaded.labels["count"].text_tokens, with_pairs=False).scores.numpy()
    scale = loaded.scales["count"]
    np.testing.assert_allclose(scores, normalised * scale.std + scale.mean, rtol=1e-5)
    shuffled = np.random.default_rng(0).permutation(rows)
    np.testing.assert_allclose(predict(loaded, store, "count", shuffled), scores[np.searchsorted(rows, shuffled)], rtol=1e-6)


def test_predict_labels_reads_once_and_equals_predict_per_label(run):
    store, result = run
    loaded = load_checkpoint(result.best_path)
    rows = np.random.default_rng(1).permutation(store.rows(["val"]))
    together = predict_labels(loaded, store, ["count", "size"], rows, batch_size=7)
    for name in ("count", "size"):
        np.testing.assert_array_equal(together[name], predict(loaded, store, name, rows, batch_size=7))


def test_predict_refuses_another_backbone_and_unknown_labels(run, tmp_path):
    store, result = run
    loaded = load_checkpoint(result.best_path)
    for field, value in (("model", "other"), ("seed", 1), ("image_size", [64, 64])):
        other = write_synthetic_store(tmp_path / f"{field}.zarr", provenance={**PROVENANCE, field: value})
        with pytest.raises(InputError, match=field):
            predict(loaded, other, "count", other.rows(["val"]))
    with pytest.raises(InputError, match="not trained on label 'age'"):
        predict(loaded, store, "age", store.rows(["val"]))


def test_distance_predictions_are_in_target_units(tmp_path):
    store = write_synthetic_store(tmp_path / "d.zarr", distance_ref=5.0)
    result = train_from_store(store, tmp_path / "run", tiny_config("train.max_steps=40"), labels=["count"])
    loaded = load_checkpoint(result.best_path)
    assert loaded.scales["count"].transform == TargetTransform("distance", 5.0)
    rows = store.rows(["val"], label="count")
    scores = predict(loaded, store, "count", rows)
    targets = -np.abs(store.label("count")[rows] - 5.0)
    assert abs(scores.mean() - targets.mean()) < 1.0 and scores.mean() < 0


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint({"rankpipe_checkpoint": 1, "step": 1}, path)
    save_checkpoint({"rankpipe_checkpoint": 1, "step": 2}, path)
    assert read_checkpoint(path)["step"] == 2
    with pytest.raises(Exception):
        save_checkpoint({"rankpipe_checkpoint": 1, "step": 3, "bad": lambda: None}, path)
    assert read_checkpoint(path)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


@pytest.mark.parametrize("content", ["missing", "garbage", "foreign"])
def test_reading_a_non_checkpoint_is_an_input_error(tmp_path, content):
    path = tmp_path / "x.pt"
    if content == "garbage":
        path.write_bytes(b"not a torch file")
    elif content == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(InputError, match="x.pt") as error:
        load_checkpoint(path)
    # One line that says what to pass, not torch's advice on unpickling.
    assert "\n" not in str(error.value) and "rankpipe train" in str(error.value)


@pytest.mark.parametrize(
    "transform,raw,expected",
    [
        (TargetTransform(), [1.0, 4.0, np.nan], [1.0, 4.0, np.nan]),
        (TargetTransform("distance", 3.0), [1.0, 3.0, 6.0], [-2.0, 0.0, -3.0]),
    ],
)
def test_target_transform(transform, raw, expected):
    np.testing.assert_array_equal(transform_target(np.array(raw), transform), np.array(expected))


@pytest.mark.parametrize("transform", [TargetTransform(), TargetTransform("distance", 2.5)])
def test_normalisation_round_trip(transform):
    raw = np.random.default_rng(0).uniform(0, 10, 50)
    scale = fit_target_scale(raw, transform, "x")
    normalised = scale.normalise(raw)
    assert normalised.mean() == pytest.approx(0, abs=1e-12) and normalised.std() == pytest.approx(1)
    np.testing.assert_allclose(scale.to_target_units(normalised), transform_target(raw, transform))
    restored = TargetScale.from_dict(json.loads(json.dumps(scale.to_dict())))
    assert restored == scale


@pytest.mark.parametrize("raw,match", [([3.0], "at least 2"), ([2.0, 2.0, 2.0], "same target")])
def test_normalisation_refuses_unlearnable_labels(raw, match):
    with pytest.raises(InputError, match=match):
        fit_target_scale(np.array(raw), TargetTransform(), "x")


def test_a_tampered_checkpoint_is_refused_before_anything_is_allocated(run, tmp_path):
    _, result = run
    payload = torch.load(result.best_path, weights_only=True)

    missing = {k: v for k, v in payload.items() if k != "dims"}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(InputError, match="lacks its 'dims' field"):
        load_checkpoint(tmp_path / "missing.pt")

    config = json.loads(payload["run_config"])
    config["adapter"]["d_model"] = 32768  # at the real sizes this adapter would take many GB
    torch.save({**payload, "run_config": json.dumps(config)}, tmp_path / "huge.pt")
    with pytest.raises(InputError, match=r"has shape \(.*\) where its run config gives \(.*(32768|65536)"):
        load_checkpoint(tmp_path / "huge.pt")
