"""What every baseline is: a per-label scorer of pooled image embeddings, fitted once, saved as plain data."""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from rankpipe.adapter.baselines.data import LabelSplits
from rankpipe.adapter.baselines.prompts import PromptEncoder, fit_affine
from rankpipe.errors import InputError

log = logging.getLogger(__name__)


class Baseline(abc.ABC):
    """A fitted baseline: per-label parameters that turn pooled image embeddings into target-unit scores.

    Subclasses set `config_class` (a frozen dataclass of the method's settings) and implement `fit`
    and `predict`; `params` holds only tensors, numbers, strings and lists, so a checkpoint holding it
    opens with `torch.load(weights_only=True)`.
    """

    # The registered method name (set by register_method).
    name: ClassVar[str] = ""
    # The method's settings dataclass.
    config_class: ClassVar[type]

    def __init__(self, config: Any, params: dict[str, dict[str, Any]]) -> None:
        self.config = config
        # Label name -> that label's fitted parameters.
        self.params = params

    @classmethod
    @abc.abstractmethod
    def fit(cls, config: Any, data: Sequence[LabelSplits], prompts: PromptEncoder) -> Baseline:
        """Fit one scorer per label from its train (and, where the method selects a setting, val) split.

        Args:
            config: an instance of `config_class`.
            data: one LabelSplits per label.
            prompts: the store's text tower, for methods that score prompts.
        """

    @abc.abstractmethod
    def predict(self, label: str, embed: np.ndarray) -> np.ndarray:
        """Scores in target units (label units for an identity target).

        Args:
            label: one of the fitted labels.
            embed: [n, E] pooled image embeddings (any float dtype).

        Returns:
            [n] float64 scores.
        """

    def state(self) -> dict[str, dict[str, Any]]:
        """The per-label parameters as checkpoint data."""
        return self.params

    @classmethod
    def from_state(cls, config_json: str, state: dict[str, dict[str, Any]]) -> Baseline:
        """Rebuild a fitted baseline from its checkpoint's config JSON and `state()`."""
        return cls(cls.config_class(**json.loads(config_json)), state)

    def config_json(self) -> str:
        """The settings as the JSON string a checkpoint stores."""
        return json.dumps(dataclasses.asdict(self.config), sort_keys=True)

    def label_params(self, label: str) -> dict[str, Any]:
        """The parameters of `label`.

        Raises:
            InputError: the baseline was not fitted on that label.
        """
        if label not in self.params:
            raise InputError(f"the {self.name} baseline was not fitted on label {label!r}; its labels are {', '.join(self.params)}")
        return self.params[label]


class AffineBaseline(Baseline):
    """An untrained score of the embedding (`raw_scores`), mapped to target units by an affine fit on the
    train split (prompts.fit_affine); each label's params hold its "prompts", "slope" and "intercept"."""

    @abc.abstractmethod
    def raw_scores(self, label: str, embed: np.ndarray) -> np.ndarray:
        """[n, E] embeddings -> [n] untrained scores."""

    def fit_affine_maps(self, data: Sequence[LabelSplits]) -> None:
        """Fit each label's slope and intercept on its train split."""
        for split in data:
            raw = self.raw_scores(split.name, split.train_embed)
            slope, intercept = fit_affine(raw, split.train_targets, f"{self.name} {split.name}")
            self.params[split.name].update(slope=slope, intercept=intercept)
            log.info("%s %s: %d prompt(s), target = %.4g * score + %.4g", self.name, split.name,
                     len(self.params[split.name]["prompts"]), slope, intercept)

    def predict(self, label: str, embed: np.ndarray) -> np.ndarray:
        p = self.label_params(label)
        return p["slope"] * self.raw_scores(label, embed) + p["intercept"]
