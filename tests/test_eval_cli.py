"""`rankpipe eval` on an in-memory store with the TokenStore read API and a tiny trained adapter."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from scipy import stats

from rankpipe.adapter.evaluation import command as eval_command_module
from rankpipe.adapter.evaluation.command import EvalRequest, run_evaluation
from rankpipe.adapter.evaluation.contact_sheet import read_thumbnails
from rankpipe.adapter.evaluation.evaluate import EvalConfig, evaluate, results_markdown
from rankpipe.adapter.evaluation.metrics import MetricConfig
from rankpipe.adapter.evaluation.query_rankings import read_rankings
from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.adapter.training.run_config import load_run_config
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import LabelSpec, Manifest, TargetTransform
from rankpipe.pipeline.embed.backbone import TextFeatures

from conftest import SYNTHETIC_PROVENANCE, TINY_RUN

TINY = [*TINY_RUN, "optim.warmup_steps=5", "train.eval_every=5", "train.max_steps=10"]
PROVENANCE = SYNTHETIC_PROVENANCE
AGE_CLASSES = (0.0, 1.0, 2.0, 3.0, 4.0)


class MemoryStore:
    """A token store in memory with the TokenStore read API; its images live in real tars.

    "count" (correlation) is written into channel 0 of the tokens, "age" (ordinal, 5 classes) into
    channel 1, so a tiny adapter learns both. The test split has labels missing on purpose.
    """

    def __init__(self, tar_dir: Path, n: int = 90, seed: int = 0, provenance: dict | None = None):
        rng = np.random.default_rng(seed)
        self.path = f"memory://eval-{seed}"
        self.identity = f"memory-{seed}"  # what TokenStore.identity digests: here, the generator seed
        self.labelled = True
        self.provenance = dict(provenance or PROVENANCE)
        self._labels = {
            "count": rng.uniform(0, 10, n).astype(np.float32),
            "age": rng.integers(0, 5, n).astype(np.float32),
        }
        tokens = rng.normal(0, 1, (n, 4, 16))
        tokens[:, :, 0] = (self._labels["count"][:, None] - 5) / 3 + rng.normal(0, 0.2, (n, 4))
        tokens[:, :, 1] = (self._labels["age"][:, None] - 2) / 1.5 + rng.normal(0, 0.2, (n, 4))
        self._tokens = tokens.astype(np.float16)
        self._splits = np.array(["train"] * 50 + ["val"] * 15 + ["test"] * (n - 65))
        self._labels["count"][[66, 70, 71]] = np.nan
        self._labels["age"][80] = np.nan
        self._valid = np.ones(n, bool)
        self._valid[67] = False  # an invalid test row is neither scored nor exported
        self._keys = np.array([f"img/{i:04d}" for i in range(n)])
        self._queries = {"count": "Sort images by the number of dots.", "age": "Sort people by age."}
        self._text = {
            name: TextFeatures(tokens=rng.normal(0, 1, (6, 12)).astype(np.float16), length=4, embed=np.zeros(8, np.float16))
            for name in self._queries
        }
        self.manifest = Manifest(
            name="memory", shards="x-{000000..000001}.tar",
            labels=(LabelSpec("count", self._queries["count"]),
                    LabelSpec("age", self._queries["age"], metric="ordinal", classes=AGE_CLASSES)),
        )
        self.label_names = list(self._queries)
        self._tars = self._write_tars(tar_dir, n)

    def _write_tars(self, tar_dir: Path, n: int) -> list[str]:
        tar_dir.mkdir(parents=True, exist_ok=True)
        urls = []
        for t, rows in enumerate((range(0, n // 2), range(n // 2, n))):
            url = tar_dir / f"x-{t:06d}.tar"
            with tarfile.open(url, "w") as tar:
                for i in rows:
                    buf = io.BytesIO()
                    Image.new("RGB", (40, 30), (i * 2 % 256, 100, 200)).save(buf, format="JPEG")
                    info = tarfile.TarInfo(f"{self._keys[i]}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
            urls.append(str(url))
        return urls

    def keys(self): return self._keys
    def valid(self): return self._valid
    def splits(self): return self._splits
    def label(self, name): return self._labels[name]
    def query(self, name): return self._queries[name]
    def text(self, name): return self._text[name]
    def image_tokens(self, rows, view="original"):
        assert view == "original"  # a store without a flip view
        return self._tokens[rows if isinstance(rows, slice) else np.asarray(rows)]

    def row_blocks(self): return [(0, len(self._keys))]
    def tar_urls(self): return self._tars
    def invalid_note(self): return f"{(~self._valid).sum()} image(s) are invalid" if not self._valid.all() else None

    def rows(self, split_values=None, label=None):
        keep = self._valid.copy()
        if split_values is not None:
            keep &= np.isin(self._splits, list(split_values))
        if label is not None:
            keep &= np.isfinite(self._labels[label])
        return np.flatnonzero(keep).astype(np.int64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[MemoryStore, Path]:
    root = tmp_path_factory.mktemp("eval")
    store = MemoryStore(root / "tars")
    result = train_from_store(store, root / "run", load_run_config(None, TINY))
    return store, Path(result.best_path)


@pytest.fixture()
def open_store(monkeypatch, trained, tmp_path_factory):
    """Make `rankpipe eval --store` open in-memory stores: 'memory' is the trained one, 'other' another backbone."""
    store, _ = trained
    other = MemoryStore(tmp_path_factory.mktemp("other-tars"), provenance={**PROVENANCE, "seed": 1})

    def fake_open(path: Path):
        name = Path(path).name
        if name == "memory.zarr":
            return store
        if name == "other.zarr":
            return other
        raise InputError(f"store {path} does not exist")

    monkeypatch.setattr(eval_command_module, "_open_store", fake_open)


def _store_dir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.zarr"
    path.mkdir()
    return path


def test_evaluate_metrics_match_scipy_on_the_labelled_rows(trained) -> None:
    store, checkpoint = trained
    loaded = load_checkpoint(checkpoint)
    results = evaluate(loaded, store, EvalConfig(split="test", metrics=MetricConfig(bootstrap=200)))
    assert [q.label for q in results.queries] == ["count", "age"]
    test_rows = store.rows(["test"])
    assert 67 not in test_rows
    for q in results.queries:
        assert len(q.ranking.keys) == len(test_rows)  # unlabelled images are ranked too
        truth = store.label(q.label)[test_rows]
        keep = np.isfinite(truth)
        assert (q.metrics.n, q.metrics.n_missing) == (keep.sum(), (~keep).sum())
        scores = predict(loaded, store, q.label, test_rows)
        np.testing.assert_allclose(q.ranking.scores, scores)
        e = q.metrics.estimates
        assert e["srcc"].value == pytest.approx(stats.spearmanr(scores[keep], truth[keep])[0])
        assert e["krcc"].value == pytest.approx(stats.kendalltau(scores[keep], truth[keep])[0])
        assert e["srcc"].low <= e["srcc"].value <= e["srcc"].high
    assert "class_acc" in results.queries[1].metrics.estimates
    assert "class_acc" not in results.queries[0].metrics.estimates
    assert "| count" in results_markdown(results)


def test_cli_writes_results_exports_and_report(tmp_path, trained, open_store) -> None:
    _, checkpoint = trained
    exports = [tmp_path / "x" / f"rankings.{ext}" for ext in ("csv", "jsonl", "h5")]
    args = ["eval", "--store", str(_store_dir(tmp_path, "memory")), "--checkpoint", str(checkpoint),
            "--out", str(tmp_path / "out"), "--report", str(tmp_path / "report"), "--bootstrap", "100", "--top-k", "4"]
    for path in exports:
        args += ["--export", str(path)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| label" in result.output and "SRCC" in result.output and "Class acc" in result.output

    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["split"] == "test" and data["bootstrap"]["resamples"] == 100
    count = data["queries"][0]
    assert count["label"] == "count" and count["n_missing_label"] == 3
    assert set(count["metrics"]) == {"plcc", "srcc", "krcc", "mae", "pair_acc"}
    assert "SRCC" in (tmp_path / "out" / "results.md").read_text()

    tables = [read_rankings(path) for path in exports]
    n_test = 90 - 65 - 1
    for table in tables[1:]:
        for column in ("key", "query", "rank", "split"):
            assert table[column].tolist() == tables[0][column].tolist()
        np.testing.assert_array_equal(table["score"], tables[0]["score"])
    assert len(tables[0]["key"]) == 2 * n_test
    assert set(tables[0]["split"]) == {"test"}
    assert np.isnan(tables[0]["label"]).sum() == 3 + 1

    page = (tmp_path / "report" / "index.html").read_text()
    for png in ("00-count-scatter.png", "00-count-top.png", "01-age-bottom.png"):
        assert f'src="{png}"' in page
        Image.open(tmp_path / "report" / png).verify()


@pytest.mark.parametrize(
    "problem, extra, message",
    [
        ("unknown label", ["--label", "height"], "not trained on label 'height'"),
        ("other backbone", [], "another backbone"),
        ("bad export suffix", ["--export", "rankings.xlsx"], "use a file name ending in"),
        ("unknown device", ["--device", "tpu0"], "unknown device 'tpu0'"),
        pytest.param("unavailable device", ["--device", "cuda"], "no CUDA GPU",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
    ],
)
def test_bad_input_exits_2_and_overwrites_nothing(tmp_path, trained, open_store, problem, extra, message) -> None:
    _, checkpoint = trained
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("old")
    store = _store_dir(tmp_path, "other" if problem == "other backbone" else "memory")
    args = ["eval", "--store", str(store), "--checkpoint", str(checkpoint), "--out", str(out), "--bootstrap", "0",
            "--export", str(tmp_path / "rankings.csv"), "--report", str(tmp_path / "report"), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert (out / "results.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", store.name])


@pytest.mark.parametrize("case", ["unknown split", "missing checkpoint", "missing store"])
def test_unknown_split_and_missing_inputs_exit_2(tmp_path, trained, open_store, case: str) -> None:
    _, checkpoint = trained
    store = _store_dir(tmp_path, "memory")
    extra = ["--split", "holdout"] if case == "unknown split" else []
    if case == "missing checkpoint":
        checkpoint = tmp_path / "nope.pt"
    if case == "missing store":
        store = tmp_path / "nope.zarr"
    result = CliRunner().invoke(cli, ["eval", "--store", str(store), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2, result.output
    assert ("holdout" if case == "unknown split" else "nope") in result.output
    assert not (tmp_path / "o").exists()


def test_library_refuses_missing_checkpoint_and_unknown_split(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run_evaluation(EvalRequest(store=tmp_path / "s.zarr", checkpoint=tmp_path / "nope.pt"))
    with pytest.raises(InputError, match="unknown split 'holdout'"):
        EvalConfig(split="holdout")


def test_split_without_images_is_an_input_error(trained) -> None:
    store, checkpoint = trained
    loaded = load_checkpoint(checkpoint)
    empty = Manifest(name="m", shards="x.tar", labels=store.manifest.labels, splits=type(store.manifest.splits)(test=("nothing",)))
    original = store.manifest
    store.manifest = empty
    try:
        with pytest.raises(InputError, match="no valid image in split 'test'"):
            evaluate(loaded, store, EvalConfig(split="test"))
    finally:
        store.manifest = original


@pytest.mark.parametrize("kind", ["identity", "distance"])
def test_truth_is_the_checkpoint_target(trained, kind: str) -> None:
    store, checkpoint = trained
    loaded = load_checkpoint(checkpoint)
    if kind == "distance":
        # A checkpoint that ranks by closeness to 5: the truth must be -|count - 5|, like its scores.
        entry = loaded.labels["count"]
        scale = dataclasses.replace(entry.scale, transform=TargetTransform("distance", 5.0))
        loaded.labels["count"] = dataclasses.replace(entry, scale=scale)
    results = evaluate(loaded, store, EvalConfig(split="val", labels=("count",), metrics=MetricConfig(bootstrap=0)))
    (count,) = results.queries
    assert count.ranking.query == store.query("count")
    raw = store.label("count")[store.rows(["val"])].astype(np.float64)
    expected = raw if kind == "identity" else -np.abs(raw - 5.0)
    np.testing.assert_array_equal(count.ranking.labels, expected)
    assert math.isnan(count.metrics.estimates["plcc"].low)


def test_cli_on_a_real_store_reads_thumbnails_from_its_tars(tmp_path, tiny_store, caplog) -> None:
    from rankpipe.pipeline.store import TokenStore

    store = TokenStore.open(tiny_store)
    run = train_from_store(store, tmp_path / "run", load_run_config(None, [*TINY, "train.batch_size=8"]))
    result = CliRunner().invoke(cli, [
        "eval", "--store", str(tiny_store), "--checkpoint", str(run.best_path), "--split", "test",
        "--label", "squares", "--bootstrap", "50", "--report", str(tmp_path / "report"),
        "--export", str(tmp_path / "rankings.jsonl"),
    ])
    assert result.exit_code == 0, result.output
    test_rows = store.rows(list(store.manifest.splits.values("test")))
    table = read_rankings(tmp_path / "rankings.jsonl")
    assert sorted(table["key"]) == sorted(store.keys()[test_rows])
    assert json.loads((tmp_path / "run" / "results.json").read_text())["queries"][0]["n"] == len(test_rows)
    assert not [r.message for r in caplog.records if r.levelname == "WARNING"], "every thumbnail must be found"
    Image.open(tmp_path / "report" / "00-squares-top.png").verify()
    thumbs = read_thumbnails(store.tar_urls(), store.keys()[test_rows], 24)
    assert len(thumbs) == len(test_rows) and all(max(t.size) == 24 for t in thumbs.values())
