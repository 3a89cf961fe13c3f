"""The schedule of a streamed training run: which window of row blocks, and which query, train at each step.

Epoch e permutes the blocks that hold training rows with a generator seeded by (seed, e) and packs
them in that order into windows of at most `capacity` rows. Every window and every query draw is a
function of (seed, step) alone, so a resumed run lands on the same window and the same queries.
"""

from __future__ import annotations

import bisect
import dataclasses

import numpy as np

from rankpipe.errors import InputError

# Seed-sequence tags that keep the block permutations and the query draws independent streams.
_PERMUTATION_TAG, _QUERY_TAG = 1, 2


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """One window of the schedule: which row blocks it holds and which steps train on it."""

    # Epoch of the schedule (every block with training rows appears once per epoch).
    epoch: int
    # Position of the window in its epoch.
    index: int
    # Indices into the schedule's blocks, ascending.
    blocks: tuple[int, ...]
    # 1-based step of its first batch.
    first_step: int
    # Steps trained on it (> 0).
    steps: int
    # [Q] probability of each query per step: its share of the window's trainable images.
    weights: np.ndarray


class WindowSchedule:
    """Which window and which query train at each step: a pure function of (seed, step).

    Epoch e permutes the blocks with a generator seeded by (seed, e) and packs them, in that order,
    into windows of at most `capacity` rows. A window's steps are its share of the epoch's
    `window_steps` x windows, in proportion to its trainable images (those of queries with at least 2
    images in the window: a pair needs two). Its queries are drawn in proportion to their trainable
    images, or with `uniform_queries` uniformly among those that have any.
    """

    def __init__(self, block_rows: np.ndarray, block_query_rows: np.ndarray, capacity: int, window_steps: int, seed: int,
                 uniform_queries: bool = False):
        """
        Args:
            block_rows: [K] distinct training rows of each block (what a window must hold).
            block_query_rows: [K, Q] training rows of each query in each block.
            capacity: most rows in one window; no block may exceed it.
            window_steps: mean steps per window.
            seed: the run's seed.
            uniform_queries: draw each step's query uniformly among the window's trainable queries.
        """
        self.block_rows = np.asarray(block_rows, dtype=np.int64)
        self.block_query_rows = np.asarray(block_query_rows, dtype=np.int64)
        self.capacity = capacity
        self.window_steps = window_steps
        self.seed = seed
        self.uniform_queries = uniform_queries
        self._windows: list[WindowPlan] = []  # every epoch planned so far, in step order
        self._starts: list[int] = []  # first_step of each planned window
        self._next_epoch = 0
        self._queries: tuple[WindowPlan, np.ndarray] | None = None
        if not self._plan_next_epoch():
            raise InputError(
                "no window of the streamed store holds 2 training images of one label (a pair needs two); "
                "raise train.max_resident_gb with --set train.max_resident_gb=N"
            )

    def window_at(self, step: int) -> WindowPlan:
        """The window that trains at `step` (1-based)."""
        while self._windows[-1].first_step + self._windows[-1].steps <= step:
            self._plan_next_epoch()
        return self._windows[bisect.bisect_right(self._starts, step) - 1]

    def query_for(self, step: int) -> int:
        """Index of the query trained at `step`, drawn from its window's weights."""
        plan = self.window_at(step)
        if self._queries is None or self._queries[0] is not plan:
            rng = np.random.default_rng([self.seed, _QUERY_TAG, plan.epoch, plan.index])
            self._queries = (plan, rng.choice(len(plan.weights), size=plan.steps, p=plan.weights))
        return int(self._queries[1][step - plan.first_step])

    def _plan_next_epoch(self) -> bool:
        """Append the next epoch's windows that have steps; whether it had any."""
        epoch = self._next_epoch
        self._next_epoch += 1
        order = np.random.default_rng([self.seed, _PERMUTATION_TAG, epoch]).permutation(len(self.block_rows))
        groups, current, used = [], [], 0
        for block in order:
            if current and used + self.block_rows[block] > self.capacity:
                groups.append(current)
                current, used = [], 0
            current.append(int(block))
            used += int(self.block_rows[block])
        groups.append(current)
        per_query = np.stack([self.block_query_rows[g].sum(axis=0) for g in groups])  # [W, Q]
        trainable = np.where(per_query >= 2, per_query, 0)  # [W, Q] images that can form pairs
        images = trainable.sum(axis=1)  # [W]
        if images.sum() == 0:
            return False
        share = self.window_steps * len(groups) * images / images.sum()  # [W] steps in proportion
        steps = np.where(images > 0, np.maximum(1, np.rint(share)), 0).astype(np.int64)
        start = self._windows[-1].first_step + self._windows[-1].steps if self._windows else 1
        for index, group in enumerate(groups):
            if steps[index] == 0:
                continue
            shares = (trainable[index] > 0).astype(np.float64) if self.uniform_queries else trainable[index]
            plan = WindowPlan(epoch, index, tuple(sorted(group)), start, int(steps[index]), shares / shares.sum())
            self._windows.append(plan)
            self._starts.append(start)
            start += plan.steps
        return True
