"""Bounded readers for the structured text edgec reads from files it does not control (JSON, TOML, ONNX
metadata): a size limit before parsing, a nesting-depth and element-count limit after, and integers of at most
a few hundred digits. A malformed or oversized document is an ``EdgecError`` (exit 2) naming the file.
Stdlib only (the CLI imports it at start-up)."""
from __future__ import annotations

import json
import sys
import tomllib
from pathlib import Path

from edgec.core.errors import EdgecError, first_line

MAX_TEXT_BYTES = 16 * 1024 * 1024  # a recipe, table, config or metadata entry larger than this is not ours
MAX_DEPTH = 32  # nesting levels of lists/dicts
MAX_ITEMS = 1_000_000  # list/dict entries over the whole document
MAX_INT_DIGITS = 300  # json/int("9"*5000) is slow and never a real value


def check_structure(obj, what: str, *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS) -> None:
    """Refuse data nested deeper than ``max_depth`` or holding more than ``max_items`` list/dict entries
    (iterative: a hostile document cannot exhaust the Python stack)."""
    stack, items = [(obj, 1)], 0
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple)):
            children = list(value)
        else:
            continue
        if depth > max_depth:
            raise EdgecError(f"{what}: nested more than {max_depth} levels deep; refusing it")
        items += len(children)
        if items > max_items:
            raise EdgecError(f"{what}: more than {max_items} entries; refusing it")
        stack.extend((c, depth + 1) for c in children)


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {len(text)} digits")
    return int(text)


def _constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _decoded(text: str | bytes, what: str, max_bytes: int) -> str:
    """``text`` as str, refused when longer than ``max_bytes`` or not UTF-8."""
    if len(text) > max_bytes:
        raise EdgecError(f"{what}: {len(text)} bytes, more than the {max_bytes}-byte limit")
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EdgecError(f"{what}: not valid UTF-8 ({first_line(exc)})") from None
    return text


def load_json(text: str | bytes, what: str, *, max_bytes: int = MAX_TEXT_BYTES, max_depth: int = MAX_DEPTH):
    """``json.loads`` with limits: size, depth, entries, integer digits; NaN/Infinity refused; invalid UTF-8
    is an error, not a crash."""
    text = _decoded(text, what, max_bytes)
    try:
        # a very deep document overflows json's recursive decoder before check_structure could see it
        limit = sys.getrecursionlimit()
        data = json.loads(text, parse_int=_parse_int, parse_constant=_constant)
    except RecursionError:
        raise EdgecError(f"{what}: nested too deeply (recursion limit {limit}); refusing it") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise EdgecError(f"{what}: invalid JSON ({first_line(exc)})") from None
    check_structure(data, what, max_depth=max_depth)
    return data


def load_toml(text: str | bytes, what: str, *, max_bytes: int = MAX_TEXT_BYTES, max_depth: int = MAX_DEPTH) -> dict:
    """``tomllib.loads`` with the same limits as :func:`load_json`."""
    text = _decoded(text, what, max_bytes)
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise EdgecError(f"{what}: nested too deeply; refusing it") from None
    except tomllib.TOMLDecodeError as exc:
        raise EdgecError(f"{what}: invalid TOML ({first_line(exc)})") from None
    check_structure(data, what, max_depth=max_depth)
    return data


def read_text_file(path: str | Path, what: str, *, max_bytes: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes`` (a directory, FIFO or device is refused before
    reading: reading a FIFO would block)."""
    p = Path(path)
    if not p.exists():
        raise EdgecError(f"{what} {p}: no such file")
    if not p.is_file():
        raise EdgecError(f"{what} {p}: not a regular file")
    size = p.stat().st_size
    if size > max_bytes:
        raise EdgecError(f"{what} {p}: {size} bytes, more than the {max_bytes}-byte limit")
    try:
        return p.read_bytes()
    except OSError as exc:
        raise EdgecError(f"{what} {p}: cannot read ({first_line(exc)})") from None


__all__ = ["MAX_DEPTH", "MAX_INT_DIGITS", "MAX_ITEMS", "MAX_TEXT_BYTES", "check_structure", "load_json",
           "load_toml", "read_text_file"]
