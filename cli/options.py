"""CLI flags derived from the library's config dataclasses (one default, one help, one name).

:func:`config_flags` adds a flag for every field of a config class to a typer command, with the
field's default (or a stage's own, e.g. stage 3's learning rate), help text and choices;
:func:`config_from_flags` builds the config back from what the command received.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Annotated, Any, Literal

import typer

from awe.options import config_fields, field_choices, field_help, flag_name, parse_value, type_parts

_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool}


def _parameter(f: dataclasses.Field, default: Any, prefix: str) -> inspect.Parameter:
    parts = type_parts(f)
    flag = flag_name(f)
    choices = field_choices(f)
    kwargs: dict[str, Any] = {"help": field_help(f), "show_default": True}
    simple = parts - {"None"}
    if len(simple) == 1 and next(iter(simple)) in _SIMPLE:
        kind = _SIMPLE[next(iter(simple))]
        if kind is bool:
            flag = f"{flag}/--no-{flag[2:]}"
        annotation = kind if "None" not in parts else kind | None
    else:  # unions such as int | "auto" or float | "auto" | None travel as text
        annotation = str
        default = "none" if default is None else str(default)
    if choices:  # typer shows a Literal's values as the flag's choices
        annotation = Literal[tuple(choices)]
        if "None" in parts:
            annotation = annotation | None
    option = typer.Option(flag, **kwargs)
    return inspect.Parameter(prefix + f.name, inspect.Parameter.KEYWORD_ONLY,
                             annotation=Annotated[annotation, option], default=default)


def config_flags(cls, *, defaults=None, exclude: tuple[str, ...] = (), name: str = "config",
                 prefix: str = ""):
    """Decorate a typer command: add one flag per field of ``cls`` (but ``exclude``), with the
    defaults of the instance ``defaults`` (else the class's); the command receives the built
    config as the keyword argument ``name``. ``prefix`` keeps two configs' parameters apart."""
    base = defaults if defaults is not None else cls()
    chosen = [f for f in config_fields(cls) if f.name not in exclude]

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != name]
        added = [_parameter(f, getattr(base, f.name), prefix) for f in chosen]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {f.name: kwargs.pop(prefix + f.name) for f in chosen}
            kwargs[name] = lambda **more: config_from_flags(cls, base, values, **more)
            return command(**kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + added)
        return wrapper

    return decorate


def config_from_flags(cls, base, values: dict, **more):
    """``base`` with the flags' values (text parsed into each field's type) and ``more``."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    parsed = {k: parse_value(by_name[k], v) if isinstance(v, str) and type_parts(by_name[k])
              - {"str", "None"} else v for k, v in values.items()}
    return dataclasses.replace(base, **parsed, **more)
