"""What a baseline is fitted on: each label's pooled image embeddings and targets, train and val."""

from __future__ import annotations

import dataclasses

import numpy as np

from rankpipe.adapter.training.targets import (
    TargetScale,
    fit_target_scale,
    transform_target,
)
from rankpipe.pipeline.labelled_store import LabelledStore


@dataclasses.dataclass
class LabelSplits:
    """One label's training and validation data as a baseline sees it."""

    # Label name in the store.
    name: str
    # The sentence that ranks by it.
    query: str
    # Target transform and training-split normalisation (what eval compares predictions with).
    scale: TargetScale
    # [n_train, E] float32 pooled image embeddings of the train split.
    train_embed: np.ndarray
    # [n_train] float64 targets in target units (label units for an identity target).
    train_targets: np.ndarray
    # [n_val, E] float32 pooled image embeddings of the val split.
    val_embed: np.ndarray
    # [n_val] float64 targets in target units.
    val_targets: np.ndarray
    # The label's ordered classes in label units (the manifest's `classes`); None for a continuous label.
    classes: tuple[float, ...] | None = None
    # Each class's name, in the order of `classes` (the manifest's `class_names`); None when not given.
    class_names: tuple[str, ...] | None = None
    # The sentence describing an image of one class, with {name} (the manifest's `class_prompt`).
    class_prompt: str | None = None

    def named_classes(self) -> tuple[np.ndarray, list[str]] | None:
        """The manifest's classes as increasing target values with their names, when they are ranks.

        Only with an identity target (a distance target folds the classes, so they no longer rank)
        and class names in the manifest.

        Returns:
            ([K] increasing class values in target units, their K names), or None.
        """
        if not self.classes or self.class_names is None or self.scale.transform.kind != "identity":
            return None
        values = np.asarray(self.classes, dtype=np.float64)  # [K]
        order = np.argsort(values, kind="stable")
        return values[order], [self.class_names[i] for i in order]


def load_label_splits(data: LabelledStore) -> list[LabelSplits]:
    """Read the train and val embeddings and targets of the labels of `data`.

    Split roles and target transforms come from `data.manifest` (the store's own or an override).

    Raises:
        InputError: a label with fewer than 2 train or val images.
    """
    store, manifest = data.store, data.manifest
    out = []
    for name, (train_rows, val_rows) in data.split_rows().items():
        transform = manifest.label(name).target
        raw = store.label(name)
        out.append(
            LabelSplits(
                name=name,
                query=store.query(name),
                scale=fit_target_scale(raw[train_rows], transform, name),
                train_embed=np.asarray(store.image_embed(train_rows), dtype=np.float32),
                train_targets=transform_target(raw[train_rows], transform),
                val_embed=np.asarray(store.image_embed(val_rows), dtype=np.float32),
                val_targets=transform_target(raw[val_rows], transform),
                classes=manifest.label(name).classes,
                class_names=manifest.label(name).class_names,
                class_prompt=manifest.label(name).class_prompt,
            )
        )
    return out
