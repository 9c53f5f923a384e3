"""Command-line flags generated from dataclass fields declared with ``config_schema.setting``.

Each field becomes ``--<name>`` in the argument group its setting names, with
its help, its choices and an argparse type that parses the text and applies
the field's check, so a bad value is refused at parse time with a message that
names it. Flags default to ``None``: "not given", so that presets can fill
them. Bad command lines raise :class:`config_schema.UsageError` instead of exiting,
so callers (the runner, the sweep) decide what a refusal does.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from experiments.config_schema import UsageError, field_choices


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError and takes no abbreviations
    (``--over`` must never mean ``--overwrite``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)

    def refuse(self, message: str):
        """Exit 2 with the usage line and ``message`` (argparse's own refusal)."""
        super().error(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (preset-filled flags say so in their help)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _base_type(annotation: str) -> str:
    text = annotation.replace(" ", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1]
    return text


def _parse_number(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if isinstance(value, float) and kind is int:
            raise ValueError(text)
        return value

    return parse


def _parse_floats(text: str) -> tuple[float, ...]:
    if not text.strip():
        return ()
    return tuple(float(t) for t in text.split(","))


_PARSERS: dict[str, Callable[[str], Any]] = {
    "int": _parse_number(int),
    "float": _parse_number(float),
    "str": str,
    "tuple[float,...]": _parse_floats,
}


def _flag_type(field: dataclasses.Field) -> Callable[[str], Any]:
    convert = _PARSERS[_base_type(str(field.type))]
    check = field.metadata.get("check")

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            what = check.__name__ if check else f"a {_base_type(str(field.type))}"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and math.isnan(value) or (
                check is not None and check(value) is not None):
            what = check(value) if check else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    parse.__name__ = check.__name__ if check else _base_type(str(field.type))
    return parse


def add_fields(parser: argparse.ArgumentParser, fields: Iterable[dataclasses.Field],
               help_defaults: Optional[dict[str, Any]] = None,
               registered: Optional[Mapping[str, Sequence[str]]] = None) -> None:
    """One flag per field, in the field's group (groups created in first-seen order).

    ``help_defaults`` are values to show in the help text (a preset's, say)
    without making them argparse defaults. ``registered`` gives the choices of the
    settings whose values a registry holds (``{"method": methods.names()}``; see
    ``config_schema.field_choices``).
    """
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields:
        meta = f.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(meta["group"])
        text = meta["help"]
        if help_defaults and f.name in help_defaults:
            text += f" (default: {help_defaults[f.name]})"
        kwargs: dict[str, Any] = dict(default=None, help=text, dest=f.name)
        choices = field_choices(f, registered)
        if _base_type(str(f.type)) == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices is not None:
            kwargs["choices"] = choices
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
                kwargs["help"] = text + "; one of: " + ", ".join(kwargs["choices"])
        else:
            kwargs["type"] = _flag_type(f)
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
        group.add_argument(f"--{f.name}", **kwargs)


def given(args: argparse.Namespace, fields: Iterable[dataclasses.Field]) -> dict[str, Any]:
    """The fields the command line set (``None`` means not given)."""
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}
