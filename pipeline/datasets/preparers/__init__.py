"""Preparers for the paper's public datasets, chosen by name.

Each reads one dataset exactly as its authors distribute it and returns the samples, labels (with
the paper's queries) and splits (the paper's protocol); `prepare_dataset` writes them as tars with
a manifest. docs/datasets.md describes each layout and protocol.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from rankpipe.errors import InputError
from rankpipe.pipeline.datasets.preparers.adience import AdienceConfig, read_adience
from rankpipe.pipeline.datasets.preparers.ava import AVAConfig, read_ava
from rankpipe.pipeline.datasets.preparers.clevr import CLEVRConfig, read_clevr
from rankpipe.pipeline.datasets.preparers.coco_rem import COCOConfig, read_coco_rem
from rankpipe.pipeline.datasets.preparers.common import PrepareConfig, Prepared
from rankpipe.pipeline.datasets.preparers.hci import HCIConfig, read_hci
from rankpipe.pipeline.datasets.preparers.koniq10k import KonIQConfig, read_koniq10k
from rankpipe.pipeline.datasets.preparers.utkface import UTKFaceConfig, read_utkface


@dataclasses.dataclass(frozen=True)
class Preparer:
    """One dataset's reader and the type of its options."""

    # Registry name, also the dataset (and tar) name.
    name: str
    # One line for `--help` and error messages.
    title: str
    # Its options: a PrepareConfig subclass whose defaults are the paper's protocol.
    config_type: type[PrepareConfig]
    # Reads SRC into a Prepared.
    read: Callable[[Path, PrepareConfig], Prepared]


PREPARERS: dict[str, Preparer] = {p.name: p for p in (
    Preparer("koniq10k", "KonIQ-10k image quality (MOS), official split", KonIQConfig, read_koniq10k),
    Preparer("ava", "AVA aesthetics (mean vote) and attributes, official test list", AVAConfig, read_ava),
    Preparer("adience", "Adience age groups, 5 subject-exclusive folds", AdienceConfig, read_adience),
    Preparer("hci", "Historical colour images dated by decade, 1930s-1970s", HCIConfig, read_hci),
    Preparer("coco-rem", "COCO-REM / COCO object counts per category", COCOConfig, read_coco_rem),
    Preparer("utkface", "UTKFace age in years", UTKFaceConfig, read_utkface),
    Preparer("clevr", "CLEVR object counts per colour, material and shape", CLEVRConfig, read_clevr),
)}


def preparer_names() -> list[str]:
    """Names of every registered preparer."""
    return list(PREPARERS)


def get_preparer(name: str) -> Preparer:
    """The preparer called `name`; an InputError lists the known ones otherwise."""
    if name not in PREPARERS:
        raise InputError(f"no dataset preparer called {name!r}; known: {', '.join(PREPARERS)}")
    return PREPARERS[name]


__all__ = ["PREPARERS", "Preparer", "get_preparer", "preparer_names"]
