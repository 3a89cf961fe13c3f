"""`rankpipe bench`: embed once, train and evaluate variants × seeds, one table with an unseen-category section.

Also the scale-out scripts of rankpipe.benchmarks in their smallest configurations.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rankpipe.adapter.evaluation.scoring import load_checkpoint, predict
from rankpipe.adapter.experiments.bench.bootstrap import spearman
from rankpipe.adapter.experiments.bench.run import (
    METRICS_FILE,
    BenchConfig,
    run_config_for,
)
from rankpipe.adapter.experiments.bench.runs import SCORES_FILE, RunScores, score_unseen
from rankpipe.adapter.experiments.bench.table import table_rows
from rankpipe.adapter.experiments.bench.variants import (
    get_variant,
    parse_variants,
    variant_names,
)
from rankpipe.benchmarks import embed_workers, sweep_throughput, train_loop
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.datasets.photo_tasks import PhotoTasksConfig, build_photo_tasks
from rankpipe.pipeline.datasets.photo_tasks.sources import SourcesConfig
from rankpipe.pipeline.embed.backbone import TINY_VIT, BackboneSpec
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

VARIANTS = ("default", "regression-only")
SEEDS = 2
STEPS = 4


def bench_args(tasks: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "--tasks", str(tasks), "--model", TINY_VIT, "--pretrained", "none", "--variants",
            ",".join(VARIANTS), "--seeds", str(SEEDS), "--out", str(out), "--quick", "--steps", str(STEPS),
            "--set", f"train.eval_every={STEPS}", "--device", "cpu", "--workers", "0", *extra]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A tiny built-in photo-tasks set (scikit-image photos, synthetic cut-outs, 64 px)."""
    out = tmp_path_factory.mktemp("photo-tasks")
    config = PhotoTasksConfig(images={"quality": 40, "attributes": 12, "counting": 36}, image_size=64,
                              sources=SourcesConfig(mode="builtin"), samples_per_tar=1000)
    build_photo_tasks(out, config)
    return out


@pytest.fixture(scope="module")
def bench_out(tasks, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    result = CliRunner().invoke(cli, bench_args(tasks, out))
    assert result.exit_code == 0, result.output
    return out, result.output


def read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_quick_bench_tables_every_variant_query_and_the_unseen_categories(tasks, bench_out):
    out, output = bench_out
    record = json.loads((tasks / "photo_tasks.json").read_text())
    held_out = set(record["counting"]["held_out_labels"])
    store = TokenStore.open(out / "store.zarr")
    trained = set(LabelledStore.open(store, among=record["train_labels"]).labels)
    assert trained and not trained & held_out

    rows = read_csv(out / "results.csv")
    got = {(r["section"], r["label"], r["variant"]) for r in rows}
    want = {("trained", label, v) for label in trained for v in VARIANTS}
    want |= {("unseen", label, v) for label in held_out for v in VARIANTS}
    assert got == want
    for row in rows:
        assert row["seeds"] == str(SEEDS)
        if row["section"] == "unseen":
            assert row["mae_mean"] == "" and int(row["n"]) > 0
            assert -1.0 <= float(row["srcc_mean"]) <= 1.0
        elif int(row["n"]) >= 3:
            assert float(row["mae_mean"]) >= 0.0 and row["mae_std"] != ""

    markdown = (out / "results.md").read_text()
    assert "## Trained queries" in markdown and "## Unseen categories" in markdown
    assert f"Backbone `{TINY_VIT}` at 64×64 px (4×4 patch tokens), RANDOM weights" in markdown and "Device `cpu`" in markdown
    assert f"{STEPS} training steps per run" in markdown
    assert markdown.rstrip() in output  # the table is printed at the end
    for variant in VARIANTS:
        for seed in range(SEEDS):
            run = out / "runs" / variant / f"seed{seed}"
            metrics = json.loads((run / METRICS_FILE).read_text())
            assert (run / "best.pt").is_file() and metrics["seed"] == seed and metrics["steps"] == STEPS
            assert metrics["run_config"]["train"]["seed"] == seed
    head = json.loads((out / "runs" / "regression-only" / "seed0" / METRICS_FILE).read_text())
    assert head["run_config"]["adapter"]["ranking_head"] == "none"


def test_quick_bench_compares_every_row_with_the_reference(tasks, bench_out):
    out, output = bench_out
    rows = read_csv(out / "comparison.csv")
    table = read_csv(out / "results.csv")
    assert {(r["label"], r["variant"]) for r in rows} == {(r["label"], r["variant"]) for r in table}
    for row in rows:
        runs = [RunScores.load(out / "runs" / row["variant"] / f"seed{s}" / SCORES_FILE) for s in range(SEEDS)]
        truth = runs[0].truth[row["label"]]
        labelled = np.isfinite(truth)
        assert int(row["n"]) == labelled.sum()
        if labelled.sum() < 2:  # this tiny set has queries with one test image or none: no correlation
            assert row["srcc"] == row["diff"] == "" and row["verdict"] == ""
            continue
        direct = np.mean([spearman(r.scores[row["label"]][labelled], truth[labelled]) for r in runs])
        assert float(row["srcc"]) == pytest.approx(direct, abs=1e-5)
        if row["variant"] == "default":
            assert row["verdict"] == "" and row["diff"] == ""
        else:
            assert row["verdict"] in ("better", "worse", "no difference")
            assert float(row["diff_low"]) <= float(row["diff"]) <= float(row["diff_high"])
    assert "## Paired comparison against `default` (SRCC, 95% bootstrap intervals)" in output
    assert re.search(r"- `regression-only` vs `default`: \d+ better, \d+ no difference, \d+ worse \(of \d+ queries\)",
                     output)


def test_quick_bench_writes_the_query_matrix_and_learning_curves(tasks, bench_out):
    out, output = bench_out
    matrices = json.loads((out / "query_matrix.json").read_text())
    assert [m["variant"] for m in matrices["variants"]] == list(VARIANTS)
    assert "## Query matrix: does the query steer the ranking?" in output and "- `default`: dominance" in output
    store = TokenStore.open(out / "store.zarr")
    default = matrices["variants"][0]
    scores = [RunScores.load(out / "runs" / "default" / f"seed{s}" / SCORES_FILE) for s in range(SEEDS)]
    query, label = default["labels"][0], default["labels"][-1]
    values = np.asarray(store.label(label), dtype=np.float64)[scores[0].rows]
    has = np.isfinite(values)
    direct = np.mean([spearman(s.scores[query][has], values[has]) for s in scores])
    assert default["srcc"][0][-1] == pytest.approx(direct, abs=1e-9)

    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"learning curves in {out / 'curves.png'}" in output and "## Learning curves" in output
    curves = read_csv(out / "curves.csv")
    for variant in VARIANTS:
        for seed in range(SEEDS):
            history = [json.loads(line) for line in
                       (out / "runs" / variant / f"seed{seed}" / "history.jsonl").read_text().splitlines()]
            mine = [(int(r["step"]), float(r["mean_val_srcc"])) for r in curves
                    if r["variant"] == variant and r["seed"] == str(seed)]
            assert mine == [(h["step"], pytest.approx(h["mean_val_srcc"], abs=1e-5)) for h in history]
    assert json.loads((out / "curves.json").read_text())["default"]["0"]["step"] == [STEPS]


def test_reference_must_be_among_the_variants(tasks, tmp_path):
    result = CliRunner().invoke(cli, bench_args(tasks, tmp_path / "b", "--reference", "k4"))
    assert result.exit_code == 2
    assert "--reference k4 is not among --variants" in result.output
    assert not (tmp_path / "b").exists()


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(tasks, bench_out):
    out, _ = bench_out
    table = (out / "results.csv").read_text()
    comparison = (out / "comparison.csv").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/seed*/" + METRICS_FILE)}
    # A run finished before scores were saved is scored again from its best.pt, to the same numbers.
    saved = out / "runs" / VARIANTS[1] / "seed0" / SCORES_FILE
    before = RunScores.load(saved)
    saved.unlink()
    result = CliRunner().invoke(cli, bench_args(tasks, out))
    assert result.exit_code == 0, result.output
    again = RunScores.load(saved)
    assert again.scores.keys() == before.scores.keys()
    for label in before.scores:
        np.testing.assert_allclose(again.scores[label], before.scores[label], rtol=1e-6)
    assert (out / "comparison.csv").read_text() == comparison
    assert result.output.count("finished earlier") == len(VARIANTS) * SEEDS
    assert f"0 run(s) trained, {len(VARIANTS) * SEEDS} reused" in result.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "results.csv").read_text() == table

    # A run whose metrics were never written continues from its last.pt and gives the same numbers.
    interrupted = out / "runs" / VARIANTS[0] / "seed1" / METRICS_FILE
    before = json.loads(interrupted.read_text())
    interrupted.unlink()
    result = CliRunner().invoke(cli, bench_args(tasks, out))
    assert result.exit_code == 0, result.output
    assert f"1 run(s) trained, {len(VARIANTS) * SEEDS - 1} reused" in result.output
    after = json.loads(interrupted.read_text())
    assert after["queries"] == before["queries"]


def test_rerun_with_other_settings_is_refused(tasks, bench_out):
    out, _ = bench_out
    args = bench_args(tasks, out)
    args[args.index("--steps") + 1] = str(STEPS + 1)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "was trained with other settings (train.max_steps differ)" in result.output


def _metrics_from_before_the_dropout_split(run_dir: Path, dropout: float) -> None:
    """A metrics.json as bench wrote it when the adapter had one `dropout` and no fusion block choice."""
    from rankpipe.adapter.training.run_config import RunConfig

    saved = RunConfig().to_dict()
    for field in ("fusion_block", "fusion_dropout", "plain_dropout"):
        del saved["adapter"][field]
    saved["adapter"]["dropout"] = dropout
    run_dir.mkdir(parents=True)
    (run_dir / METRICS_FILE).write_text(json.dumps({"run_config": saved, "steps": 7}))


def test_a_finished_run_from_before_the_dropout_split_keeps_its_old_behaviour(tmp_path):
    from rankpipe.adapter.experiments.bench.run import finished_run
    from rankpipe.adapter.training.run_config import RunConfig

    _metrics_from_before_the_dropout_split(tmp_path / "run", 0.2)
    old = RunConfig.from_dict({"adapter": {"fusion_block": "paper", "fusion_dropout": 0.2, "plain_dropout": 0.2}})
    assert finished_run(tmp_path / "run", old)["steps"] == 7
    with pytest.raises(InputError, match=r"trained with other settings \(adapter\.fusion_block, "
                                         r"adapter\.fusion_dropout, adapter\.plain_dropout differ\)"):
        finished_run(tmp_path / "run", RunConfig())


@pytest.mark.parametrize("variants", ["nope", "default,k7", " , "])
def test_unknown_variant_exits_2_naming_the_known_ones(tmp_path, variants):
    args = ["bench", "--model", TINY_VIT, "--variants", variants, "--out", str(tmp_path / "b"), "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "default, regression-only, subtraction-head" in result.output
    assert not (tmp_path / "b").exists()


def test_missing_task_folder_exits_2(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "--tasks", str(tmp_path), "--model", TINY_VIT, "--variants", "default",
                                      "--out", str(tmp_path / "b"), "--device", "cpu", "--quick"])
    assert result.exit_code == 2
    assert "has no manifest.yaml" in result.output


def test_baseline_rows_sit_beside_the_adapter(tasks, tmp_path):
    args = bench_args(tasks, tmp_path / "bench")
    args[args.index("--variants") + 1] = "linear-probe,zero-shot"
    args[args.index("--seeds") + 1] = "1"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "bench" / "results.csv")
    store = TokenStore.open(tmp_path / "bench" / "store.zarr")
    record = json.loads((tasks / "photo_tasks.json").read_text())
    trained = set(LabelledStore.open(store, among=record["train_labels"]).labels)
    # Baselines have no score for held-out queries, so they only fill the trained section.
    assert {(r["section"], r["label"], r["variant"]) for r in rows} == {
        ("trained", label, v) for label in trained for v in ("linear-probe", "zero-shot")}
    metrics = json.loads((tmp_path / "bench" / "runs" / "zero-shot" / "seed0" / METRICS_FILE).read_text())
    assert metrics["method"] == "zero-shot" and metrics["steps"] == 0


def test_seeded_baselines_get_the_bench_seed():
    from rankpipe.adapter.experiments.bench.run import _baseline_settings

    assert _baseline_settings(get_variant("coop"), 2)[-1] == "seed=2"
    assert "seed=2" not in _baseline_settings(get_variant("linear-probe"), 2)


ADAPTER_VARIANTS = [name for name in variant_names() if get_variant(name).method == "adapter"]


@pytest.mark.parametrize("name", ADAPTER_VARIANTS)
def test_every_variant_resolves_to_a_valid_run_config(name, tmp_path):
    config = BenchConfig(out_dir=tmp_path, backbone=BackboneSpec(TINY_VIT), variants=(get_variant(name),), quick=True)
    run_config = run_config_for(get_variant(name), 3, config)
    default = run_config_for(get_variant("default"), 3, config)
    changed = default.differences(run_config)
    assert run_config.train.seed == 3 and run_config.adapter.d_model == 64
    # Each ablation changes what its overrides name, and otherwise only fields of the same section that
    # follow them (the hinge loss brings its own regression form); k16 is the default's K.
    named = [o.split("=")[0] for o in get_variant(name).overrides]
    if name in ("default", "k16"):
        assert changed == []
    else:
        assert set(named) <= set(changed)
        assert {field.split(".")[0] for field in changed} == {field.split(".")[0] for field in named}


def test_default_bench_trains_the_bench_adapter_and_set_still_wins(tmp_path):
    from rankpipe.adapter.experiments.bench.run import BENCH_STEPS

    config = BenchConfig(out_dir=tmp_path, backbone=BackboneSpec("ViT-B-32"), variants=(get_variant("k4"),),
                         overrides=("adapter.d_model=96",))
    run_config = run_config_for(get_variant("k4"), 1, config)
    assert run_config.train.max_steps == BENCH_STEPS and run_config.adapter.heads == 4
    assert run_config.adapter.d_model == 96 and run_config.adapter.relational_tokens == 4
    assert BenchConfig(out_dir=tmp_path, backbone=BackboneSpec("ViT-B-32"), variants=(get_variant("k4"),),
                       seeds=1).reference_row == "k4"  # no `default` row: the first variant is the reference


def test_parse_variants_keeps_order_and_drops_repeats():
    assert [v.name for v in parse_variants("k4, default,k4")] == ["k4", "default"]
    with pytest.raises(InputError, match="unknown bench variant 'x'"):
        parse_variants("default,x")


def test_unseen_scores_match_prediction_for_a_trained_query(bench_out):
    """score_unseen with the store's text tokens is the checkpoint's prediction before the label scaling."""
    out, _ = bench_out
    store = TokenStore.open(out / "store.zarr")
    loaded = load_checkpoint(out / "runs" / "default" / "seed0" / "best.pt")
    label = next(iter(loaded.labels))
    rows = store.rows(["test"])[::-1]  # unsorted on purpose
    raw = score_unseen(loaded, store, label, rows, batch_size=5)
    np.testing.assert_allclose(loaded.labels[label].scale.to_target_units(raw), predict(loaded, store, label, rows),
                               rtol=1e-5, atol=1e-6)


def test_table_is_mean_and_sample_std_over_seeds():
    def record(seed, srcc, mae):
        query = {"label": "a", "query": "Sort by a.", "unseen": False, "n": 9,
                 "metrics": {"srcc": srcc, "plcc": 0.5, "krcc": None, "mae": mae}}
        return {"variant": "v", "method": "adapter", "seed": seed, "queries": [query]}

    (row,) = table_rows([record(0, 0.2, 1.0), record(1, 0.6, 2.0), record(2, 0.7, 4.0)], ["v"])
    assert row.seeds == 3 and row.n == 9
    assert row.stats["srcc"] == pytest.approx((np.mean([0.2, 0.6, 0.7]), np.std([0.2, 0.6, 0.7], ddof=1)))
    assert row.stats["mae"] == pytest.approx((7 / 3, np.std([1.0, 2.0, 4.0], ddof=1)))
    assert row.stats["plcc"][0] == 0.5 and row.stats["plcc"][1] == 0.0
    assert all(math.isnan(v) for v in row.stats["krcc"])


def printed_rows(output: str, header_start: str) -> list[list[str]]:
    """The whitespace-split rows under the table header that starts with `header_start`."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == [header_start])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("#"):
            break
        rows.append(line.split())
    return rows


def test_embed_workers_script_shows_byte_equal_stores_for_every_mode(monkeypatch, capsys):

    monkeypatch.setattr(sys, "argv", ["embed_workers.py", "--images", "12", "--tars", "2", "--batch-size", "4",
                                      "--image-source-size", "64x48", "--workers-list", "1"])
    embed_workers.main()
    output = capsys.readouterr().out
    rows = printed_rows(output, "mode")
    # mode, workers, images, start s, wall s, img/s, vs single, features equal
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [("single", "1", "12", "yes"), ("cluster", "1", "12", "yes")]
    assert rows[0][3] == "-" and rows[0][6] == "1.00x"
    assert re.search(r"^# torch threads: this process \d+, each dask worker \d+$", output, re.MULTILINE)


def test_sweep_throughput_script_adds_a_row_per_worker_count():

    args = ["--images", "40", "--tokens", "4", "--token-dim", "8", "--trials", "2", "--concurrency", "2",
            "--steps", "2", "--batch-size", "8", "--workers-list", "1"]
    result = CliRunner().invoke(sweep_throughput.main, args)
    assert result.exit_code == 0, result.output
    local = printed_rows(result.output, "trials")
    # One trial, the trials alone (concurrency 2), the trials fused (at most 16 per model).
    assert [(r[0], r[1], r[2]) for r in local] == [("1", "1", "1"), ("2", "2", "1"), ("2", "1", "16")]
    assert local[0][-1] == "1.00x" and all(r[-2] == "-" for r in local)  # no device memory peak on the CPU
    cluster = printed_rows(result.output, "workers")
    assert [(r[0], r[-1]) for r in cluster] == [("1", "1.00x")]
    assert float(cluster[0][3]) > 0  # trials per minute


def test_sweep_throughput_refuses_a_bad_worker_list():

    result = CliRunner().invoke(sweep_throughput.main, ["--workers-list", "1,0"])
    assert result.exit_code == 2
    assert "worker counts must be >= 1" in result.output


def test_embed_workers_compares_every_feature_byte(tiny_store, tmp_path):

    copy = shutil.copytree(tiny_store, tmp_path / "copy.zarr")
    assert embed_workers.same_features(tiny_store, copy)
    token_file = next(p for p in sorted((copy / "image" / "tokens").rglob("*")) if p.is_file() and p.stat().st_size)
    data = bytearray(token_file.read_bytes())
    data[0] ^= 1  # a token value (shard files hold the chunks first, their index last)
    token_file.write_bytes(bytes(data))
    assert not embed_workers.same_features(tiny_store, copy)


def test_train_loop_script_times_steps_after_the_warm_up():

    args = ["--images", "40", "--tokens", "4", "--token-dim", "8", "--batch-size", "8", "--steps", "9",
            "--warmup", "3", "--modes", "off"]
    result = CliRunner().invoke(train_loop.main, args)
    assert result.exit_code == 0, result.output
    rows = printed_rows(result.output, "train.compile")
    assert [(r[0], r[4]) for r in rows] == [("off", "1.00x")]
    ms, images_per_s = float(rows[0][2]), float(rows[0][3].replace(",", ""))
    assert ms > 0 and images_per_s == pytest.approx(8 * 1e3 / ms, rel=0.01, abs=0.5)  # printed rounded
    step_ms, loop_per_step = float(rows[0][5]), float(rows[0][6].rstrip("x"))
    assert step_ms > 0 and loop_per_step == pytest.approx(ms / step_ms, rel=0.02, abs=0.01)


def test_train_loop_script_refuses_unknown_modes_and_short_runs():

    assert CliRunner().invoke(train_loop.main, ["--modes", "fast"]).exit_code == 2
    assert CliRunner().invoke(train_loop.main, ["--steps", "10", "--warmup", "5"]).exit_code == 2


def test_query_matrix_on_mixed_images_covers_every_query_and_label(tmp_path):
    """A tiny steering set: every test image carries a blur, counts and the attributes; one model, all queries."""
    tasks = tmp_path / "steering"
    build_photo_tasks(tasks, PhotoTasksConfig(images={"mixed": 48}, image_size=64, sources=SourcesConfig(mode="builtin"),
                                              split_fractions=(0.5, 0.2, 0.3), samples_per_tar=1000))
    args = bench_args(tasks, tmp_path / "bench")
    args[args.index("--variants") + 1] = "default"
    args[args.index("--seeds") + 1] = "1"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    matrices = json.loads((tmp_path / "bench" / "query_matrix.json").read_text())
    (default,) = matrices["variants"]
    labels = default["labels"]
    assert "blur" in labels and "brightness" in labels and any(name.startswith("count_") for name in labels)
    srcc = np.array([[np.nan if v is None else v for v in row] for row in default["srcc"]])
    assert np.isfinite(srcc).all()  # every test image has every label, so every entry is defined
    off = np.abs(srcc[~np.eye(len(labels), dtype=bool)])
    assert default["dominance"] == pytest.approx(np.diag(srcc).mean() - off.mean())
    truth = np.array(matrices["truth"]["srcc"], dtype=float)
    np.testing.assert_allclose(np.diag(truth), 1.0)
    assert "- `truth`: dominance" in result.output and "- `default`: dominance" in result.output


def test_labels_trains_and_tables_only_those_queries_and_a_rerun_on_other_labels_is_refused(tasks, bench_out, tmp_path):
    record = json.loads((tasks / "photo_tasks.json").read_text())
    store = TokenStore.open(bench_out[0] / "store.zarr")
    chosen = list(LabelledStore.open(store, among=record["train_labels"]).labels)[:2]
    args = bench_args(tasks, tmp_path / "bench", "--labels", ",".join(chosen))
    args[args.index("--seeds") + 1] = "1"
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    rows = read_csv(tmp_path / "bench" / "results.csv")
    assert {(r["section"], r["label"], r["variant"]) for r in rows} == {
        ("trained", label, v) for label in chosen for v in VARIANTS}
    metrics = json.loads((tmp_path / "bench" / "runs" / "default" / "seed0" / METRICS_FILE).read_text())
    assert sorted(q["label"] for q in metrics["queries"]) == sorted(chosen)
    assert f"Trained and tabled queries: {', '.join(chosen)} only" in (tmp_path / "bench" / "results.md").read_text()

    args[args.index("--labels") + 1] = chosen[0]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "was trained on other labels" in result.output


def test_unknown_label_exits_2_before_embedding(tasks, tmp_path):
    args = bench_args(tasks, tmp_path / "bench", "--labels", "no_such_label")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "no label 'no_such_label'; labels are:" in result.output
    assert not (tmp_path / "bench" / "store.zarr").exists()
