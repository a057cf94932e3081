"""Command parameters derived from the option dataclasses in edgec.core.options: the recipe runner's
parameter names and value types, and the CLI's typer options. Torch-free (the CLI imports it)."""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, Field, fields
from functools import cache
from pathlib import Path

import typer

# Parameters that name files: inputs must exist (or be written by an earlier recipe step), outputs are
# written; on the CLI they are PATH options.
FILE_INPUTS = ("input", "folder", "data", "teacher", "table")
FILE_OUTPUTS = ("output", "resume_file", "plot")
# Options the CLI types as PATH (``data`` is a string: it may name an entry point).
CLI_PATHS = ("teacher", "table", "resume_file", "plot")
# List options the CLI takes as one comma-separated string instead of a repeated option.
COMMA_LISTS = ("off_layers",)


def _members(tp) -> list:
    """The members of a union annotation (without None), else ``[tp]``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


@cache
def hints(cls) -> dict:
    return typing.get_type_hints(cls)


def option_fields(cls, *, where: str) -> list[Field]:
    """``cls``'s fields exposed ``where`` ("cli" or "recipe")."""
    if where == "cli":
        return [f for f in fields(cls) if f.metadata.get("cli", ()) is not None]
    return [f for f in fields(cls) if f.metadata.get("recipe", True)]


# --- recipe value types ------------------------------------------------------------------------------

_SCALARS = {str: (str,), int: (int,), float: (int, float), bool: (bool,), dict: (dict,)}


def recipe_types(cls) -> dict[str, tuple[tuple, tuple | None]]:
    """{parameter: (accepted types, accepted list element types or None)} for ``cls``'s recipe fields.
    A list field also takes a bare string (``include = "a*"``)."""
    out = {}
    for f in option_fields(cls, where="recipe"):
        accepted, element = [], None
        for member in _members(hints(cls)[f.name]):
            if typing.get_origin(member) is list:
                (item,) = typing.get_args(member)
                accepted += [str, list]
                element = _SCALARS[item]
            else:
                accepted += _SCALARS[member]
        out[f.name] = (tuple(dict.fromkeys(accepted)), element)
    return out


def required_fields(cls) -> list[str]:
    return [f.name for f in fields(cls) if f.metadata.get("required")]


# --- CLI options ---------------------------------------------------------------------------------------

def _cli_type(name: str, tp):
    members = _members(tp)
    optional = len(members) < len(typing.get_args(tp)) if typing.get_origin(tp) else False
    first = members[0]
    if name in CLI_PATHS:
        base = Path
    elif name in COMMA_LISTS:
        base = str
    elif first is dict:
        base = list[str]  # key=value, repeatable
    else:
        base = first
    return typing.Optional[base] if optional else base  # noqa: UP045 - built at run time for typer


def cli_parameters(cls) -> list:
    """``inspect.Parameter``s (keyword-only, typer-annotated) for ``cls``'s CLI options, in field order."""
    params = []
    for f in option_fields(cls, where="cli"):
        flags = f.metadata.get("cli") or ("--" + f.name.replace("_", "-"),)
        option = typer.Option(*flags, help=f.metadata.get("help"))
        annotation = typing.Annotated[_cli_type(f.name, hints(cls)[f.name]), option]
        default = inspect.Parameter.empty if f.metadata.get("required") or f.default is MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return params


def from_cli(cls, values: dict, parse_sets):
    """Build ``cls`` from the typer values of its options (repeatables, key=value tables, comma lists)."""
    kwargs = {}
    for f in option_fields(cls, where="cli"):
        value = values[f.name]
        member = _members(hints(cls)[f.name])[0]
        if f.name in COMMA_LISTS:
            value = [x.strip() for x in value.split(",")] if value else None
        elif member is dict:
            value = parse_sets(value)
        elif typing.get_origin(member) is list:
            value = list(value) if value else None
        elif isinstance(value, Path):
            value = str(value)
        kwargs[f.name] = value
    return cls(**kwargs)
