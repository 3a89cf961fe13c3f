"""Baseline methods the ranking adapter is compared against, chosen by name.

Every baseline scores CLIP's pooled, projected image embedding (the store's `image/embed`) and keeps
the image encoder frozen. `rankpipe train --method NAME` fits one; its checkpoint records the method
and everything it needs to score images, so `rankpipe eval` reads it like an adapter's.

A method is a `Baseline` subclass registered with `@register_method("name")`; `get_method` looks a
name up and names the known ones when it is unknown (docs/baselines.md describes each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from rankpipe.adapter import ADAPTER_METHOD
from rankpipe.adapter.baselines.base import Baseline
from rankpipe.errors import InputError

__all__ = ["Baseline", "register_method", "get_method", "method_names"]

_METHODS: dict[str, type[Baseline]] = {}

B = TypeVar("B", bound=type[Baseline])


def register_method(name: str) -> Callable[[B], B]:
    """Class decorator: make a Baseline subclass selectable as `name`."""

    def register(cls: B) -> B:
        if name == ADAPTER_METHOD or name in _METHODS:
            raise ValueError(f"method name {name!r} is already taken")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return register


def method_names() -> list[str]:
    """Every method `rankpipe train --method` accepts: the adapter first, then the baselines."""
    return [ADAPTER_METHOD, *sorted(_METHODS)]


def get_method(name: str) -> type[Baseline]:
    """The baseline registered as `name`.

    Raises:
        InputError: no baseline has that name (the message lists the known methods).
    """
    if name not in _METHODS:
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(method_names())}")
    return _METHODS[name]


# Importing the method modules registers them.
from rankpipe.adapter.baselines import (  # noqa: E402,F401
    clip_iqa,
    coop,
    l2rclip,
    linear_probe,
    ordinalclip,
    rank_axis,
    text_axis,
    zero_shot,
)
