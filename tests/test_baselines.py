"""Baselines: the registry, zero-shot and CLIP-IQA against a direct open_clip computation, the ridge
probe against a closed form, checkpoints that `rankpipe eval` reads, and the CLI's errors."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import open_clip
import pytest
import scipy.stats
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from rankpipe.adapter.baselines import get_method, method_names
from rankpipe.adapter.baselines.clip_iqa import antonym_pair
from rankpipe.adapter.baselines.data import LabelSplits, load_label_splits
from rankpipe.adapter.baselines.fit import method_config, train_baseline
from rankpipe.adapter.baselines.linear_probe import LinearProbeConfig
from rankpipe.adapter.baselines.prompts import PromptEncoder, fit_affine
from rankpipe.adapter.baselines.zero_shot import count_category
from rankpipe.adapter.evaluation.folds import recorded_splits
from rankpipe.adapter.evaluation.scoring import (
    load_checkpoint,
    predict,
)
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.targets import fit_target_scale
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import TargetTransform
from rankpipe.pipeline.embed.backbone import TINY_VIT
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

from conftest import assert_rank_matches_store, embedding_scores, read_tar_samples, tiny_config

BASELINES = ["zero-shot", "clip-iqa", "linear-probe"]


@pytest.fixture(scope="module")
def store(tiny_store):
    return TokenStore.open(tiny_store)


@pytest.fixture(scope="module")
def fitted(store, tmp_path_factory):
    """One checkpoint per baseline, fitted on the tiny store's two labels."""
    out = tmp_path_factory.mktemp("baselines")
    return {m: train_baseline(store, out / m, m) for m in BASELINES}


@pytest.fixture(scope="module")
def direct(store):
    """open_clip built directly with the store's recorded seed, and fp16 image embeddings of the val rows
    computed from the tars as a user would (decode, preprocess, encode_image)."""
    torch.manual_seed(store.provenance["seed"])
    # The store's resize mode, in open_clip's own words ("squash" for rankpipe's default).
    resize_mode = store.provenance["preprocess"]["resize_mode"]
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_VIT, pretrained=None, image_resize_mode=resize_mode)
    model.eval()
    images = {}
    for url in store.tar_urls():
        for sample in read_tar_samples(url):
            data = sample.get("jpg", sample.get("png"))
            images[sample["__key__"]] = preprocess(Image.open(io.BytesIO(data)).convert("RGB"))
    rows = store.rows(["val"])
    batch = torch.stack([images[k] for k in store.keys()[rows]])  # [n, 3, H, W]
    with torch.inference_mode():
        embed = model.encode_image(batch).to(torch.float16)  # [n, E] rounded as the store keeps it
    return model, open_clip.get_tokenizer(TINY_VIT), rows, embed


def _text(model, tokenizer, prompts):
    with torch.inference_mode():
        return F.normalize(model.encode_text(tokenizer(prompts)).double(), dim=-1)  # [K, E]


def test_registry_lists_methods_and_refuses_unknown_names():
    assert method_names() == ["adapter", *sorted([*BASELINES, "coop", "l2rclip", "ordinalclip", "rank-axis", "text-axis"])]
    with pytest.raises(InputError, match="unknown method 'cop'.*adapter, clip-iqa, coop, l2rclip, linear-probe, ordinalclip, rank-axis, text-axis, zero-shot"):
        get_method("cop")


def test_direct_model_is_the_store_backbone(store, direct):
    _, _, rows, embed = direct
    np.testing.assert_allclose(embed.float().numpy(), store.image_embed(rows).astype(np.float32), atol=2e-3)


@pytest.mark.parametrize("label", ["squares", "brightness"])
def test_zero_shot_equals_direct_open_clip(fitted, direct, label):
    model, tokenizer, _, embed = direct
    baseline = load_checkpoint(fitted["zero-shot"].path).ranker.baseline
    image = F.normalize(embed.double(), dim=-1)  # [n, E]
    if label == "squares":  # a counting query: expected count over "A photo of {k} squares."
        text = _text(model, tokenizer, [f"A photo of {k} squares." for k in range(11)])  # [11, E]
        expected = torch.softmax(100 * image @ text.T, dim=-1) @ torch.arange(11, dtype=torch.float64)
    else:  # plain cosine with the query
        expected = (image @ _text(model, tokenizer, ["Sort images by brightness."]).T)[:, 0]
    raw = baseline.raw_scores(label, embed.numpy())
    np.testing.assert_allclose(raw, expected.numpy(), rtol=1e-5, atol=1e-6)
    p = baseline.params[label]
    np.testing.assert_allclose(baseline.predict(label, embed.numpy()), p["slope"] * raw + p["intercept"])


def test_zero_shot_scores_named_ordinal_classes_by_expectation(store, direct, tmp_path):
    """An ordinal label with class names: one prompt per class, the expected class value, no affine map."""
    model, tokenizer, _, embed = direct
    names = ("none", "one", "two", "three", "four", "five")
    labels = tuple(
        dataclasses.replace(label, metric="ordinal", classes=(5.0, 4.0, 3.0, 2.0, 1.0, 0.0), class_names=names[::-1],
                            class_prompt="A picture of {name} squares.")
        if label.name == "squares" else label
        for label in store.manifest.labels
    )
    manifest = dataclasses.replace(store.manifest, labels=labels)
    result = train_baseline(store, tmp_path / "zs", "zero-shot", manifest=manifest)
    baseline = load_checkpoint(result.path).ranker.baseline
    image = F.normalize(embed.double(), dim=-1)  # [n, E]
    text = _text(model, tokenizer, [f"A picture of {n} squares." for n in names])  # [6, E], classes 0..5
    expected = torch.softmax(100 * image @ text.T, dim=-1) @ torch.arange(6, dtype=torch.float64)  # [n]
    np.testing.assert_allclose(baseline.predict("squares", embed.numpy()), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert (baseline.params["squares"]["slope"], baseline.params["squares"]["intercept"]) == (1.0, 0.0)
    # The continuous label keeps the cosine with its query and the affine map.
    cosine = (image @ _text(model, tokenizer, ["Sort images by brightness."]).T)[:, 0]
    np.testing.assert_allclose(baseline.raw_scores("brightness", embed.numpy()), cosine.numpy(), rtol=1e-5, atol=1e-6)
    assert baseline.params["brightness"]["slope"] != 1.0
    # Named classes without a class prompt fall back to the method's own.
    plain = tuple(dataclasses.replace(label, class_prompt=None) for label in labels)
    splits = load_label_splits(LabelledStore.open(store, dataclasses.replace(manifest, labels=plain), ["squares"]))
    fitted = get_method("zero-shot").fit(method_config(get_method("zero-shot"), []), splits, PromptEncoder(store.provenance))
    assert fitted.params["squares"]["prompts"] == [f"A photo of {n}." for n in names]


@pytest.mark.parametrize("label, pair", [("squares", ("Good photo.", "Bad photo.")),
                                         ("brightness", ("Bright photo.", "Dark photo."))])
def test_clip_iqa_equals_direct_open_clip(fitted, direct, label, pair):
    model, tokenizer, _, embed = direct
    baseline = load_checkpoint(fitted["clip-iqa"].path).ranker.baseline
    image = F.normalize(embed.double(), dim=-1)
    text = _text(model, tokenizer, list(pair))  # [2, E]
    expected = torch.softmax(100 * image @ text.T, dim=-1)[:, 0]
    assert baseline.params[label]["prompts"] == list(pair)
    np.testing.assert_allclose(baseline.raw_scores(label, embed.numpy()), expected.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", BASELINES)
def test_predictions_are_in_label_units(store, fitted, method):
    loaded = load_checkpoint(fitted[method].path)
    assert loaded.method == method and loaded.ranker.reads == "embed"
    for split in load_label_splits(LabelledStore.open(store, labels=store.label_names)):
        rows = store.rows(["train"], label=split.name)
        pred = predict(loaded, store, split.name, rows[::-1], batch_size=5)[::-1]  # unsorted rows, several batches
        assert np.isfinite(pred).all()
        # Least-squares fits with an intercept reproduce the training targets' mean exactly.
        assert pred.mean() == pytest.approx(split.train_targets.mean(), rel=1e-6)
        np.testing.assert_allclose(pred, embedding_scores(loaded, split.name, store.image_embed(rows)))
    assert set(loaded.val_srcc) == {"squares", "brightness"}
    assert recorded_splits(fitted[method].path) == store.manifest.splits


@pytest.mark.parametrize("method", BASELINES)
def test_rankpipe_eval_reads_a_baseline_checkpoint(tiny_store, fitted, method, tmp_path):
    result = CliRunner().invoke(cli, ["eval", "--store", str(tiny_store), "--checkpoint", str(fitted[method].path),
                                      "--split", "test", "--bootstrap", "20", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    queries = json.loads((tmp_path / "results.json").read_text())["queries"]
    assert {q["label"] for q in queries} == {"squares", "brightness"}


@pytest.mark.parametrize("method", BASELINES)
def test_rankpipe_rank_scores_like_the_store(store, fitted, method):
    from rankpipe.adapter.evaluation.rank import RankConfig, rank_images

    assert_rank_matches_store(fitted[method].path, store, "squares")
    urls = store.tar_urls()
    pattern = urls[0] if len(urls) == 1 else "{" + ",".join(urls) + "}"
    with pytest.raises(InputError, match="rank by one of them"):
        rank_images(fitted[method].path, pattern, RankConfig(("Sort images by something unseen.",)))


def _synthetic_splits(seed: int, n_train: int = 40, n_val: int = 25, dim: int = 8) -> LabelSplits:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    x_train, x_val = rng.normal(size=(n_train, dim)) * 3 + 1, rng.normal(size=(n_val, dim)) * 3 + 1
    y_train = x_train @ w + rng.normal(size=n_train) * 4
    y_val = x_val @ w + rng.normal(size=n_val) * 4
    scale = fit_target_scale(y_train, TargetTransform(), "y")
    return LabelSplits("y", "Sort images by y.", scale, x_train.astype(np.float32), y_train,
                       x_val.astype(np.float32), y_val)


@pytest.mark.parametrize("select_by", ["srcc", "mse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ridge_matches_the_closed_form_and_picks_the_best_val_penalty(select_by, seed):
    split = _synthetic_splits(seed)
    config = LinearProbeConfig(min_penalty=1e-3, max_penalty=1e2, num_penalties=6, select_by=select_by)
    probe = get_method("linear-probe").fit(config, [split], prompts=None)
    x, y = split.train_embed.astype(np.float64), split.train_targets
    xc, yc = x - x.mean(0), y - y.mean()
    trace = float(np.trace(xc.T @ xc)) / x.shape[1]

    def solve(alpha):  # ridge as an augmented least-squares problem, a different path than the normal equations
        a = np.vstack([xc, np.sqrt(alpha * trace) * np.eye(x.shape[1])])
        w = np.linalg.lstsq(a, np.concatenate([yc, np.zeros(x.shape[1])]), rcond=None)[0]
        return w, y.mean() - x.mean(0) @ w

    val = []
    for alpha in np.geomspace(1e2, 1e-3, 6):
        w, b = solve(alpha)
        pred = split.val_embed.astype(np.float64) @ w + b
        val.append(scipy.stats.spearmanr(pred, split.val_targets).statistic if select_by == "srcc"
                   else -np.mean((pred - split.val_targets) ** 2))
    best = np.geomspace(1e2, 1e-3, 6)[int(np.argmax(val))]
    p = probe.params["y"]
    assert p["relative_penalty"] == pytest.approx(best)
    np.testing.assert_allclose(p["grid_val_scores"], val, rtol=1e-8)
    w, b = solve(best)
    np.testing.assert_allclose(p["weights"].numpy(), w, rtol=1e-8, atol=1e-10)
    assert p["bias"] == pytest.approx(b, rel=1e-8)


def test_ridge_penalty_selection_changes_with_the_grid():
    split = _synthetic_splits(2)
    tight = get_method("linear-probe").fit(LinearProbeConfig(1e3, 1e4, 2), [split], None)
    loose = get_method("linear-probe").fit(LinearProbeConfig(1e-4, 1e-3, 2), [split], None)
    assert tight.params["y"]["relative_penalty"] >= 1e3 > loose.params["y"]["relative_penalty"]
    # A heavy penalty shrinks the weights towards zero.
    assert np.linalg.norm(tight.params["y"]["weights"]) < 0.1 * np.linalg.norm(loose.params["y"]["weights"])


@pytest.mark.parametrize("slope", [2.5, -0.7])
def test_affine_map_is_least_squares_and_keeps_its_sign(slope):
    rng = np.random.default_rng(0)
    s = rng.normal(size=50)
    t = slope * s + 3 + rng.normal(size=50) * 0.1
    fitted_slope, intercept = fit_affine(s, t, "test")
    np.testing.assert_allclose([fitted_slope, intercept], np.polyfit(s, t, 1), rtol=1e-10)
    assert np.sign(fitted_slope) == np.sign(slope)


def test_affine_map_of_constant_scores_predicts_the_train_mean():
    assert fit_affine(np.ones(5), np.arange(5.0), "test") == (0.0, 2.0)


@pytest.mark.parametrize("query, category", [
    ("Sort images by the number of cats.", "cats"),
    ("sort images by the number of red discs", "red discs"),
    ("Sort images by brightness.", None),
    ("Sort images by the number of.", None),
])
def test_count_category(query, category):
    assert count_category(query) == category


@pytest.mark.parametrize("query, positive", [
    ("Sort images by the image quality.", "Good photo."),
    ("Sort images by the image quality of colorfulness.", "Colorful photo."),
    ("Sort images by the image quality of contrast.", "High contrast photo."),
    ("Sort images by brightness.", "Bright photo."),
    ("Sort images by the amount of blur.", "Blurry photo."),
    ("Sort images by the amount of noise.", "Noisy photo."),
    ("Sort images by the number of cats.", "Good photo."),
])
def test_antonym_pair_is_chosen_by_the_query_words(query, positive):
    assert antonym_pair(query).positive == positive


def test_method_settings_overrides(store, tmp_path):
    cls = get_method("zero-shot")
    assert method_config(cls, ["max_count=3"]).max_count == 3
    with pytest.raises(InputError, match="unknown field 'bogus'"):
        method_config(cls, ["bogus=1"])
    with pytest.raises(InputError, match="max_count must be >= 1"):
        method_config(cls, ["max_count=0"])
    result = train_baseline(store, tmp_path, "zero-shot", ["max_count=3"], labels=["squares"])
    baseline = load_checkpoint(result.path).ranker.baseline
    assert baseline.params["squares"]["prompts"] == [f"A photo of {k} squares." for k in range(4)]
    assert list(load_checkpoint(result.path).labels) == ["squares"]


@pytest.mark.parametrize("setting, message", [
    ("class_prompt=A {name} in {era}.", r"class_prompt may use only the placeholder \{name\}"),
    ("class_prompt=A {0} photo of {name}.", r"class_prompt may use only the placeholder \{name\}"),
    ("class_prompt=A photo of {name", r"class_prompt may use only the placeholder \{name\}"),
    ("class_prompt=A photo.", r"class_prompt must contain \{name\}"),
    ("count_prompt={count} {category} at {place}", r"count_prompt may use only the placeholders \{count\} and \{category\}"),
])
def test_zero_shot_templates_are_checked_by_formatting_them(setting, message):
    with pytest.raises(InputError, match=message):
        method_config(get_method("zero-shot"), [setting])


@pytest.mark.parametrize("args, message", [
    (["--method", "cop"], "unknown method 'cop'; choose one of: adapter, clip-iqa, coop, l2rclip, linear-probe, ordinalclip, rank-axis, text-axis, zero-shot"),
    (["--method", "zero-shot", "--max-steps", "3"], "--max-steps: option(s) of adapter training"),
    (["--method", "linear-probe", "--set", "select_by=mae"], "select_by"),
    (["--backbone-weights", "w.pt"], "--backbone-weights is for baselines"),
])
def test_cli_errors_exit_2(tiny_store, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["train", "--store", str(tiny_store), "--out", str(tmp_path / "run"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run" / "best.pt").exists()


def test_cli_fits_a_baseline(tiny_store, tmp_path):
    result = CliRunner().invoke(cli, ["train", "--store", str(tiny_store), "--out", str(tmp_path),
                                      "--method", "linear-probe", "--label", "brightness", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "fitted linear-probe; val SRCC: brightness" in result.output
    loaded = load_checkpoint(tmp_path)
    assert loaded.method == "linear-probe" and list(loaded.labels) == ["brightness"]


def test_a_fit_never_replaces_an_existing_run(store, fitted, tmp_path):
    """Baseline over an adapter run, baseline over baseline, adapter over baseline: refused, files untouched."""
    adapter_run = tmp_path / "adapter"
    train_from_store(store, adapter_run, tiny_config("train.max_steps=2", "train.eval_every=1"))
    before = {p.name: p.read_bytes() for p in adapter_run.iterdir()}
    with pytest.raises(InputError, match="already holds an adapter run"):
        train_baseline(store, adapter_run, "linear-probe")
    assert {p.name: p.read_bytes() for p in adapter_run.iterdir()} == before

    baseline_run = fitted["zero-shot"].path.parent
    best = (baseline_run / "best.pt").read_bytes()
    with pytest.raises(InputError, match="already holds a zero-shot baseline"):
        train_baseline(store, baseline_run, "linear-probe")
    with pytest.raises(InputError, match="already holds a zero-shot baseline"):
        train_from_store(store, baseline_run, tiny_config("train.max_steps=2"))
    assert (baseline_run / "best.pt").read_bytes() == best
    assert sorted(p.name for p in baseline_run.iterdir()) == ["best.pt"]
