"""Sentence templates with named placeholders: class prompts, count prompts, text-axis prompts.

A template is checked the way it will be used, by formatting it, so one with a placeholder nothing
fills ("A {name} in {era}.") is refused when the config or manifest is read, not by a KeyError
halfway through scoring.
"""

from __future__ import annotations

import string


def check_template(what: str, template: str, placeholders: tuple[str, ...], required: bool = True) -> None:
    """Refuse a template that names a placeholder other than `placeholders` or, when `required`, lacks one.

    Raises:
        ValueError: one sentence naming `what`, the placeholders it may use and the template.
    """
    allowed = " and ".join(f"{{{name}}}" for name in placeholders)
    noun = "placeholder" if len(placeholders) == 1 else "placeholders"
    try:
        template.format(**{name: "x" for name in placeholders})
        used = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ValueError(f"{what} may use only the {noun} {allowed}, not {template!r}") from e
    if required and not set(placeholders) <= used:
        raise ValueError(f"{what} must contain {allowed}, not {template!r}")
