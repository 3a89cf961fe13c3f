"""Fused training: runs of the same shapes trained as one model end as they would have alone."""

from __future__ import annotations

import json
import types

import pytest
import torch

import rankpipe.adapter.training.fused as fused_module
import rankpipe.adapter.training.loop as loop_module
from rankpipe.adapter.training.features import load_features
from rankpipe.adapter.training.fused import FusedJob, fusion_key, train_fused
from rankpipe.adapter.training.loop import TrainingDiverged, TrainResult, train_adapter
from rankpipe.pipeline.labelled_store import LabelledStore

from conftest import Interrupted, stop_at, tiny_config, weights, write_synthetic_store

pytestmark = pytest.mark.usefixtures("one_thread")

# Runs that differ in seed (initial weights and batches), optimiser, schedule, clipping, loss form and
# weights, length and validation interval; one shape for all.
VARIANTS = [
    ("train.seed=0",),
    ("train.seed=0", "optim.lr=5e-3", "loss.weight=0.3", "loss.pairwise=hinge", "optim.weight_decay=0.1"),
    ("train.seed=1", "optim.grad_clip=0.05", "optim.warmup_steps=3", "optim.min_lr_ratio=0.2"),
    ("train.seed=1", "train.max_steps=25", "train.eval_every=10", "loss.regression_weight=0.5", "optim.betas=[0.8,0.99]"),
]
# Runs that share their loss settings: the loss joins the vmapped pass.
SHARED_LOSS = [
    ("train.seed=0",),
    ("train.seed=0", "optim.lr=5e-3"),
    ("train.seed=1", "optim.weight_decay=0.1", "train.max_steps=25"),
]
STEPS = "train.max_steps=30"
# The released code's dropout (0.1 in a plain layer), and dropout in the fusion blocks as well.
PLAIN_DROPOUT = ("adapter.plain_layers=1", "adapter.plain_dropout=0.1")
ALL_DROPOUT = (*PLAIN_DROPOUT, "adapter.fusion_dropout=0.1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store = write_synthetic_store(tmp_path_factory.mktemp("fused") / "synthetic.zarr")
    labelled = LabelledStore.open(store, labels=["count", "size"])
    return labelled, load_features(labelled, "cpu", 1.0)


def history(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


# Weights may differ by this much. Fused and solo passes round differently (batched matrix products)
# and training amplifies the difference: measured for the lr 5e-3 run, 1e-6 after 5 steps, 6e-6 after
# 15, 1.1e-4 after 30 (at lr 2e-3 4e-6 after 30). Key biases of attention, which get only rounding
# noise as gradient, drift by steps of about lr. One wrong optimiser step moves a weight by about
# lr = 2e-3 to 5e-3.
WEIGHT_TOLERANCE = 3e-4


def assert_same_run(fused_dir, solo_dir, fused: TrainResult, solo: TrainResult) -> None:
    """Weights, history, best step and validation SRCC of a fused run match the same run alone."""
    for name in ("best.pt", "last.pt"):
        a, b = weights(fused_dir / name), weights(solo_dir / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=WEIGHT_TOLERANCE, msg=f"{name} {key}")
    assert (fused.steps, fused.best_step) == (solo.steps, solo.best_step)
    assert fused.best_srcc == pytest.approx(solo.best_srcc, abs=1e-6)
    fused_history, solo_history = history(fused_dir), history(solo_dir)
    assert [h["step"] for h in fused_history] == [h["step"] for h in solo_history]
    for f, s in zip(fused_history, solo_history):
        assert f["lr"] == pytest.approx(s["lr"], rel=1e-12)
        assert f["loss"] == pytest.approx(s["loss"], rel=1e-3, abs=1e-6)
        assert f["val_srcc"] == pytest.approx(s["val_srcc"], abs=1e-6)
    # last.pt resumes alone exactly as the solo run's would: same optimiser, schedule and sampler state.
    fused_last = torch.load(fused_dir / "last.pt", weights_only=False)
    solo_last = torch.load(solo_dir / "last.pt", weights_only=False)
    assert fused_last["scheduler"] == solo_last["scheduler"]
    assert torch.equal(fused_last["sampler"]["generator"], solo_last["sampler"]["generator"])
    assert torch.equal(fused_last["rng"]["torch"], solo_last["rng"]["torch"])
    assert fused_last["optimizer"]["param_groups"] == solo_last["optimizer"]["param_groups"]
    for a, b in zip(fused_last["optimizer"]["state"].values(), solo_last["optimizer"]["state"].values()):
        assert a.keys() == b.keys()
        # Second moments of near-zero gradients carry the rounding drift above in relative terms.
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"], rtol=5e-2, atol=1e-6)


@pytest.mark.parametrize("variants, dropout", [(VARIANTS, ()), (SHARED_LOSS, ()), (VARIANTS, PLAIN_DROPOUT),
                                               (SHARED_LOSS, ALL_DROPOUT)],
                         ids=["own-losses", "shared-loss", "own-losses-plain-dropout", "shared-loss-all-dropout"])
def test_fused_runs_end_with_the_weights_and_metrics_of_solo_runs(tmp_path, data, variants, dropout):
    labelled, features = data
    configs = [tiny_config(STEPS, *dropout, *variant) for variant in variants]
    assert len({fusion_key(c) for c in configs}) == 1 and fusion_key(configs[0]) is not None
    solo = [train_adapter(features, tmp_path / f"solo{i}", c, labelled.provenance) for i, c in enumerate(configs)]
    jobs = [FusedJob(tmp_path / f"fused{i}", c, resume=False) for i, c in enumerate(configs)]
    fused = train_fused(features, jobs, labelled.provenance, "cpu")
    for i, (f, s) in enumerate(zip(fused, solo)):
        assert isinstance(f, TrainResult), f
        assert_same_run(tmp_path / f"fused{i}", tmp_path / f"solo{i}", f, s)
    # The runs really differ from one another (a shared model would pass the checks above only by luck).
    assert not torch.equal(weights(tmp_path / "fused0/last.pt")["regression_head.mlp.out.weight"],
                           weights(tmp_path / "fused1/last.pt")["regression_head.mlp.out.weight"])


def test_a_diverging_run_fails_alone_and_an_interrupted_run_resumes_fused(tmp_path, data):
    labelled, features = data
    good = tiny_config(STEPS, *ALL_DROPOUT, "train.seed=2")
    bad = tiny_config(STEPS, *ALL_DROPOUT, "train.seed=2", "optim.lr=1e30")
    solo = train_adapter(features, tmp_path / "solo", good, labelled.provenance)

    with pytest.raises(Interrupted):
        train_adapter(features, tmp_path / "a", good, labelled.provenance, progress=stop_at(20))
    # The interrupted run continues from step 20 (with the masks of steps 21 on, as alone) while a
    # diverging one starts from 0.
    fused = train_fused(features, [FusedJob(tmp_path / "a", good, True), FusedJob(tmp_path / "b", bad, False)],
                        labelled.provenance, "cpu")
    assert isinstance(fused[1], TrainingDiverged) and "non-finite" in str(fused[1])
    assert_same_run(tmp_path / "a", tmp_path / "solo", fused[0], solo)


def test_each_fused_run_reports_the_seconds_until_it_ended(tmp_path, data, monkeypatch):
    # A clock on which every fused step takes one second: a run's seconds count the steps it was in.
    clock = [100.0]

    def one_second_step(*args, **kwargs):
        clock[0] += 1.0
        return fused_losses(*args, **kwargs)

    fused_losses = fused_module._fused_losses
    monkeypatch.setattr(fused_module, "_fused_losses", one_second_step)
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
    monkeypatch.setattr(fused_module, "time", fake_time)
    monkeypatch.setattr(loop_module, "time", fake_time)
    labelled, features = data
    configs = [tiny_config("train.max_steps=6", "train.eval_every=3"), tiny_config("train.max_steps=12", "train.eval_every=3")]
    jobs = [FusedJob(tmp_path / f"run{i}", c, resume=False) for i, c in enumerate(configs)]
    short, long = train_fused(features, jobs, labelled.provenance, "cpu")
    assert (short.seconds, long.seconds) == (6.0, 12.0)


def test_runs_that_cannot_fuse_have_no_key_and_mixed_keys_are_refused(tmp_path, data):
    assert fusion_key(tiny_config(*ALL_DROPOUT)) is not None  # dropout fuses (its masks are keyed)
    assert fusion_key(tiny_config(*ALL_DROPOUT)) != fusion_key(tiny_config(*PLAIN_DROPOUT))
    assert fusion_key(tiny_config("train.compile=default")) is None
    assert fusion_key(tiny_config("adapter.pair_checkpoint=true")) is None
    assert fusion_key(tiny_config("adapter.d_model=16")) != fusion_key(tiny_config())
    assert fusion_key(tiny_config("train.batch_size=8")) != fusion_key(tiny_config())
    # The features are shared: runs that would hold or stream them differently do not fuse.
    assert fusion_key(tiny_config("train.max_resident_gb=0.5")) != fusion_key(tiny_config())
    assert fusion_key(tiny_config("train.window_steps=7")) != fusion_key(tiny_config())
    assert fusion_key(tiny_config("train.eval_every=7", "train.seed=3")) == fusion_key(tiny_config())
    labelled, features = data
    jobs = [FusedJob(tmp_path / "a", tiny_config(), False), FusedJob(tmp_path / "b", tiny_config("adapter.d_model=16"), False)]
    with pytest.raises(ValueError, match="one fusion key"):
        train_fused(features, jobs, labelled.provenance, "cpu")
