"""A token store as a learning job sees it: the store, the manifest that assigns its split roles and
target transforms, and the labels the job uses.

Training, baseline fitting and sweeps all start from one `LabelledStore`, so the manifest check and
the choice of labels happen once, in one place, with the same messages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rankpipe.errors import InputError
from rankpipe.pipeline.data.manifest import Manifest
from rankpipe.pipeline.store import TokenStore

log = logging.getLogger(__name__)

# The share of training images that validates a run on a store without a val split.
VAL_SHARE = 0.1

# (train rows, val rows) of one label, each ascending.
TrainValRows = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LabelledStore:
    """A TokenStore, the manifest to read it with, and the labels a job uses."""

    # The open token store.
    store: TokenStore
    # Split roles and target transforms: the store's own manifest or an override whose labels'
    # queries match the store's (see `open`).
    manifest: Manifest
    # The labels the job uses, in order; each is a label of the store.
    labels: tuple[str, ...]
    # Share of the training images that validate instead, chosen by a hash of their keys: 0 unless the
    # store has no image in the manifest's val split (`open` decides).
    val_share: float = 0.0
    # (train rows, val rows), ascending, valid rows only, after any val share was carved from train:
    # read once in `open`, since the split column is the slowest array to read.
    split_rows_read: TrainValRows | None = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def open(
        cls,
        store: TokenStore,
        manifest: Manifest | None = None,
        labels: Sequence[str] = (),
        among: Sequence[str] | None = None,
    ) -> LabelledStore:
        """The labelled view of `store`.

        Args:
            store: an open TokenStore.
            manifest: overrides the store's split roles and target transforms (same labels and queries).
            labels: the labels asked for; each must be in the store (too few images is an error later,
                when its rows are read).
            among: without `labels`, the candidates (default: every label of the store); those with
                fewer than 2 train or val images (a query held out of training) are left out with a warning.

        A store with no image in the val split (a dataset published with train and test only) is
        validated on a seeded `VAL_SHARE` of its training images instead, with a warning; a manifest
        that maps a val split (`--manifest`) chooses them instead.

        Raises:
            InputError: an unlabelled store, a manifest that does not match the store, a label not in
                the store, or no candidate with 2 or more images in both the train and val splits.
        """
        if not store.label_names:
            raise InputError(
                f"store {store.path} holds an unlabelled collection, which nothing can be trained on; train on a "
                "store embedded from labelled shards, and rank this one with rankpipe rank --store"
            )
        manifest = _matching_manifest(store, manifest)
        note = store.invalid_note()
        if note:
            log.warning(note)
        read = (store.rows(list(manifest.splits.values("train"))), store.rows(list(manifest.splits.values("val"))))
        val_values = list(manifest.splits.values("val"))
        val_share = 0.0
        if not len(read[1]):
            val_share = VAL_SHARE
            log.warning("store %s has no image in the val split %s: %d%% of the training images, chosen by a hash "
                        "of their keys, validate instead (recorded in the run); map a val split with --manifest "
                        "to choose them", store.path, val_values, round(100 * VAL_SHARE))
            read = _carve_val(store, read[0], val_share)
        if labels:
            _require_labels(store, labels)
            for name in labels:
                manifest.label(name)
            return cls(store, manifest, tuple(dict.fromkeys(labels)), val_share, read)
        candidates = list(among) if among is not None else list(store.label_names)
        _require_labels(store, candidates)
        chosen = _labels_with_pairs(store, manifest, candidates, read)
        return cls(store, manifest, tuple(chosen), val_share, read)

    @property
    def path(self) -> Path:
        """The store's folder."""
        return self.store.path

    @property
    def provenance(self) -> dict:
        """The store's provenance (backbone, weights, preprocessing)."""
        return self.store.provenance

    @property
    def identity(self) -> str:
        """The store's identity (TokenStore.identity) combined with the manifest it is read with: what a
        run's split roles and target normalisation depend on."""
        made_from = json.dumps([self.store.identity, self.manifest.to_dict(), self.val_share], sort_keys=True,
                               default=str)
        return hashlib.sha256(made_from.encode()).hexdigest()

    def labelled_rows(self) -> dict[str, TrainValRows]:
        """The (train, val) store rows of each label that have a value, ascending."""
        read = self.split_rows_read
        if read is None:  # built directly rather than by `open`: the manifest's splits as they are
            read = (self.store.rows(list(self.manifest.splits.values("train"))),
                    self.store.rows(list(self.manifest.splits.values("val"))))
        return _labelled_rows(self.store, self.labels, read)

    def split_rows(self) -> dict[str, TrainValRows]:
        """`labelled_rows`, checked: every label has 2 or more train and val images.

        Raises:
            InputError: a label has fewer than 2 train or val images.
        """
        train_values = list(self.manifest.splits.values("train"))
        val_values = list(self.manifest.splits.values("val"))
        per_label = self.labelled_rows()
        for name, (train_rows, val_rows) in per_label.items():
            if len(train_rows) < 2:
                raise InputError(
                    f"label {name!r} has {len(train_rows)} training image(s) in split values {train_values}; "
                    "at least 2 are needed: check the manifest's train split"
                )
            if len(val_rows) < 2:
                raise InputError(
                    f"label {name!r} has {len(val_rows)} validation image(s) in split values {val_values}; "
                    "at least 2 are needed: map a val split with --manifest"
                )
        return per_label


def _carve_val(store: TokenStore, train: np.ndarray, share: float) -> TrainValRows:
    """(train, val) rows: `share` of the `train` rows, chosen by a hash of their keys, become val.

    A key's hash, not its position, decides, so the choice survives reordered or added tars.
    """
    keys = store.keys()[train]  # [T]
    u = np.array([int.from_bytes(hashlib.sha256(f"val:{k}".encode()).digest()[:8], "big") / 2**64 for k in keys])
    return train[u >= share], train[u < share]


def _labelled_rows(store: TokenStore, labels: Sequence[str], read: TrainValRows) -> dict[str, TrainValRows]:
    """The (train, val) rows of `read` that have a value of each label: the same rows as
    `store.rows(values, label=name)`, without reading the split column once per label."""
    train, val = read
    per_label = {}
    for name in labels:
        has_value = np.isfinite(store.label(name))  # [N]
        per_label[name] = (train[has_value[train]], val[has_value[val]])
    return per_label


def _labels_with_pairs(store: TokenStore, manifest: Manifest, names: Sequence[str], read: TrainValRows) -> list[str]:
    """The labels among `names` with 2 or more train and val images; the others are logged and left out."""
    labels = []
    for name, (train_rows, val_rows) in _labelled_rows(store, names, read).items():
        counts = len(train_rows), len(val_rows)
        if min(counts) >= 2:
            labels.append(name)
        else:
            log.warning("label %r has %d training and %d validation images, fewer than 2 (held out of "
                        "training?); not trained — pass --label to choose the labels", name, *counts)
    if not labels:
        train_values = list(manifest.splits.values("train"))
        val_values = list(manifest.splits.values("val"))
        raise InputError(f"no label of store {store.path} has 2 or more images in both the train split "
                         f"{train_values} and the val split {val_values}; check the manifest's splits")
    return labels


def _require_labels(store: TokenStore, names: Sequence[str]) -> None:
    missing = [name for name in names if name not in store.label_names]
    if missing:
        raise InputError(f"store {store.path} has no label{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
                         f"its labels are {', '.join(store.label_names)}")


def _matching_manifest(store: TokenStore, manifest: Manifest | None) -> Manifest:
    """The manifest to read the store with: its own, or an override whose labels' queries match the store's."""
    if manifest is None:
        return store.manifest
    for label in manifest.labels:
        if label.name not in store.label_names:
            raise InputError(
                f"manifest {manifest.path or manifest.name} has label {label.name!r} that store {store.path} "
                f"does not; its labels are {', '.join(store.label_names)}"
            )
        if label.query != store.query(label.name):
            raise InputError(
                f"manifest {manifest.path or manifest.name} asks {label.query!r} for label {label.name!r} but the "
                f"store embedded {store.query(label.name)!r}; re-embed to change a query"
            )
    return manifest
