"""Training from a store larger than the memory budget: windows, schedule, prefetch, learning, validation."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from rankpipe.adapter.model.adapter import RankingAdapter
from rankpipe.adapter.training.features import (
    BatchSampler,
    ResidentFeatures,
    load_features,
)
from rankpipe.adapter.training.loop import train_adapter, train_from_store, validate
from rankpipe.adapter.training.streaming import StreamingFeatures, open_features
from rankpipe.adapter.training.windows import WindowSchedule
from rankpipe.errors import InputError
from rankpipe.pipeline.labelled_store import LabelledStore

from conftest import STREAMED, tiny_config, weights, write_synthetic_store

# The six-tar store below holds about 31 kB of tokens (200 train, 39 val rows of 128 bytes; 33 or
# 34 train rows per tar). 24 kB keeps its val rows resident (5 kB <= a quarter) and 19 kB streams
# them too; either way a window holds 74 rows: two tars.
VAL_RESIDENT = ("train.max_resident_gb=2.4e-5", "train.window_steps=8")
VAL_STREAMED = ("train.max_resident_gb=1.9e-5", "train.window_steps=8")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store(tmp_path):
    return write_synthetic_store(tmp_path / "synthetic.zarr")


@pytest.fixture
def six_tars(tmp_path):
    return write_synthetic_store(tmp_path / "six.zarr", n=240, tars=6, val_every=6)


def open_with(store, *settings: str):
    return open_features(LabelledStore.open(store, labels=["count", "size"]), "cpu", tiny_config(*settings).train)


@pytest.mark.parametrize(
    "settings, kind, val_resident",
    [((), ResidentFeatures, None), (VAL_RESIDENT, StreamingFeatures, True), (VAL_STREAMED, StreamingFeatures, False)],
    ids=["fits", "val-resident", "val-streamed"],
)
def test_streaming_only_when_the_tokens_exceed_the_budget(six_tars, settings, kind, val_resident):
    features = open_with(six_tars, *settings)
    assert type(features) is kind
    if val_resident is not None:
        assert (features.val_tokens is not None) == val_resident


def test_the_resident_path_is_unchanged_when_the_store_fits(tmp_path, six_tars):
    config = tiny_config("train.max_steps=12", "adapter.fusion_dropout=0.1", "adapter.plain_dropout=0.1")
    via_store = train_from_store(six_tars, tmp_path / "store", config)
    resident = load_features(LabelledStore.open(six_tars, labels=["count", "size"]), "cpu", 1.0)
    direct = train_adapter(resident, tmp_path / "direct", config, six_tars.provenance)
    a, b = weights(via_store.last_path), weights(direct.last_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("settings", [(), VAL_RESIDENT], ids=["resident", "val-resident"])
def test_opening_reads_each_resident_row_once_and_the_split_column_once_per_split(six_tars, monkeypatch, settings):
    rows_read, split_reads = [], []
    image_tokens, splits = six_tars.image_tokens, six_tars.splits

    def counting_image_tokens(rows, view="original"):
        tokens = image_tokens(rows, view)
        rows_read.append(len(tokens))
        return tokens

    def counting_splits():
        split_reads.append(1)
        return splits()

    monkeypatch.setattr(six_tars, "image_tokens", counting_image_tokens)
    monkeypatch.setattr(six_tars, "splits", counting_splits)
    features = open_with(six_tars, *settings)
    resident = features.image_tokens if isinstance(features, ResidentFeatures) else features.val_tokens
    assert sum(rows_read) == resident.shape[0]  # no row is read twice, none only for its shape
    assert len(split_reads) == 2  # train and val, whatever the number of labels


def test_the_resume_test_store_streams_in_two_windows(store):
    features = open_with(store, *STREAMED)
    assert isinstance(features, StreamingFeatures) and features.val_tokens is None
    first_epoch = [features.schedule.window_at(s) for s in range(1, 15)]
    assert sorted({plan.blocks for plan in first_epoch}) == [(0,), (1,)]


@pytest.mark.parametrize("settings", [VAL_RESIDENT, VAL_STREAMED], ids=["val-resident", "val-streamed"])
def test_batches_hold_the_stores_tokens_and_every_training_row_is_visited(six_tars, settings):
    features = open_with(six_tars, *settings)
    sampler = BatchSampler(features.train_sizes, 16, 0, "cpu")
    tokens = six_tars.image_tokens(slice(None))  # [N, P, D] the whole (tiny) store
    row_of = {str(k): i for i, k in enumerate(six_tars.keys())}
    seen = {q.name: set() for q in features.queries}
    capacity = features.schedule.capacity
    for step in range(1, 201):
        batch = features.train_batch(step, sampler)
        query = features.queries[batch.query_index]
        rows = np.array([row_of[str(k)] for k in features.keys[batch.rows.numpy()]])
        assert batch.image_tokens.shape == (len(rows), 4, 16)
        assert torch.equal(batch.image_tokens, torch.from_numpy(tokens[rows]))
        expected = query.scale.normalise(six_tars.label(query.name)[rows])
        np.testing.assert_allclose(batch.targets.numpy(), expected, rtol=1e-6)
        window = features._current
        assert window is not None and len(window.tokens) <= capacity
        starts = [features.blocks[b][0] for b in window.blocks]
        stops = [features.blocks[b][1] for b in window.blocks]
        assert all(any(lo <= r < hi for lo, hi in zip(starts, stops)) for r in rows)  # whole blocks only
        seen[query.name].update(rows.tolist())
    for query in features.queries:
        assert seen[query.name] == set(query.train_rows.tolist()), query.name


def test_each_epoch_covers_every_block_once_with_steps_in_proportion():
    block_rows = np.array([30, 10, 25, 30, 5, 20])
    per_query = np.stack([block_rows, block_rows // 2], axis=1)  # [K, Q]
    schedule = WindowSchedule(block_rows, per_query, capacity=40, window_steps=10, seed=3)
    epochs: dict[int, list] = {}
    step = 1
    while len(epochs) < 4:
        plan = schedule.window_at(step)
        epochs.setdefault(plan.epoch, []).append(plan)
        assert block_rows[list(plan.blocks)].sum() <= 40
        np.testing.assert_allclose(plan.weights, per_query[list(plan.blocks)].sum(0) / per_query[list(plan.blocks)].sum())
        step = plan.first_step + plan.steps
    orders = []
    for plans in list(epochs.values())[:3]:
        blocks = [b for plan in plans for b in plan.blocks]
        assert sorted(blocks) == list(range(6))
        orders.append(blocks)
        images = np.array([per_query[list(p.blocks)].sum() for p in plans])
        steps = np.array([p.steps for p in plans])
        np.testing.assert_allclose(steps / steps.sum(), images / images.sum(), atol=0.1)
        assert abs(steps.mean() - 10) <= 1
    assert len({tuple(o) for o in orders}) > 1  # epochs are permuted anew


def test_the_schedule_is_a_function_of_seed_and_step():
    block_rows = np.array([30, 10, 25, 30, 5, 20])
    per_query = np.stack([block_rows, block_rows // 3], axis=1)

    def schedule(seed):
        return WindowSchedule(block_rows, per_query, capacity=40, window_steps=10, seed=seed)

    a, b, c = schedule(0), schedule(0), schedule(1)
    steps = list(range(1, 400))
    walk = [(a.window_at(s).blocks, a.query_for(s)) for s in steps]
    # A fresh schedule asked out of order (as after a resume) agrees step for step.
    assert all((b.window_at(s).blocks, b.query_for(s)) == walk[s - 1] for s in reversed(steps))
    assert [(c.window_at(s).blocks, c.query_for(s)) for s in steps] != walk
    choices = np.array([q for _, q in walk])
    assert 0.6 < (choices == 0).mean() < 0.9  # queries mixed by their share of the window's images


def test_the_next_window_is_read_in_the_background(six_tars, monkeypatch):
    features = open_with(six_tars, *VAL_STREAMED)
    threads = []
    load = features._load

    def recording(blocks):
        threads.append(threading.current_thread().name)
        return load(blocks)

    monkeypatch.setattr(features, "_load", recording)
    sampler = BatchSampler(features.train_sizes, 16, 0, "cpu")
    switches = 0
    for step in range(1, 61):
        previous = features._current
        features.train_batch(step, sampler)
        switches += previous is not None and features._current is not previous
    assert switches >= 3
    assert threads[0] == threading.current_thread().name  # the first window is read on demand
    assert all(name.startswith("rankpipe-window") for name in threads[1:]) and len(threads) > switches


@pytest.mark.parametrize("settings", [VAL_RESIDENT, VAL_STREAMED], ids=["val-resident", "val-streamed"])
def test_streamed_validation_equals_resident_validation(six_tars, settings):
    resident = open_with(six_tars)
    streamed = open_with(six_tars, *settings)
    torch.manual_seed(0)
    model = RankingAdapter(tiny_config().adapter, resident.image_token_dim, resident.text_token_dim)
    expected = validate(model, resident, batch_size=7, device=torch.device("cpu"))
    assert validate(model, streamed, batch_size=7, device=torch.device("cpu")) == pytest.approx(expected, abs=1e-6)
    assert all(np.isfinite(v) for v in expected.values())


@pytest.mark.parametrize("settings", [VAL_RESIDENT, VAL_STREAMED], ids=["val-resident", "val-streamed"])
def test_streamed_training_learns_the_synthetic_ranking(tmp_path, six_tars, settings):
    untrained = train_from_store(six_tars, tmp_path / "zero", tiny_config("train.max_steps=1", "optim.lr=1e-9", *settings))
    result = train_from_store(six_tars, tmp_path / "run", tiny_config("train.max_steps=160", *settings))
    for name in ("count", "size"):
        assert result.best_srcc[name] > 0.8, result.best_srcc
        assert result.best_srcc[name] > untrained.best_srcc[name] + 0.3


def test_a_tar_larger_than_a_window_is_refused_with_the_budget_named(six_tars):
    with pytest.raises(InputError, match=r"x-00000\d\.tar has \d+ training images.*train\.max_resident_gb=6e-06"):
        open_with(six_tars, "train.max_resident_gb=6e-6")
    # Negatives need resident tokens whatever the tars' sizes: that refusal comes first.
    with pytest.raises(InputError, match=r"train\.negative_share needs the train/val image tokens resident"):
        open_with(six_tars, "train.max_resident_gb=6e-6", "train.negative_share=0.2")
