"""Sweeps: spec expansion, stable trial ids, failures recorded, resume, concurrency, a dask LocalCluster, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import pytest
import torch
import yaml
from click.testing import CliRunner

from rankpipe.adapter.evaluation.folds import recorded_splits
from rankpipe.adapter.experiments.sweep import fused as sweep_fused
from rankpipe.adapter.experiments.sweep import runner as sweep_runner
from rankpipe.adapter.experiments.sweep.runner import (
    SweepRequest,
    run_sweep,
    trial_task,
)
from rankpipe.adapter.experiments.sweep.spec import (
    SweepSpec,
    expand_trials,
    load_sweep_spec,
)
from rankpipe.adapter.experiments.sweep.trial import (
    DONE,
    FAILED,
    RUNNING,
    STATUS,
    TrialSettings,
    trial_folder,
)
from rankpipe.adapter.training.features import train_val_gigabytes
from rankpipe.adapter.training.loop import train_from_store
from rankpipe.cli.main import cli
from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import SplitSpec
from rankpipe.pipeline.labelled_store import LabelledStore
from rankpipe.pipeline.store import TokenStore

# A tiny adapter trained for a few steps: each trial takes well under a second on one CPU core.
BASE = [
    "adapter.d_model=32", "adapter.heads=4", "adapter.text_extra_tokens=4", "adapter.blocks=1",
    "adapter.plain_layers=0", "adapter.relational_tokens=4", "adapter.pair_layers=1", "adapter.regression_layers=1",
    "optim.warmup_steps=2", "train.batch_size=8", "train.eval_every=4", "train.log_every=1", "train.max_steps=8",
]
# Four trials; lr 1e30 makes the loss non-finite at once (TrainingDiverged).
GRID = {"optim.lr": [2e-3, 1e30], "train.seed": [0, 1]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cluster_client():
    """One LocalCluster of 2 single-threaded worker processes for the whole module (it takes seconds to start)."""
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def write_grid(path, grid=None, **extra) -> str:
    path.write_text(yaml.safe_dump({"set": BASE, "grid": grid if grid is not None else GRID, **extra}))
    return str(path)


def trials_of(tmp_path, **kwargs):
    spec = load_sweep_spec(write_grid(tmp_path / "grid.yaml", **kwargs))
    return spec, expand_trials(spec)


def metrics_by_id(outcome) -> dict[str, float]:
    return {r.id: r.mean_val_srcc for r in outcome.records if r.state == DONE}


# --- the sweep file -----------------------------------------------------------------------------------


def test_grid_is_cartesian_with_stable_ids(tmp_path):
    spec, trials = trials_of(tmp_path)
    assert len(trials) == 4 and spec.varied == ["optim.lr", "train.seed"]
    assert {(t.config.optim.lr, t.config.train.seed) for t in trials} == {(2e-3, 0), (2e-3, 1), (1e30, 0), (1e30, 1)}
    assert all(t.config.adapter.d_model == 32 for t in trials)
    # Reordering the grid's fields and values keeps every trial's id (ids hash the resolved config).
    _, reordered = trials_of(tmp_path, grid={"train.seed": [1, 0], "optim.lr": [1e30, 2e-3]})
    assert {t.id for t in reordered} == {t.id for t in trials}
    assert len({t.id for t in trials}) == 4


def test_points_resolving_to_one_config_are_one_trial(tmp_path):
    # 5e-5 is the default lr: "optim.lr=5e-5" and the default resolve to the same config.
    _, trials = trials_of(tmp_path, grid={"optim.lr": [5e-5, 0.00005, 1e-3]})
    assert len(trials) == 2


def test_random_draws_are_seeded_and_within_bounds(tmp_path):
    random = {"optim.weight_decay": {"loguniform": ["1e-4", 0.1]}, "loss.weight": {"uniform": [0.1, 1.0]},
              "adapter.relational_tokens": {"choice": [1, 4]}}
    grid = {"train.seed": [0, 1]}
    _, first = trials_of(tmp_path, grid=grid, random=random, trials=3, seed=7)
    _, again = trials_of(tmp_path, grid=grid, random=random, trials=3, seed=7)
    _, other = trials_of(tmp_path, grid=grid, random=random, trials=3, seed=8)
    assert len(first) == 6
    assert [t.id for t in first] == [t.id for t in again]
    assert [t.id for t in first] != [t.id for t in other]
    for t in first:
        assert 1e-4 <= t.config.optim.weight_decay <= 0.1
        assert 0.1 <= t.config.loss.weight <= 1.0
        assert t.config.adapter.relational_tokens in (1, 4)


@pytest.mark.parametrize("content, message", [
    ({"grid": {"optim.lr": []}}, "lists no values"),
    ({"grid": {"optim.nope": [1]}}, "unknown field 'optim.nope'"),
    ({"grid": {"optim.lr": ["fast"]}}, "^sweep trial optim.lr=fast: field 'optim.lr' expects a number"),
    ({"set": ["optim.lr=fast"], "grid": {"train.seed": [0, 1]}}, "^the sweep's set list or --set: field 'optim.lr' expects"),
    ({"random": {"optim.lr": {"normal": [0, 1]}}, "trials": 2}, "use one of choice"),
    ({"random": {"optim.lr": {"uniform": [1, 0]}}, "trials": 2}, "low < high"),
    ({"random": {"optim.lr": {"loguniform": [0, 1]}}, "trials": 2}, "low > 0"),
    ({"random": {"optim.lr": {"uniform": [0.1, 1]}}}, "needs 'trials: N'"),
    ({"grid": {"optim.lr": [1]}, "random": {"optim.lr": {"choice": [1]}}, "trials": 1}, "both in grid and random"),
    ({"grids": {}}, "unknown key"),
])
def test_bad_sweep_files_are_input_errors(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(InputError, match=message):
        expand_trials(load_sweep_spec(path))


def test_missing_sweep_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_sweep_spec(tmp_path / "none.yaml")


def test_spec_needs_positive_trials():
    with pytest.raises(InputError, match="trials must be >= 1"):
        SweepSpec(trials=0)


def test_an_absurd_number_of_trials_is_refused_up_front(tmp_path):  # 4 grid points x 10**9 draws
    path = write_grid(tmp_path / "huge.yaml", random={"optim.lr": {"loguniform": [1e-5, 1e-3]}}, trials=10**9)
    with pytest.raises(InputError, match="4,000,000,000 trials is more than 10,000"):
        load_sweep_spec(path)


# --- running trials here --------------------------------------------------------------------------------


def test_local_sweep_records_failures_resumes_and_matches_concurrent_run(tmp_path, tiny_store):
    spec, trials = trials_of(tmp_path)
    serial = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "serial"), spec.varied)
    assert serial.ran == 4 and serial.skipped == 0
    states = {r.id: r.state for r in serial.records}
    for t in trials:
        assert states[t.id] == (FAILED if t.config.optim.lr > 1 else DONE)
    failed = [r for r in serial.records if r.state == FAILED]
    assert all("TrainingDiverged" in r.reason and "non-finite" in r.reason for r in failed)
    done = [r for r in serial.records if r.state == DONE]
    for record in done:
        folder = record.folder
        assert {"config.json", "best.pt", "last.pt", "history.jsonl", "metrics.json", "results.json", STATUS} <= set(os.listdir(folder))
        metrics = json.loads((folder / "metrics.json").read_text())
        assert set(metrics["eval"]) == {"squares", "brightness"}
        assert -1 <= metrics["eval"]["squares"]["srcc"] <= 1 and metrics["best_step"] in (4, 8)
        # Split roles travel with the checkpoint, so k-fold evaluation needs no --manifest.
        assert recorded_splits(folder / "best.pt") == TokenStore.open(tiny_store).manifest.splits
        assert json.loads((folder / "config.json").read_text())["run_config"]["optim"]["lr"] == 2e-3

    # The table: done trials first, best val SRCC on top, failed ones last with their reason.
    lines = serial.csv_path.read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("rank,trial,optim.lr,train.seed,state,val SRCC")
    rows = [line.split(",") for line in lines[1:]]
    assert [row[4] for row in rows] == [DONE, DONE, FAILED, FAILED]
    assert float(rows[0][5]) >= float(rows[1][5])
    assert "| rank" in serial.md_path.read_text()

    # Two trials at a time in threads from the same features give the same results.
    concurrent = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "concurrent", concurrency=2), spec.varied)
    assert metrics_by_id(concurrent) == metrics_by_id(serial)

    # Rerun: nothing is trained again, and no trial file is rewritten.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "serial").rglob("trial-*/*")}
    again = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "serial"), spec.varied)
    assert again.ran == 0 and again.skipped == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "serial").rglob("trial-*/*")} == before
    assert again.csv_path.read_text() == serial.csv_path.read_text()

    # An interrupted trial (status "running") is run again and ends with the same result.
    victim = done[0]
    (victim.folder / STATUS).write_text(json.dumps({"state": RUNNING, "reason": None}))
    (victim.folder / "metrics.json").unlink()
    resumed = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "serial"), spec.varied)
    assert resumed.ran == 1
    assert metrics_by_id(resumed) == metrics_by_id(serial)

    # --retry-failed runs the failed trials again (they fail again, deterministically).
    retried = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "serial", retry_failed=True), spec.varied)
    assert retried.ran == 2 and sum(r.state == FAILED for r in retried.records) == 2


def test_trials_of_the_same_shapes_train_fused_and_end_as_they_would_alone(tmp_path, tiny_store, monkeypatch):
    grid = {"optim.lr": [2e-3, 5e-3], "train.seed": [0, 1], "adapter.d_model": [32, 16]}
    # A plain layer with its default dropout (0.1), as the released code has.
    spec, trials = trials_of(tmp_path, grid=grid, set=[*BASE, "loss.weight=0.5", "adapter.plain_layers=1"])
    fused_calls = []
    original = sweep_fused.train_fused

    def counting(features, jobs, *args, **kwargs):
        fused_calls.append(sorted(job.config.adapter.d_model for job in jobs))
        return original(features, jobs, *args, **kwargs)

    monkeypatch.setattr(sweep_fused, "train_fused", counting)
    fused = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "fused", fuse_max=3), spec.varied)
    # Two shapes of four trials each; at most three trials per fused model, so a fourth trains alone.
    assert sorted(fused_calls) == [[16] * 3, [32] * 3]
    alone = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "alone", fuse_max=1), spec.varied)
    assert len(fused_calls) == 2  # fuse_max=1 fuses nothing
    assert [r.state for r in fused.records] == [r.state for r in alone.records] == [DONE] * 8
    for a, b in zip(fused.records, alone.records):
        assert a.metrics["best_step"] == b.metrics["best_step"]
        assert a.metrics["val_srcc"] == pytest.approx(b.metrics["val_srcc"], abs=1e-6)
        for label, metrics in b.metrics["eval"].items():
            assert a.metrics["eval"][label] == pytest.approx(metrics, abs=1e-5), label
        wa, wb = (torch.load(r.folder / "last.pt", weights_only=True)["model"] for r in (a, b))
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-4)


def test_trials_with_dropout_in_concurrent_threads_end_as_one_after_another(tmp_path, tiny_store):
    """Each trial's dropout masks come from its seed and steps, not the generator the threads share."""
    grid = {"optim.lr": [2e-3, 5e-3], "train.seed": [0, 1]}
    spec, trials = trials_of(tmp_path, grid=grid, set=[*BASE, "adapter.plain_layers=1", "adapter.fusion_dropout=0.1"])
    runs = {n: run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / str(n), concurrency=n, fuse_max=1),
                         spec.varied) for n in (1, 2)}
    assert [r.state for r in runs[2].records] == [DONE] * 4
    assert metrics_by_id(runs[2]) == metrics_by_id(runs[1])
    for a, b in zip(runs[1].records, runs[2].records):
        wa, wb = (torch.load(r.folder / "last.pt", weights_only=True)["model"] for r in (a, b))
        assert all(torch.equal(wa[key], wb[key]) for key in wa)


def test_trials_with_the_default_dropout_fuse(tmp_path):
    _, with_dropout = trials_of(tmp_path, set=[*BASE, "adapter.plain_layers=1"])  # plain_dropout 0.1 by default
    assert [len(unit) for unit in sweep_fused.work_units(with_dropout, 16)] == [4]
    assert [len(unit) for unit in sweep_fused.work_units(with_dropout, 1)] == [1, 1, 1, 1]  # fusing asked off
    _, shapes = trials_of(tmp_path, grid={"adapter.d_model": [16, 32], "train.seed": [0, 1]},
                          set=[*BASE, "adapter.plain_layers=1"])
    assert [len(unit) for unit in sweep_fused.work_units(shapes, 16)] == [2, 2]


def test_sweep_user_errors(tmp_path, tiny_store):
    _, trials = trials_of(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        run_sweep(trials, SweepRequest(store=tmp_path / "none.zarr", out_dir=tmp_path / "out"))
    with pytest.raises(InputError, match="no label 'nope'"):
        run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "out", trial=TrialSettings(labels=("nope",))))
    with pytest.raises(InputError, match="concurrency"):
        SweepRequest(store=tiny_store, out_dir=tmp_path / "out", concurrency=0)
    with pytest.raises(InputError, match="fuse-max"):
        SweepRequest(store=tiny_store, out_dir=tmp_path / "out", fuse_max=0)


def test_negatives_on_a_label_that_is_not_a_count_are_refused_before_any_trial_runs(tmp_path, tiny_store):
    # brightness holds fractions: zero-count negatives make no sense for it, as in `rankpipe train`.
    _, trials = trials_of(tmp_path, grid={"train.negative_share": [0.0, 0.2]})
    out = tmp_path / "out"
    with pytest.raises(InputError, match="train.negative_share is for count labels, but label 'brightness'"):
        run_sweep(trials, SweepRequest(store=tiny_store, out_dir=out))
    assert not out.exists()


def test_a_manifest_override_sets_the_split_each_trial_is_evaluated_on(tmp_path, tiny_store):
    store = TokenStore.open(tiny_store)
    manifest = dataclasses.replace(store.manifest, splits=SplitSpec(test=("val",)))  # evaluate on the val images
    spec, trials = trials_of(tmp_path, grid={"train.seed": [0]})
    outcome = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "out", manifest=manifest), spec.varied)
    (record,) = outcome.records
    assert record.state == DONE
    results = json.loads((record.folder / "results.json").read_text())
    assert results["split"] == "test" and results["split_values"] == ["val"]
    assert all(q["n"] == len(store.rows(["val"], label=q["label"])) for q in results["queries"])


# --- a dask cluster ---------------------------------------------------------------------------------------


def test_sweep_on_local_cluster_equals_local_run_and_resumes(tmp_path, tiny_store, cluster_client):
    spec, trials = trials_of(tmp_path)
    on_cluster = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "dask"), spec.varied, client=cluster_client)
    assert on_cluster.ran == 4
    assert sorted(r.state for r in on_cluster.records) == [DONE, DONE, FAILED, FAILED]
    assert len(on_cluster.csv_path.read_text().splitlines()) == 5
    local = run_sweep(trials[:1] + trials[2:3], SweepRequest(store=tiny_store, out_dir=tmp_path / "here"), spec.varied)
    cluster_metrics = metrics_by_id(on_cluster)
    assert all(cluster_metrics[k] == v for k, v in metrics_by_id(local).items())

    again = run_sweep(trials, SweepRequest(store=tiny_store, out_dir=tmp_path / "dask"), spec.varied, client=cluster_client)
    assert again.ran == 0 and again.skipped == 4


# --- CLI --------------------------------------------------------------------------------------------------


def test_cli_sweep_prints_the_table(tmp_path, tiny_store):
    grid = write_grid(tmp_path / "grid.yaml", grid={"train.seed": [0, 1]})
    out = tmp_path / "sweep"
    args = ["sweep", "--store", str(tiny_store), "--grid", grid, "--out", str(out), "--device", "cpu",
            "--label", "brightness", "--bootstrap", "10"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "| rank" in result.output and "test SRCC" in result.output
    assert "2 trials run, 0 already done" in result.output
    rerun = CliRunner().invoke(cli, args)
    assert rerun.exit_code == 0 and "0 trials run, 2 already done or failed" in rerun.output


@pytest.mark.parametrize("extra, message", [
    (["--cluster", "remote:2"], "not of the form local:N"),
    (["--cluster", "local:2", "--scheduler", "tcp://x:1"], "not both"),
    (["--fuse-max", "0"], "--fuse-max"),
])
def test_cli_sweep_user_errors_exit_2(tmp_path, tiny_store, extra, message):
    grid = write_grid(tmp_path / "grid.yaml")
    result = CliRunner().invoke(cli, ["sweep", "--store", str(tiny_store), "--grid", grid, "--out", str(tmp_path / "o"),
                                      "--device", "cpu", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


# --- stores larger than the memory budget -----------------------------------------------------------------


def test_a_store_over_the_budget_streams_each_trial_as_train_does(tmp_path, tiny_store, caplog):
    store = TokenStore.open(tiny_store)
    labels = list(LabelledStore.open(store).labels)
    budget = f"{0.8 * train_val_gigabytes(LabelledStore.open(store, labels=labels)):.3g}"  # streams in windows of one tar
    spec = load_sweep_spec(write_grid(tmp_path / "grid.yaml", grid={"train.max_resident_gb": [budget, "1e-7"]}))
    trials = expand_trials(spec, ["train.window_steps=4"])
    fits, too_small = sorted(trials, key=lambda t: -t.config.train.max_resident_gb)
    request = SweepRequest(store=tiny_store, out_dir=tmp_path / "sweep", concurrency=2)
    with caplog.at_level(logging.WARNING, logger=sweep_runner.__name__):
        outcome = run_sweep(trials, request, spec.varied)
    assert "trials stream it one at a time" in caplog.text
    states = {r.id: (r.state, r.reason) for r in outcome.records}
    assert states[fits.id] == (DONE, None)
    assert states[too_small.id][0] == FAILED and "more than a training window" in states[too_small.id][1]
    # The trial trained exactly as `rankpipe train` trains the same config on the same store.
    alone = train_from_store(store, tmp_path / "alone", fits.config, labels=labels)
    swept = torch.load(trial_folder(tmp_path / "sweep", fits.id) / "last.pt", weights_only=True)["model"]
    expected = torch.load(alone.last_path, weights_only=True)["model"]
    assert all(torch.equal(swept[k], expected[k]) for k in expected)
    # A cluster worker streams the same way (the task runs here, in-process).
    record = trial_task(fits, SweepRequest(store=tiny_store, out_dir=tmp_path / "on-worker"))
    on_worker = torch.load(record.folder / "last.pt", weights_only=True)["model"]
    assert record.state == DONE and all(torch.equal(on_worker[k], expected[k]) for k in expected)
