"""Settings from the user: YAML files, `KEY=VALUE` options, and plain values converted to typed dataclasses.

Every typed config in rankpipe (the run config, a baseline's settings, a dataset preparer's options,
a sweep's overrides) is built here, so one spelling of a value means the same everywhere: `true`,
`yes`, `on` and `1` are true; `none`, `null` and `~` are None; a list is `a,b` or `[a, b]`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rankpipe.errors import InputError

TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
FALSE_WORDS = frozenset({"false", "no", "off", "0"})
NONE_WORDS = frozenset({"none", "null", "~"})


def load_yaml(path: str | Path, what: str, hint: str, error: type[InputError] = InputError) -> Any:
    """The parsed contents of YAML file `path` (None for an empty file).

    Args:
        path: the file.
        what: what the file is, for messages ("manifest", "sweep file", ...).
        hint: what to pass instead when the file does not exist.
        error: the InputError subclass to raise.

    Raises:
        error: the file does not exist or is not valid YAML.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist; {hint}")
    return parse_yaml(path.read_text(), f"{what} {path}", error)


def parse_yaml(text: str, where: str, error: type[InputError] = InputError) -> Any:
    """YAML `text` parsed; `where` names its source in the error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {e}") from e


def split_assignment(item: str, form: str = "KEY=VALUE", option: str = "--set") -> tuple[str, str]:
    """`KEY=VALUE` split into its stripped parts.

    Raises:
        InputError: no `=`, or an empty key; the message shows `form` and names `option`.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise InputError(f"{option} {item!r} is not of the form {form}")
    return key.strip(), value.strip()


def merge_settings(cls: type, data: dict[str, Any], update: Any, where: str, prefix: str = "") -> dict[str, Any]:
    """`data` (plain values of dataclass `cls`'s fields) updated with `update`, each value converted to its field's type.

    Nested dataclass fields take nested mappings. `where` and `prefix` name the source and the
    section in error messages.

    Raises:
        InputError: `update` is not a mapping, names an unknown field, or holds a value of the wrong type.
    """
    if not isinstance(update, dict):
        raise InputError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping of field: value")
    hints = typing.get_type_hints(cls)
    known = field_names(cls)
    out = dict(data)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise InputError(f"{where}: unknown field '{dotted}'; allowed: {', '.join(prefix + k for k in known)}")
        field_type = hints[key]
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                raise InputError(f"{where}: '{dotted}' is a section; set its fields as {dotted}.FIELD=VALUE")
            out[key] = merge_settings(field_type, out.get(key, {}), value, where, dotted + ".")
        else:
            out[key] = coerce(value, field_type, where, dotted)
    return out


def instantiate_config(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build dataclass `cls` from converted plain values; a failed validation names the section."""
    hints = typing.get_type_hints(cls)
    kwargs = {
        key: instantiate_config(hints[key], value, where, f"{prefix}{key}.") if dataclasses.is_dataclass(hints[key]) else value
        for key, value in data.items()
    }
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # InputError is a ValueError
        section = prefix.rstrip(".") or where
        raise InputError(f"{where}: {section}: {e}" if section != where else f"{where}: {e}") from e


def coerce(value: Any, tp: Any, where: str, dotted: str) -> Any:
    """Convert a YAML value or a command-line string to type `tp`, or raise an InputError naming the field."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(expected: str) -> InputError:
        return InputError(f"{where}: field '{dotted}' expects {expected}, got {value!r}")

    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in NONE_WORDS):
            if len(options) < len(args):
                return None
        for option in options:
            try:
                return coerce(value, option, where, dotted)
            except InputError:
                continue
        raise fail(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in TRUE_WORDS | FALSE_WORDS:
            return value.lower() in TRUE_WORDS
        raise fail("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail("an integer") from None
            if number.is_integer():
                return int(number)
        raise fail("an integer")
    if tp is float:
        # No setting means anything at NaN or infinity, and NaN passes every `x > 0` check downstream.
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail("a number") from None
        if number is None:
            raise fail("a number")
        if not math.isfinite(number):
            raise fail("a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # YAML reads a bare off/on/no/yes as a boolean
            raise fail("a string (quote it: YAML reads a bare off, on, no or yes as true/false)")
        raise fail("a string")
    if origin in (tuple, list):
        items = value
        if isinstance(value, str):
            parsed = parse_yaml(value, f"{where}: field '{dotted}'") if value.lstrip().startswith("[") else value.split(",")
            items = parsed if isinstance(parsed, list) else [parsed]
        if not isinstance(items, (list, tuple)):
            raise fail("a list")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise fail(f"{len(args)} values")
            item_types = list(args)
        else:
            item_types = [args[0] if args else Any] * len(items)
        converted = [
            coerce(item.strip() if isinstance(item, str) else item, t, where, dotted) for item, t in zip(items, item_types)
        ]
        return tuple(converted) if origin is tuple else converted
    return value


def field_names(cls: type) -> list[str]:
    """The field names of dataclass `cls`, in order."""
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    return "none" if tp is type(None) else getattr(tp, "__name__", str(tp))
