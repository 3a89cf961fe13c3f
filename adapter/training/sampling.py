"""Checks of the released sampling's zero-count negatives (`train.negative_share`).

A negative is another label's training image given the target of a zero label for this batch's
query. That is right only for counts, where an image without the label holds none of the thing
counted. A store does not say whether a label is a count, so the setting is the user's statement;
these checks refuse what cannot be a count and a run with no other label to draw negatives from.
"""

from __future__ import annotations

import numpy as np

from rankpipe.errors import InputError
from rankpipe.pipeline.labelled_store import LabelledStore


def refuse_single_label(num_labels: int) -> None:
    """Refuse zero-count negatives when fewer than 2 labels train together: there is nothing to draw them from.

    Raises:
        InputError: saying what to do.
    """
    if num_labels < 2:
        raise InputError(
            "train.negative_share draws other labels' images as zero counts, but only one label trains; "
            "train several count labels together or set train.negative_share=0"
        )


def refuse_non_counts(data: LabelledStore) -> None:
    """Refuse zero-count negatives unless every training value of the labels of `data` is a count.

    Raises:
        InputError: a label with a training value that is not a non-negative integer.
    """
    for name, (train_rows, _) in data.labelled_rows().items():
        values = np.asarray(data.store.label(name)[train_rows], dtype=np.float64)
        bad = values[(values < 0) | (values != np.round(values))]
        if len(bad):
            raise InputError(
                f"train.negative_share is for count labels, but label {name!r} has the training value {bad[0]:g}, "
                "not a non-negative integer; set train.negative_share=0 for it"
            )
