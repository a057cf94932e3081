"""Command parameters derived from the option dataclasses in edgec.core.options: the recipe runner's
parameter names and value types, the CLI's typer options, and the schema (pydantic, built on first use) both
check values against: types, choices, bounds and patterns (``edgec.core.options.VALUE_RULES``). Torch-free and
pydantic-free at import (the CLI imports it at start-up)."""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import MISSING, Field, fields
from functools import cache
from pathlib import Path

import typer

from edgec.core.errors import EdgecError
from edgec.core.options import value_rule

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


# --- the value schema (CLI and recipes) ------------------------------------------------------------------

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "a table"}
_PLURALS = {str: "strings", int: "integers", float: "numbers"}
_BOUNDS = ("ge", "gt", "le", "lt")


def _constrained(tp, rule: dict):
    """``tp`` (a scalar type) with the field's rule applied: a Literal of the choices, a pattern or bounds."""
    from typing import Annotated, Literal

    from pydantic import Field

    if tp is str and "choices" in rule:
        return Literal[tuple(rule["choices"])]
    if tp is str and "pattern" in rule:
        return Annotated[str, Field(pattern=rule["pattern"])]
    if tp in (int, float) and any(b in rule for b in _BOUNDS):
        return Annotated[tp, Field(**{b: rule[b] for b in _BOUNDS if b in rule})]
    return tp


def _annotation(cls, name: str):
    """The schema type of a field: its declared union, each member constrained; a list also takes one string
    (``include = "a*"``)."""
    rule, members, hint = value_rule(cls, name), [], hints(cls)[name]
    for member in _members(hint):
        if typing.get_origin(member) is list:
            (item,) = typing.get_args(member)
            members += [_constrained(str, rule), list[_constrained(item, rule)]]
        else:
            members.append(_constrained(member, rule))
    if type(None) in typing.get_args(hint):
        members.append(type(None))
    members = list(dict.fromkeys(members))
    return members[0] if len(members) == 1 else typing.Union[tuple(members)]  # noqa: UP007 - built at run time


@cache
def schema(cls, where: str = "recipe", args: tuple = ()):
    """The pydantic model of ``cls``'s parameters exposed ``where`` (plus ``args``, the strings a recipe step
    passes positionally). Strict: TOML and typer give real types, so ``"3"`` is not an integer, nor ``true``."""
    from pydantic import ConfigDict, create_model

    spec = dict.fromkeys(args, (str, None))
    if cls is not None:
        spec |= {f.name: (_annotation(cls, f.name), None) for f in option_fields(cls, where=where)}
    return create_model(f"{getattr(cls, '__name__', 'Step')}Values", __config__=ConfigDict(extra="forbid", strict=True),
                        **spec)


def _expected(cls, key: str, args: tuple) -> str:
    if key in args or cls is None:
        return "a string"
    names = []
    for t in _members(hints(cls)[key]):
        if typing.get_origin(t) is list:
            names += ["a string", f"a list of {_PLURALS[typing.get_args(t)[0]]}"]
        else:
            names.append(_TYPE_NAMES.get(t, "a value of another type"))
    return " or ".join(dict.fromkeys(names))


def _problem(cls, key: str, errors: list, args: tuple) -> str:
    """What is wrong with one value, from pydantic's errors for it: a constraint it breaks when its type is
    right, else the types it may have."""
    rule = value_rule(cls, key) if cls is not None and key not in args else {}
    for err in errors:
        if err["type"] == "string_pattern_mismatch":
            return f"must be {rule.get('text', 'of the form ' + rule.get('pattern', '?'))}"
        if err["type"] == "literal_error":
            return "must be one of " + ", ".join(map(str, rule.get("choices", ())))
        if err["type"].startswith(("greater_than", "less_than")):
            return err["msg"].replace("Input should be", "must be")
    return f"must be {_expected(cls, key, args)}"


def check_values(cls, values: dict, *, where: str = "", cli: bool = False, args: tuple = ()) -> None:
    """Raise one EdgecError line naming the first field of ``values`` that ``cls``'s schema refuses (only
    the fields given are checked; unknown names are refused too)."""
    from pydantic import ValidationError

    model = schema(cls, "cli" if cli else "recipe", tuple(args))
    try:
        model.model_validate(values)
    except ValidationError as exc:
        errors = exc.errors()
        key = str(errors[0]["loc"][0]) if errors[0]["loc"] else "?"
        if errors[0]["type"] == "extra_forbidden":
            problem = "is not a parameter of this step"
        else:
            problem = _problem(cls, key, [e for e in errors if e["loc"] and e["loc"][0] == key], args)
        name = _flag(cls, key) if cli else f"'{key}'"
        shown = repr(values.get(key))
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise EdgecError(f"{where + ': ' if where else ''}{name} {problem} (got {shown})") from None


def _flag(cls, key: str) -> str:
    """The CLI flag of a field (``patterns`` → ``--pattern``)."""
    flags = next((f.metadata.get("cli") for f in fields(cls) if f.name == key), None)
    return flags[0].split("/")[0] if flags else "--" + key.replace("_", "-")


def check_options(options) -> None:
    """The CLI's values of one options object, against the schema (before any work)."""
    cls = type(options)
    check_values(cls, {f.name: getattr(options, f.name) for f in option_fields(cls, where="cli")
                       if getattr(options, f.name) is not None}, cli=True)


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
    options = cls(**kwargs)
    check_options(options)
    return options
