"""Fields of the frozen config dataclasses: one default, one help text, one set of choices.

A config field is declared once with :func:`option`; the CLI builds its flags from these fields
(name ``--field-name``, the field's default, its help and choices) and the Python API takes the
same names as keyword arguments. :func:`parse_value` turns a flag's text into the field's type.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from awe.errors import AweError

AUTO = "auto"


def option(default: Any, help: str, choices: tuple[str, ...] | None = None,
           flag: str | None = None) -> Any:
    """A dataclass field with its help text, its choices (for string fields) and, where the
    flag cannot be the field's name (``lam`` is ``--lambda``), the flag's name."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "flag": flag})


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def field_help(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def field_choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    return f.metadata.get("choices")


def type_parts(f: dataclasses.Field) -> set[str]:
    """The field's annotation as a set of type names: ``int | str`` -> {"int", "str"}."""
    return {part.strip() for part in str(f.type).split("|")}


def parse_value(f: dataclasses.Field, text: str | None) -> Any:
    """The field's value from a flag's text: ``auto`` and ``none`` where the field takes them,
    else a number of the field's type; anything else names the flag and the value."""
    if text is None:
        return None
    parts = type_parts(f)
    lowered = text.strip().lower()
    if "None" in parts and lowered == "none":
        return None
    if "str" in parts and (parts <= {"str", "None"} or lowered == AUTO):
        return lowered if lowered == AUTO else text
    for kind in ("int", "float"):
        if kind in parts:
            try:
                value = int(text) if kind == "int" else float(text)
            except ValueError:
                continue
            if kind == "float" and not math.isfinite(value):
                break
            return value
    accepted = [p for p in ("int", "float") if p in parts]
    words = ([AUTO] if "str" in parts else []) + (["none"] if "None" in parts else [])
    raise AweError(f"{flag_name(f)} {text!r}: expected "
                   + " or ".join([*(f"an {p}" if p == "int" else f"a {p}" for p in accepted),
                                  *words]))


class DictFields:
    """``to_dict`` / ``from_dict`` of a dataclass as config.json holds it; keys a dataclass does
    not know (written by another version) are ignored."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def config_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]
