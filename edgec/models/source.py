"""Where a model's code, constructor arguments and example inputs come from.

An architecture is a zoo name, ``path/to/file.py:Class`` (imported from the file; its folder goes on
``sys.path`` so sibling imports work) or ``package.module:Class``. A class needs no edgec methods: its config
is ``default_config()`` when present, else the constructor's JSON-able defaults, updated by ``--arch-config``;
its example inputs are ``input_spec()`` when present, else ``--input-shape``. ``Source`` merges the options
with the project file (edgec.core.project): explicit values win.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from edgec.core.errors import EdgecError, first_line
from edgec.core.limits import load_json, read_text_file
from edgec.core.project import Project, find_project
from edgec.core.spec import InputSpec, build_spec, parse_input_shape

ZOO: dict[str, str] = {
    "convtransformer": "edgec.models.convtransformer:ConvTransformer",
    "conformer": "edgec.models.conformer:Conformer",
    "hafformer": "edgec.models.hafformer:HAFFormer",
    "speechformer": "edgec.models.speechformer:SpeechFormer",
    "resnet": "edgec.models.resnet:ResNet",
    "mobilenet": "edgec.models.mobilenet:MobileNet",
    "bert": "edgec.models.bert:Bert",
    "llama": "edgec.models.llama:Llama",
    "lwdetr": "edgec.models.lwdetr:LWDETR",
}


# --- architecture strings ----------------------------------------------------------------------------

def split_arch(arch: str) -> tuple[str, str, str]:
    """``(kind, target, class)``: kind "zoo" | "file" | "module"; the class is "" for a zoo name."""
    if arch in ZOO:
        return "zoo", arch, ""
    target, sep, cls = str(arch).rpartition(":")
    if not sep or not target or not cls.isidentifier():
        raise EdgecError(f"unknown architecture '{arch}'; known: {', '.join(sorted(ZOO))} "
                         "(or pass --arch path/to/file.py:Class or package.module:Class)")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    return ("file" if is_file else "module"), target, cls


def arch_key(arch: str) -> tuple[str, str]:
    """What identifies a user architecture across folders: (file or last module name, class)."""
    kind, target, cls = split_arch(arch)
    if kind == "file":
        return Path(target).stem, cls
    return target.rpartition(".")[2], cls


def same_arch(a: str, b: str) -> bool:
    try:
        return a == b or (":" in a and ":" in b and arch_key(a) == arch_key(b))
    except EdgecError:
        return False


def stored_arch(arch: str, base: str | Path | None = None) -> str:
    """The arch string a checkpoint stores: never an absolute path (relative to the current directory when
    the file is inside it, else just ``file.py:Class``)."""
    kind, target, cls = split_arch(arch)
    if kind != "file":
        return arch
    path = (Path(base or Path.cwd()) / target).resolve()
    try:
        rel = path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        rel = path.name
    return f"{rel}:{cls}"


def resolve(arch: str, *, base: str | Path | None = None):
    """The class for an architecture string; relative file paths are resolved against ``base`` (default: the
    current directory)."""
    kind, target, cls_name = split_arch(arch)
    if kind == "zoo":
        target, _, cls_name = ZOO[arch].partition(":")
        module = importlib.import_module(target)
    elif kind == "file":
        module = _import_file((Path(base or Path.cwd()) / target).resolve(), arch)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise EdgecError(f"cannot import architecture '{arch}': {first_line(exc)} (for a file give "
                             f"path/to/file.py:{cls_name})") from None
        except Exception as exc:
            raise EdgecError(f"importing '{target}' for architecture '{arch}' failed: "
                             f"{type(exc).__name__}: {first_line(exc)}") from None
    cls = getattr(module, cls_name, None)
    if not isinstance(cls, type):
        names = sorted(n for n, v in vars(module).items() if isinstance(v, type) and v.__module__ == module.__name__)
        raise EdgecError(f"architecture '{arch}': no class '{cls_name}' in {target}"
                         + (f"; classes there: {', '.join(names[:8])}" if names else ""))
    return cls


def _import_file(path: Path, arch: str):
    """Import a .py file under a module name derived from its path (so it is imported once per process)."""
    if not path.is_file():
        raise EdgecError(f"architecture '{arch}': no such file {path.name} (relative paths are relative to the "
                         "current directory, or to the project file's folder for its arch)")
    name = f"edgec_user_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # sibling imports of the user's file
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        tb = exc.__traceback__
        line = ""
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == str(path):
                line = f":{tb.tb_lineno}"
            tb = tb.tb_next
        line = line or (f":{exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else "")
        raise EdgecError(f"importing {path.name}{line} for architecture '{arch}' failed: "
                         f"{type(exc).__name__}: {first_line(exc)}") from None
    return module


# --- constructor arguments -----------------------------------------------------------------------------

def parse_arch_config(value) -> dict | None:
    """``--arch-config``: JSON text starting with ``{``, a path to a .json file, or a dict."""
    if value is None or isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise EdgecError(f"--arch-config '{text}': neither JSON ('{{...}}') nor an existing .json file")
        text = read_text_file(path, "--arch-config")
    try:
        data = load_json(text, "--arch-config")  # bounded: size, depth, digits
    except EdgecError as exc:
        raise EdgecError(f"--arch-config is not valid JSON ({str(exc).removeprefix('--arch-config: ')})") from None
    if not isinstance(data, dict):
        raise EdgecError("--arch-config must be a JSON object of constructor arguments, e.g. '{\"width\": 32}'")
    return data


def _jsonable(value) -> bool:
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False


def _parameters(cls) -> tuple[dict, bool]:
    """Constructor parameters by name (without self, *args, **kwargs) and whether it takes **kwargs."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}, True
    named = {n: p for n, p in params.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


def default_config(cls) -> dict:
    """``default_config()`` when the class has one, else the constructor's JSON-able defaults (others are left
    to the constructor, which applies them again on every build)."""
    if callable(getattr(cls, "default_config", None)):
        return dict(cls.default_config())
    named, _ = _parameters(cls)
    return {n: p.default for n, p in named.items() if p.default is not p.empty and _jsonable(p.default)}


def accepted(cls, values: dict) -> tuple[dict, list[str]]:
    """``values`` split into those the constructor takes and the names of the rest (Lightning hparams)."""
    named, _ = _parameters(cls)
    keep = {k: v for k, v in values.items() if k in named and _jsonable(v)}
    return keep, [k for k in values if k not in keep]


# Config keys that name a size (by their last word, e.g. num_layers, ffn_dim, in_channels, vocab_size, n_embd):
# an integer there must be >= 1, since 0 or -1 builds an empty or broken model that still exports.
SIZE_WORDS = frozenset({"dim", "dims", "size", "sizes", "channels", "classes", "layers", "layer", "heads", "head",
                        "nhead", "width", "depth", "depths", "features", "embd", "embeddings", "mels", "model",
                        "hidden", "feedforward", "kernel", "kernels", "len", "length"})


def is_size_key(key: str) -> bool:
    return str(key).lower().rsplit("_", 1)[-1] in SIZE_WORDS


def check_sizes(arch: str, config: dict) -> None:
    """Refuse a size-named config value (see SIZE_WORDS) that is an integer < 1, alone or in a list."""
    for key, value in config.items():
        if not is_size_key(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v < 1]
        if bad:
            raise EdgecError(f"{arch}: config '{key}' is a size and must be >= 1 (got {value!r})")


def full_config(arch: str, overrides: dict | None = None, *, base=None) -> dict:
    """Defaults updated by ``overrides``; unknown keys, missing required arguments and sizes below 1 (in a zoo
    model's config, or among the values given for a user class) are refused."""
    cls = resolve(arch, base=base)
    config = default_config(cls)
    named, var_kw = _parameters(cls)
    for key, value in (overrides or {}).items():
        if key not in config and key not in named and not var_kw:
            keys = sorted(set(config) | set(named))
            raise EdgecError(f"'{key}' is not a config key of {arch}; keys: {', '.join(keys)}")
        if not _jsonable(value):
            raise EdgecError(f"{arch}: config value of '{key}' is not plain JSON data")
        config[key] = value
    missing = [n for n, p in named.items() if p.default is p.empty and n not in config]
    if missing:
        example = ", ".join(f'"{n}": ...' for n in missing)
        raise EdgecError(f"{arch}: constructor argument(s) {', '.join(missing)} have no default; "
                         f"pass --arch-config '{{{example}}}'")
    check_sizes(arch, config if arch in ZOO else (overrides or {}))
    return config


def build(arch: str, config: dict, *, base=None):
    """Instantiate an architecture (eval mode); a config the class rejects is bad input, not a crash."""
    cls = resolve(arch, base=base)
    try:
        model = cls(**config)
    except EdgecError:
        raise
    except (ValueError, TypeError, AssertionError, RuntimeError, ZeroDivisionError, KeyError, IndexError) as exc:
        raise EdgecError(f"{arch}: invalid config ({first_line(exc)})") from None
    return model.eval()


# --- example inputs ------------------------------------------------------------------------------------

def example_spec(module, input_shape, arch: str) -> InputSpec:
    """``module.input_spec()`` when it has one, else the ``--input-shape`` entries (names default to and are
    ordered by ``forward``'s parameters; int64 inputs sample below the smallest embedding table)."""
    if callable(getattr(module, "input_spec", None)):
        return module.input_spec()
    texts = [input_shape] if isinstance(input_shape, str) else list(input_shape or [])
    if not texts:
        raise EdgecError(f"{arch} has no input_spec(); describe its example inputs with --input-shape "
                         "NAME=1x3x32x32[:dtype] (repeatable), or input-shape in the project file")
    entries = _name_entries([parse_input_shape(t) for t in texts], module, arch)
    return build_spec(entries, vocab=_vocab(module))


def _name_entries(entries: list, module, arch: str) -> list:
    params = inspect.signature(module.forward).parameters
    if any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        return [(n or f"input_{i}", d, t) for i, (n, d, t) in enumerate(entries)]
    order = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = [(n or (order[i] if i < len(order) else f"input_{i}"), d, t) for i, (n, d, t) in enumerate(entries)]
    unknown = [n for n, _, _ in named if n not in order]
    if unknown:
        raise EdgecError(f"--input-shape names '{unknown[0]}', but {arch}.forward takes {', '.join(order) or 'nothing'}")
    given = {n for n, _, _ in named}
    missing = [n for n in order if n not in given and params[n].default is params[n].empty]
    if missing:
        raise EdgecError(f"{arch}.forward needs {', '.join(missing)}: add --input-shape {missing[0]}=...")
    return sorted(named, key=lambda e: order.index(e[0]))


def _vocab(module) -> int | None:
    from torch import nn

    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)]
    return min(sizes) if sizes else None


# --- options merged with the project file ----------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """The model source of one command: the options merged with the project file."""

    arch: str | None = None  # as given (a file path is relative to ``base``)
    base: Path | None = None  # where a relative file arch is found
    explicit: bool = False  # the arch came from the command, not the project file
    arch_config: dict | None = None
    input_shape: tuple[str, ...] | None = None
    trust_pickle: bool = False
    trusted: tuple[tuple[str, Path], ...] = ()  # (arch, base) a stored checkpoint may name
    project: str | None = None  # the project file's name, for messages


def source_from(options=None, project: Project | None | bool = True) -> Source:
    """Merge a ``SourceOptions`` (or an arch string, or None) with the project file (``True``: look it up from
    the current directory). The project's arch-config and input-shape apply only to the project's arch."""
    if isinstance(options, str):
        arch, config, shapes, trust = options, None, None, False
    else:
        arch = getattr(options, "arch", None)
        config = getattr(options, "arch_config", None)
        shapes = getattr(options, "input_shape", None)
        trust = bool(getattr(options, "trust_pickle", False))
    if project is True:
        project = find_project()
    config = parse_arch_config(config)
    shapes = tuple([shapes] if isinstance(shapes, str) else shapes) if shapes else None
    cwd = Path.cwd()
    if not project:
        return Source(arch, cwd if arch else None, arch is not None, config, shapes, trust)
    own = arch is None or (project.arch is not None and same_arch(arch, project.arch))
    trusted = tuple((a, project.root) for a in (*project.trusted, *([project.arch] if project.arch else [])))
    return Source(arch if arch is not None else project.arch,
                  cwd if arch is not None else (project.root if project.arch else None),
                  arch is not None, config if config is not None else (project.arch_config if own else None),
                  shapes if shapes is not None else (project.input_shape if own else None), trust, trusted,
                  project.path.name)
