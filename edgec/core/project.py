"""The project file: defaults for the model source, so commands need not repeat ``--arch``.

``[tool.edgec]`` in ``pyproject.toml``, or ``edgec.toml`` (top-level keys or ``[tool.edgec]``), found from the
current directory upward (the first folder holding one wins; ``edgec.toml`` before ``pyproject.toml``). Keys:
``arch``, ``arch-config`` (table), ``input-shape`` (list), ``trusted`` (arch strings stored checkpoints may
name). Relative file paths in it are relative to its folder. See docs/project-file.md. Stdlib only.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from edgec.core.errors import EdgecError

KEYS = ("arch", "arch-config", "input-shape", "trusted")


@dataclass(frozen=True)
class Project:
    path: Path  # the file it was read from
    arch: str | None = None
    arch_config: dict | None = None
    input_shape: tuple[str, ...] | None = None
    trusted: tuple[str, ...] = ()

    @property
    def root(self) -> Path:
        """The folder relative paths in the file are resolved against."""
        return self.path.parent


def find_project(start: str | Path | None = None) -> Project | None:
    """The first project file from ``start`` (default: the current directory) upward, or None."""
    folder = Path(start or Path.cwd()).resolve()
    for candidate in (folder, *folder.parents):
        for name in ("edgec.toml", "pyproject.toml"):
            path = candidate / name
            if path.is_file():
                table = _edgec_table(path)
                if table is not None:
                    return _project(path, table)
    return None


def _edgec_table(path: Path) -> dict | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise EdgecError(f"project file {path.name} is not valid TOML ({exc}); fix or remove it") from None
    tool = data.get("tool", {}).get("edgec") if isinstance(data.get("tool"), dict) else None
    if tool is not None or path.name == "pyproject.toml":
        return tool
    return data


def _project(path: Path, table) -> Project:
    where = f"project file {path.name} ([tool.edgec])" if path.name == "pyproject.toml" else f"project file {path.name}"
    if not isinstance(table, dict):
        raise EdgecError(f"{where}: expected a table of keys {', '.join(KEYS)}")
    unknown = sorted(set(table) - set(KEYS))
    if unknown:
        raise EdgecError(f"{where}: unknown key '{unknown[0]}'; keys: {', '.join(KEYS)}")

    def check(key, ok, what):
        value = table.get(key)
        if value is not None and not ok(value):
            raise EdgecError(f"{where}: '{key}' must be {what}")
        return value

    def strings(v):
        return isinstance(v, list) and all(isinstance(s, str) for s in v)

    arch = check("arch", lambda v: isinstance(v, str) and v, "a string such as \"models/net.py:Net\"")
    config = check("arch-config", lambda v: isinstance(v, dict), "a table of constructor arguments")
    shapes = check("input-shape", strings, "a list of strings such as [\"x=1x3x32x32\"]")
    trusted = check("trusted", strings, "a list of architecture strings")
    return Project(path, arch, dict(config) if config is not None else None,
                   tuple(shapes) if shapes is not None else None, tuple(trusted or ()))
