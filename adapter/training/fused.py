"""Several training runs of the same shapes as one fused model: one forward and backward pass per step.

Runs that differ only in settings that leave the adapter's parameter shapes and computation alone —
learning rate and the rest of the optimiser, the loss settings (λ, the pairwise form, margins), the
seed, the run length and how often it validates (see `fusion_key`) — can train together. Each run keeps
everything of its own, as a `TrainingRun`: its weights, initialised from its own seed; its AdamW, lr
schedule and gradient clipping; its loss settings; its sampler; its loss monitor, validations,
checkpoints and history. Only the forward and backward passes are shared: every step the runs'
parameters are stacked along a leading run dimension, `torch.func.vmap` of `functional_call` computes
every run's scores and pair logits in one pass (and the loss too when the runs share their loss
settings; otherwise each run's loss is computed with its own), and one backward pass of their sum gives every run the gradients it would get alone (runs share no
weights, so no gradient crosses from one to another). A fused run therefore ends with the weights (to
float rounding: batched matrix products round differently) and the checkpoints, history and metrics
it would have had alone, and its last.pt resumes alone or fused alike. Dropout does not stand in the
way: its masks are a function of (seed, step, site) (adapter/model/dropout.py), and each run's step key
is one more input of the vmapped pass, so every run draws the masks it draws alone.

Runs of one seed draw the same batches: they share one gather. Runs of different seeds gather their
own batches, which are stacked; since queries' text lengths differ, a step's runs are grouped by the
query they train, one fused pass per query.

Left to train alone (`fusion_key` is None): `train.compile` other than "off" (the fused pass is eager)
and `adapter.pair_checkpoint` (activation checkpointing does not compose with vmap).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from rankpipe.adapter.model.adapter import AdapterOutput, RankingAdapter
from rankpipe.adapter.model.config import LossConfig
from rankpipe.adapter.model.losses import LossParts, ranking_loss
from rankpipe.adapter.training.features import BatchSampler, TrainBatch
from rankpipe.adapter.training.loop import TrainingRun, TrainResult
from rankpipe.adapter.training.run_config import RunConfig
from rankpipe.adapter.training.streaming import TrainingFeatures
from rankpipe.devices import autocast
from rankpipe.files import exclusive_output
from rankpipe.pipeline.data.manifest import SplitSpec

log = logging.getLogger(__name__)

# Fields that may differ between fused runs: each run applies its own. Every other field (the adapter's
# architecture, the batch size, train.compile, any field added later) must be equal; so must
# train.max_resident_gb and train.window_steps, which decide the features the runs share (resident or
# streamed, and the window schedule).
PER_RUN_SECTIONS = ("optim", "loss")
PER_RUN_TRAIN_FIELDS = ("seed", "max_steps", "eval_every", "log_every", "eval_batch_size")


@dataclasses.dataclass(frozen=True)
class FusedJob:
    """One run to train fused with others."""

    # Where its best.pt, last.pt and history.jsonl go.
    out_dir: Path
    # Its run config.
    config: RunConfig
    # Continue from its last.pt.
    resume: bool


# What a fused job ended with: its result, the exception that ended it alone (e.g. TrainingDiverged), or
# None when the fused pass itself failed (e.g. out of memory) and the run should continue alone.
Outcome = TrainResult | BaseException | None


def fusion_key(config: RunConfig) -> str | None:
    """Runs whose keys are equal can train fused; None: this run trains alone (see the module docstring)."""
    if config.train.compile != "off" or config.adapter.pair_checkpoint:
        return None
    shared = config.to_dict()
    for section in PER_RUN_SECTIONS:
        shared.pop(section)
    for name in PER_RUN_TRAIN_FIELDS:
        shared["train"].pop(name)
    return json.dumps(shared, sort_keys=True)


def train_fused(
    features: TrainingFeatures,
    jobs: Sequence[FusedJob],
    provenance: dict,
    device: str | torch.device,
    splits: SplitSpec | None = None,
    store_identity: str | None = None,
    val_from_train: float = 0.0,
) -> list[Outcome]:
    """Train `jobs` (of one `fusion_key`) on shared features as one fused model; one outcome per job.

    Arguments after `jobs` are those of loop.train_adapter. A job that cannot start (a resume that does
    not match its saved run) or that diverges ends with its exception; the others go on. Runs resumed
    at different steps train fused in turn, one group per starting step.
    """
    keys = {fusion_key(job.config) for job in jobs}
    if len(keys) != 1 or None in keys:
        raise ValueError("train_fused takes runs of one fusion key; group them with fusion_key first")
    device = torch.device(device)
    outcomes: list[Outcome] = [None] * len(jobs)
    with contextlib.ExitStack() as locks:
        runs: dict[int, TrainingRun] = {}
        for index, job in enumerate(jobs):
            try:
                locks.enter_context(exclusive_output(job.out_dir, "rankpipe train"))
                runs[index] = TrainingRun(features, job.out_dir, job.config, provenance, device, job.resume,
                                          splits=splits, store_identity=store_identity, val_from_train=val_from_train)
            except Exception as e:  # this run's own failure (e.g. a resume that does not match)
                outcomes[index] = e
        by_start = collections.defaultdict(list)
        for index, run in runs.items():
            by_start[run.step].append(index)
        for indices in by_start.values():
            group = {i: runs[i] for i in indices}
            outcomes_of_group = _train_together(features, list(group.values()), device)
            for i, outcome in zip(group, outcomes_of_group):
                outcomes[i] = outcome
    return outcomes


def _train_together(features: TrainingFeatures, runs: list[TrainingRun], device: torch.device) -> list[Outcome]:
    """Train runs that start at the same step until each finishes or fails."""
    outcomes: dict[int, Outcome] = {}
    # Runs of one seed at one step hold equal samplers: one of them draws for all.
    samplers: dict[int, BatchSampler] = {}
    for run in runs:
        run.sampler = samplers.setdefault(run.cfg.train.seed, run.sampler)
    active = [i for i, run in enumerate(runs) if not run.finished]
    began = time.monotonic()
    for i, run in enumerate(runs):
        run.started = began  # not the earlier groups' training: each run's seconds are its own
        if run.finished:
            outcomes[i] = _result(run)
    while active:
        step = runs[active[0]].step + 1
        seeds = {runs[i].cfg.train.seed for i in active}
        batches = {seed: features.train_batch(step, samplers[seed]) for seed in seeds}
        for i in active:
            runs[i].begin_step(batches[runs[i].cfg.train.seed])
        try:
            parts = _fused_losses([runs[i] for i in active], batches, features, device)
            sum(p.total for p in parts).backward()
        except Exception as e:  # e.g. out of memory with this many runs at once: they continue alone
            log.warning("the fused step of %d runs failed (%s); they continue alone from their last.pt",
                        len(active), e)
            for i in active:
                outcomes[i] = None
            break
        still = []
        for i, p in zip(active, parts):
            run = runs[i]
            try:
                run.end_step(p, batches[run.cfg.train.seed])
            except Exception as e:  # this run's own failure (TrainingDiverged, a checkpoint that cannot be written)
                outcomes[i] = e
                continue
            if run.finished:
                outcomes[i] = _result(run)
            else:
                still.append(i)
        active = still
    return [outcomes.get(i) for i in range(len(runs))]


def _result(run: TrainingRun) -> Outcome:
    try:
        return run.result()
    except Exception as e:
        return e


def _fused_losses(runs: list[TrainingRun], batches: dict[int, TrainBatch], features: TrainingFeatures,
                  device: torch.device) -> list[LossParts]:
    """Each run's loss parts of this step (in `runs` order), from one vmapped forward pass per query."""
    by_query: dict[int, list[int]] = collections.defaultdict(list)
    for i, run in enumerate(runs):
        by_query[batches[run.cfg.train.seed].query_index].append(i)
    parts: list[LossParts | None] = [None] * len(runs)
    for query_index, members in by_query.items():
        group = [runs[i] for i in members]
        group_batches = [batches[run.cfg.train.seed] for run in group]
        if len({run.cfg.train.seed for run in group}) == 1:  # one batch for all: broadcast, no copies
            images, images_dim = group_batches[0].image_tokens, None  # (B, P, D)
        else:
            images, images_dim = torch.stack([b.image_tokens for b in group_batches]), 0  # (R, B, P, D)
        text = features.queries[query_index].text_tokens  # (L, Dt)
        template = group[0].model
        params = stack_parameters([run.model for run in group])  # name -> (R, ...)
        keys = torch.stack([run.dropout_key for run in group])  # (R, 2) each run's step key
        if all(run.cfg.loss == group[0].cfg.loss for run in group):
            # One loss setting: the loss joins the vmapped pass.
            if images_dim is None:
                targets, targets_dim = group_batches[0].targets, None  # (B,)
            else:
                targets, targets_dim = torch.stack([b.targets for b in group_batches]), 0  # (R, B)
            loss_of = _vmapped_loss(template, group[0].cfg.loss, device)
            total, regression, pairwise = vmap(loss_of, in_dims=(0, images_dim, None, targets_dim, 0))(
                params, images, text, targets, keys)  # (R,) each
            for r, i in enumerate(members):
                parts[i] = LossParts(total=total[r], regression=regression[r], pairwise=pairwise[r])
            continue

        def forward(p: dict[str, torch.Tensor], image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                    dropout_key: torch.Tensor, template: RankingAdapter = template) -> tuple[torch.Tensor, ...]:
            out = functional_call(template, p, (image_tokens, text_tokens),
                                  {"with_pairs": True, "dropout_key": dropout_key})
            return (out.scores,) if out.pair_logits is None else (out.scores, out.pair_logits)

        with autocast(device), _batchable_attention(device):
            outputs = vmap(forward, in_dims=(0, images_dim, None, 0))(params, images, text, keys)  # (R, B), (R, B, B)
        for r, (i, run) in enumerate(zip(members, group)):  # each run's own loss settings
            pair_logits = outputs[1][r] if len(outputs) > 1 else None
            output = AdapterOutput(scores=outputs[0][r], pair_logits=pair_logits)
            parts[i] = ranking_loss(output, group_batches[r].targets, run.cfg.loss)
    return parts


def _vmapped_loss(template: RankingAdapter, loss: LossConfig, device: torch.device):
    """The loss parts (total, regression, pairwise) of one run's parameters, batch, targets and dropout
    key: the step's function to vmap over runs that share their loss settings."""

    def loss_of(p: dict[str, torch.Tensor], image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                targets: torch.Tensor, dropout_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with autocast(device), _batchable_attention(device):
            output = functional_call(template, p, (image_tokens, text_tokens),
                                     {"with_pairs": True, "dropout_key": dropout_key})
        parts = ranking_loss(output, targets, loss)
        return parts.total, parts.regression, parts.pairwise

    return loss_of


def stack_parameters(models: Sequence[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """{name: [R, ...]} the models' parameters stacked along a new leading dimension, differentiably
    (each model's own parameters receive the gradients of their slice)."""
    names = [name for name, _ in models[0].named_parameters()]
    per_model = [list(model.parameters()) for model in models]
    return {name: torch.stack(values) for name, values in zip(names, zip(*per_model))}


def _batchable_attention(device: torch.device) -> contextlib.AbstractContextManager:
    """On a CPU, SDPA's math kernel: vmap has no batching rule for the CPU flash kernel and would loop
    over the runs. CUDA's flash, memory-efficient and cuDNN kernels have one."""
    return sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()
