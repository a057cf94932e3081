"""The one module that reads and writes edgec checkpoints, and reads the checkpoints PyTorch users have.

An edgec checkpoint is plain data, never code: ``{format, model: {arch, config, spec, capture}, passes,
state_dict, provenance, digest}``, written atomically with ``torch.save`` and read with
``torch.load(weights_only=True)``; loading rebuilds the architecture from its config (a pruned one's
``pruned_widths`` included: ``build_from_config``), captures it, replays the rest of the structural passes and
loads the weights strictly. A stored user architecture is imported only when the command or the
project file names it. Other forms (state_dict, safetensors, Lightning, a pickled module with
``trust_pickle``) are loaded into the eager module built from ``--arch``, then captured. See
docs/architecture.md#checkpoints.
"""
from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import torch

from edgec.core.errors import EdgecError, first_line
from edgec.core.fileio import atomic_save, read_data, sha256_file
from edgec.core.graph import Model, container_digest, digest_of
from edgec.core.pass_manager import PRUNED_WIDTHS, get_pass, replay, width_run
from edgec.core.provenance import record as provenance_record
from edgec.core.schema import check_container, check_pass_log
from edgec.core.spec import spec_from_dict, spec_to_dict
from edgec.models.capture import capture
from edgec.models.source import (
    ZOO,
    Source,
    accepted,
    build,
    check_sizes,
    example_spec,
    full_config,
    resolve,
    same_arch,
    source_from,
    split_arch,
    stored_arch,
)

FORMAT = "edgec.checkpoint/2"  # /2: a container digest seals provenance, spec and capture as well
LEGACY_FORMAT = "edgec.checkpoint/1"  # read only with --no-verify
_FX_CONSTANT = re.compile(r"(^|\.)_tensor_constant\d+$")
_BULKY = ("name_map",)  # re-derived by every capture; not worth storing
_ARCH_HINT = "pass --arch path/to/file.py:Class (or package.module:Class, or a zoo name)"


def capture_summary(record: dict | None) -> dict:
    """The capture record without its bulky parts (what checkpoints and provenance keep)."""
    return {k: v for k, v in (record or {}).items() if k not in _BULKY}


def save_checkpoint(model, path: str | Path) -> str:
    """Write ``model`` (an ``edgec.core.graph.Model``) atomically; return its digest. The container is checked
    against the schema first, so edgec never writes a checkpoint it would refuse to read."""
    digest = model.digest()
    container = {
        "format": FORMAT,
        "model": {"arch": model.arch, "config": model.config, "spec": spec_to_dict(model.spec),
                  "capture": capture_summary(model.capture)},
        "passes": model.passes,
        "state_dict": model.state_to_save(),  # no copy of the weights; the same bytes as a copy
        "provenance": model.provenance,
        "digest": digest,
    }
    check_container(container, f"refusing to write {Path(path).name}")
    container["container_digest"] = container_digest(container)
    atomic_save(path, container)
    return digest


# --- building a Model from code ---------------------------------------------------------------------

def output_names(module, spec, arch: str) -> tuple[str, ...]:
    """Run the eager module once on the spec's sample: "logits" for one output, else output_0, output_1..."""
    try:
        with torch.no_grad():
            out = module(*spec.sample(seed=0))
    except Exception as exc:
        shapes = ", ".join(f"{t.name}: {list(t.shape())} {t.dtype}" for t in spec.inputs)
        raise EdgecError(f"{arch} failed on the example inputs ({shapes}): {type(exc).__name__}: "
                         f"{first_line(exc)}; check --input-shape") from None
    if isinstance(out, dict):
        return tuple(str(k) for k, v in out.items() if isinstance(v, torch.Tensor))
    outs = [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, (tuple, list)) else [out]
    return ("logits",) if len(outs) == 1 else tuple(f"output_{i}" for i in range(len(outs)))


def model_from_module(module, arch: str, config: dict, *, spec=None, input_shape=None, label: str | None = None):
    """A ``Model`` from an eager module (weights already in it): example inputs from ``spec``, else
    ``input_spec()``, else ``input_shape`` (outputs then named by running the module once); then captured."""
    if spec is None:
        spec = example_spec(module, input_shape, arch)
        if not callable(getattr(module, "input_spec", None)):
            spec = type(spec)(spec.inputs, outputs=output_names(module, spec, arch), task=spec.task,
                              extra=spec.extra)
    gm, record = capture(module.eval(), spec, label=label or arch)
    return Model(gm.eval(), arch, config, spec, capture=capture_summary(record))


def new_model(arch: str, overrides: dict | None = None, seed: int = 0, origin: dict | None = None, *,
              input_shape=None, base=None):
    """A freshly initialised zoo (or user) model, deterministic in ``seed``."""
    cfg = full_config(arch, overrides, base=base)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build(arch, cfg, base=base)
    stored = stored_arch(arch, base)
    model = model_from_module(module, stored, cfg, input_shape=input_shape)
    record = dict(origin or provenance_record("zoo.create", 1, {"arch": stored, "config": cfg, "seed": seed}))
    record.pop("output_digest", None)
    record["capture"] = model.capture
    record["output_digest"] = model.digest()
    model.provenance = [record]
    return model


def build_from_config(arch: str, config: dict, *, passes=(), spec=None, input_shape=None, base=None, seed: int = 0):
    """The architecture ``config`` describes, freshly initialised (deterministic in ``seed``), with no
    provenance: built from the config without its ``pruned_widths``, captured, then cut to those widths (see
    ``edgec.passes.prune_channels``). ``passes``: a structural pass log to rebuild as well (a checkpoint's),
    whose ``prune.channels`` records the widths stand for are not replayed. Example inputs: ``spec``, else
    ``input_spec()``, else ``input_shape``."""
    dense = {k: v for k, v in config.items() if k != PRUNED_WIDTHS}
    if arch in ZOO:
        check_sizes(arch, dense)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build(arch, dense, base=base)
    model = model_from_module(module, stored_arch(arch, base), dict(config), spec=spec, input_shape=input_shape)
    model = rebuild_structure(model, list(passes), what=f"{arch} config", owned=True, complete=not passes)
    return model


def rebuild_structure(model, records: list[dict], *, max_elements: int | None = None, what: str = "checkpoint",
                      owned: bool = False, complete: bool = False):
    """``model`` (built from its config without ``pruned_widths``) with the structure its config and pass log
    describe: the log replayed, with the run of ``prune.channels`` records that the config's widths stand for
    (``width_run``) replaced by cutting the model to those widths. Without widths: ``replay`` as it always was.
    ``complete``: list every group's width in the config (as pruning does) where the widths named only some."""
    widths = model.config.get(PRUNED_WIDTHS)
    if widths is None:
        return replay(model, records, max_elements=max_elements, what=what, owned=owned)
    check_pass_log(records, what)
    start, end = width_run(records)
    model = replay(model, records[:start], max_elements=max_elements, what=what, owned=owned)
    if start == 0 and not owned:
        model = model.clone()
    try:
        full = get_pass("prune.channels").shrink(model, widths, complete=complete)
    except EdgecError as exc:
        raise EdgecError(f"{what}: model.config: {exc}") from None
    if full is not None:
        model.config = {**model.config, PRUNED_WIDTHS: full}
    model.passes.extend(dict(r) for r in records[start:end])
    return replay(model, records[end:], max_elements=max_elements, what=what, owned=True)


# --- loading ------------------------------------------------------------------------------------------

def load_checkpoint(path: str | Path, source=None, *, verify: bool | None = None):
    """Rebuild the model in ``path``. ``source``: a ``SourceOptions`` (or an arch string, or a resolved
    ``Source``), merged with the project file. An edgec checkpoint rebuilds its stored architecture (a user
    one only when trusted); any other form needs an arch and is imported (record ``import.torch``).
    ``verify``: check the digests (default: unless the options say ``no_verify``)."""
    path = Path(path)
    if verify is None:
        verify = not getattr(source, "no_verify", False)
    src = source if isinstance(source, Source) else source_from(source)
    obj, form, notes = read_weights(path, src)
    if form == "edgec":
        return _load_edgec(path, obj, src, verify)
    if not src.arch:
        raise EdgecError(f"{path} is {describe(obj, form)}")
    return _import(path, obj, form, notes, src)


def _load_edgec(path: Path, obj: dict, src: Source, verify: bool = True):
    """Schema, tensors, integrity, then the rebuild: architecture (trusted), capture, replay, strict load."""
    check_container(obj, str(path))
    state_dict = obj["state_dict"]
    check_finite(state_dict, path)
    if verify:
        verify_container(obj, path)
    stored, cfg = obj["model"]["arch"], dict(obj["model"]["config"])
    dense = {k: v for k, v in cfg.items() if k != PRUNED_WIDTHS}  # the widths cut the built model down
    arch, base = trusted_arch(path, stored, src)
    if arch in ZOO:  # a zoo config with a size below 1 builds a broken model that still exports
        try:
            check_sizes(arch, dense)
        except EdgecError as exc:
            raise EdgecError(f"{path}: model.config: {exc}") from None
    capture_record = obj["model"].get("capture") or {}
    # Every parameter and persistent buffer is overwritten by the strict load below, so the module is built
    # without running the weight initialisers, unless capturing it runs the module (a rewritten or
    # shape-traced capture compares outputs, which must not see uninitialised memory).
    plain_capture = capture_record.get("method") == "fx" and not capture_record.get("rewrites")
    with torch.random.fork_rng(devices=[]), (no_init() if plain_capture else contextlib.nullcontext()):
        module = build(arch, dense, base=base)
    limit = max(REBUILD_GROWTH * sum(t.numel() for t in state_dict.values()), REBUILD_FLOOR)
    spec_data = obj["model"].get("spec")  # checked by the schema
    spec = spec_from_dict(spec_data) if spec_data else example_spec(module, src.input_shape, stored)
    model = model_from_module(module, stored, cfg, spec=spec)
    del module  # the capture holds its own copy
    model = rebuild_structure(model, list(obj["passes"]), max_elements=limit, what=str(path), owned=True)
    load_state_dict_strict(model.gm, state_dict, path, assign=True)
    model.provenance = list(obj.get("provenance", []))
    model.gm.eval()
    if verify:  # the weights are the file's, whose digest was just checked: no second hash of them
        model.remember_digest(obj["digest"])
    return model


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                 "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                 "sparse_")


@contextlib.contextmanager
def no_init():
    """``torch.nn.init``'s fill functions as no-ops: building a module then allocates its weights but does not
    fill them (for weights a strict load is about to overwrite; untouched pages cost no memory either)."""
    from torch.nn import init

    saved = {name: getattr(init, name) for name in _INITIALISERS if hasattr(init, name)}
    try:
        for name in saved:
            setattr(init, name, _keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(init, name, fn)


def _keep(tensor, *args, **kwargs):
    return tensor


# Rebuilding a checkpoint builds the dense architecture, then replays its passes; a pruned model's weights can be
# far fewer than its dense architecture's, an HRF scaffold up to MAX_HRF_EXPAND times more. A replay step beyond
# this bound (elements of weights and buffers) is a file asking for memory its weights do not justify.
REBUILD_GROWTH = 256
REBUILD_FLOOR = 1 << 26


class IntegrityError(EdgecError):
    """A checkpoint's digests are missing, malformed or do not match its content (exit 2; ``--no-verify``)."""


_NO_VERIFY = "pass --no-verify to load it anyway"


def verify_container(obj: dict, path) -> None:
    """The stored model digest equals the digest of the stored weights, config and pass log, and the container
    digest equals the digest of everything else (provenance, spec, capture) plus the model digest."""
    if obj.get("format") == LEGACY_FORMAT:
        raise IntegrityError(f"{path} is an {LEGACY_FORMAT} file (an older edgec): its provenance is not covered by "
                             f"a digest; {_NO_VERIFY} (files edgec writes now carry one)")
    for key in ("digest", "container_digest"):
        value = obj.get(key)
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            shown = "missing" if key not in obj else f"not a sha256 hex digest ({_kind(value)})"
            raise IntegrityError(f"{path}: integrity: '{key}' is {shown}, so the file cannot be verified; {_NO_VERIFY}")
    model = obj["model"]
    if digest_of(model["arch"], model["config"], obj["passes"], obj["state_dict"]) != obj["digest"]:
        raise IntegrityError(f"{path}: integrity: its weights, config or pass log do not match its digest (the file "
                             f"was damaged or edited); {_NO_VERIFY}")
    if container_digest(obj) != obj["container_digest"]:
        raise IntegrityError(f"{path}: integrity: its provenance, input spec or capture record do not match its "
                             f"container digest (the file was damaged or edited); {_NO_VERIFY}")


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _kind(value) -> str:
    if value is None or value == "":
        return "empty" if value == "" else "None"
    return f"a {type(value).__name__}" if not isinstance(value, str) else f"{len(value)} characters"


def seal(obj: dict) -> dict:
    """``obj`` (a container read from a file) with both digests recomputed from its content: for tests and
    tools that edit a checkpoint on purpose and want it to verify."""
    model = obj["model"]
    obj["digest"] = digest_of(model["arch"], model["config"], obj["passes"], obj["state_dict"])
    obj["container_digest"] = container_digest(obj)
    return obj


def trusted_arch(path: Path, stored: str, src: Source) -> tuple[str, Path | None]:
    """The arch to import for a checkpoint storing ``stored``, and where its relative file path starts. A
    checkpoint never chooses code: a user architecture must be named by the command or the project file."""
    if stored in ZOO:
        if src.explicit and src.arch != stored:
            raise EdgecError(f"{path} holds a '{stored}' model, not '{src.arch}'; drop --arch or pass --arch {stored}")
        return stored, None
    split_arch(stored)  # an unknown zoo name: raises, listing the zoo
    candidates = ([(src.arch, src.base)] if src.arch else []) + list(src.trusted)
    for arch, base in candidates:
        if same_arch(arch, stored):
            return arch, base
    if src.explicit:
        raise EdgecError(f"{path} holds a '{stored}' model, not '{src.arch}'; pass --arch with that class")
    # Importing a module named inside a file would let the file choose code to run.
    kind, target, _ = split_arch(stored)
    hint = stored if kind != "file" or Path(target).is_file() else f"path/to/{stored}"
    raise EdgecError(f"{path} uses the user architecture '{stored}'; pass --arch {hint} to allow importing it "
                     "(or name it in the project file: arch or trusted)")


def read_weights(path: Path, src: Source) -> tuple[object, str, dict]:
    """``(object, form, notes)``; form: edgec | state_dict | safetensors | lightning | wrapped:KEY |
    pickled-module | other."""
    if path.suffix == ".safetensors":
        return _read_safetensors(path), "safetensors", {}
    notes: dict = {}
    try:
        obj = read_data(path)
    except EdgecError as exc:
        if "would import or run code" not in str(exc) or not _is_pickled_module(path, src.arch):
            raise
        if not src.trust_pickle:
            raise EdgecError(f"{path} is a pickled module: loading it runs code from the file; pass --trust-pickle "
                             "if you trust it, or save model.state_dict() instead") from None
        obj, notes = _unpickle(path, src), {"trust_pickle": True}
        if isinstance(obj, torch.nn.Module):
            return obj.state_dict(), "pickled-module", notes
    return obj, _form(obj, path), notes


def _form(obj, path: Path) -> str:
    if isinstance(obj, dict) and obj.get("format") in (FORMAT, LEGACY_FORMAT):
        return "edgec"
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("edgec.checkpoint/"):
        raise EdgecError(f"{path} has format {str(obj['format'])[:60]}; this edgec reads {FORMAT} (upgrade edgec)")
    if _tensor_dict(obj):
        return "state_dict"
    if isinstance(obj, dict) and _tensor_dict(obj.get("state_dict")) and (
            "pytorch-lightning_version" in obj or "hyper_parameters" in obj):
        return "lightning"
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and _tensor_dict(obj.get(key)):
            return f"wrapped:{key}"
    return "other"


def _tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def describe(obj, form: str) -> str:
    """Why a file cannot load without an architecture, and what to do."""
    if form == "state_dict":
        return f"a bare state_dict ({len(obj)} tensors), not an edgec checkpoint; {_ARCH_HINT} to load it"
    if form == "safetensors":
        return f"a safetensors file ({len(obj)} tensors), not an edgec checkpoint; {_ARCH_HINT} to load it"
    if form == "lightning":
        return f"a Lightning checkpoint; {_ARCH_HINT} naming the model class inside the LightningModule"
    if form.startswith("wrapped:") or form == "pickled-module":
        return f"a {form.replace('wrapped:', 'dict holding a state_dict under ')}, not an edgec checkpoint; {_ARCH_HINT}"
    if isinstance(obj, dict):
        keys = ", ".join(sorted(map(str, obj))[:6])
        return f"not an edgec checkpoint (a dict with keys: {keys})"
    return f"not an edgec checkpoint (a {type(obj).__name__})"


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise EdgecError(f"no such file: {path}")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise EdgecError(f"{path} is not a valid safetensors file ({first_line(exc)})") from None


def _is_pickled_module(path: Path, arch: str | None) -> bool:
    """Does the refused pickle hold an nn.Module (a torch.nn class, or the class --arch names)? Read from the
    pickle's globals without running anything."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        return False
    cls = arch.rpartition(":")[2] if arch and ":" in arch else None
    return any(n.startswith("torch.nn.modules.") or (cls and n.rpartition(".")[2] == cls) for n in names)


def _unpickle(path: Path, src: Source):
    if src.arch:
        resolve(src.arch, base=src.base)  # the class's folder on sys.path, so the pickle can import it
    print(f"warning: {path.name}: --trust-pickle: unpickling runs code from this file", file=sys.stderr)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        hint = "; it was saved from a script (__main__): save model.state_dict() instead" if "__main__" in str(exc) else ""
        raise EdgecError(f"{path}: unpickling failed ({type(exc).__name__}: {first_line(exc)}){hint}") from None


def _import(path: Path, obj, form: str, notes: dict, src: Source):
    """A model from a non-edgec checkpoint: build ``--arch``, load the weights into the eager module, capture."""
    if form == "other":
        raise EdgecError(f"{path} is {describe(obj, form)}")
    state_dict = obj["state_dict"] if form == "lightning" else obj[form[8:]] if form.startswith("wrapped:") else obj
    check_finite(state_dict, path)
    overrides, fields = dict(src.arch_config or {}), dict(notes)
    if form == "lightning":
        keep, ignored = accepted(resolve(src.arch, base=src.base), obj.get("hyper_parameters") or {})
        overrides = {**keep, **overrides}
        fields["hyper_parameters_ignored"] = sorted(map(str, ignored))
    cfg = full_config(src.arch, overrides, base=src.base)
    module = build(src.arch, cfg, base=src.base)
    state_dict, dropped = match_keys(state_dict, module.state_dict())
    # a state_dict saved from a traced GraphModule also holds the constants fx lifted out of forward()
    dropped += [k for k in state_dict if _FX_CONSTANT.search(k)]
    state_dict = {k: v for k, v in state_dict.items() if not _FX_CONSTANT.search(k)}
    from_init = load_into_module(module, state_dict, path)
    if dropped:
        fields["ignored_keys"] = dropped
    if from_init:
        fields["buffers_from_init"] = from_init
    stored = stored_arch(src.arch, src.base)
    model = model_from_module(module, stored, cfg, input_shape=src.input_shape)
    params = {"source": path.name, "source_sha256": sha256_file(path), "form": form, "arch": stored, "config": cfg}
    model.provenance = [provenance_record("import.torch", 1, params, **fields, capture=model.capture, output=model)]
    return model


def match_keys(state_dict: dict, expected: dict) -> tuple[dict, list[str]]:
    """Strip a leading component (``model.``, ``module.``, ``_orig_mod.``...) when that makes more keys match
    the module; keys outside the stripped prefix are returned as dropped."""
    dropped: list[str] = []
    while True:
        best, prefix = sum(k in expected for k in state_dict), None
        for p in sorted({k.split(".", 1)[0] for k in state_dict if "." in k}):
            n = sum(k[len(p) + 1:] in expected for k in state_dict if k.startswith(p + "."))
            if n > best:
                best, prefix = n, p
        if prefix is None:
            return state_dict, dropped
        dropped += [k for k in state_dict if not k.startswith(prefix + ".")]
        state_dict = {k[len(prefix) + 1:]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}


def load_into_module(module, state_dict: dict, path) -> list[str]:
    """Strict load into the eager module, one-line errors. Buffers the file lacks keep their initial values
    (returned): buffers are often derived constants (masks, tables) that users leave out of saved weights."""
    expected = module.state_dict()
    buffers = {n for n, _ in module.named_buffers()}
    from_init = [k for k in expected if k not in state_dict and k in buffers]
    _check_fit({k: v for k, v in expected.items() if k not in from_init}, state_dict, path, convert_float=True)
    module.load_state_dict({**{k: expected[k] for k in from_init}, **state_dict}, strict=True)
    return from_init


def _check_fit(expected: dict, state_dict: dict, path, convert_float: bool = False) -> None:
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) e.g. '{missing[0]}'")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. '{unexpected[0]}'")
        raise EdgecError(f"{path}: weights do not fit the architecture: {'; '.join(parts)}"
                         + (" (sizes from --arch-config?)" if convert_float and missing and unexpected else ""))
    for name, ref in expected.items():
        got = state_dict[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise EdgecError(f"{path}: tensor '{name}' has shape {list(got.shape)} but the architecture expects "
                             f"{list(ref.shape)}" + (" (pass the sizes with --arch-config)" if convert_float else ""))
        same_kind = convert_float and got.is_floating_point() and ref.is_floating_point()
        if got.dtype != ref.dtype and not same_kind:
            raise EdgecError(f"{path}: tensor '{name}' has dtype {got.dtype} but the architecture expects {ref.dtype}")


def check_finite(state_dict: dict, path) -> None:
    """Every entry a dense CPU tensor, neither complex nor quantized, with finite values (a sparse, meta or
    quantized tensor would crash the loader or the digest further on)."""
    if not isinstance(state_dict, dict):
        raise EdgecError(f"{path}: state_dict is a {type(state_dict).__name__}, not a dict of tensors")
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise EdgecError(f"{path}: state_dict entry '{name}' is a {type(t).__name__}, not a tensor")
        if t.layout != torch.strided or t.is_meta or t.device.type != "cpu" or t.is_nested:
            kind = "meta" if t.is_meta else str(t.layout).removeprefix("torch.") if t.layout != torch.strided else \
                "nested" if t.is_nested else t.device.type
            raise EdgecError(f"{path}: tensor '{name}' is a {kind} tensor; edgec loads dense tensors with data only")
        if t.is_complex() or t.is_quantized:  # no edgec layer holds them; the digest and the loader would fail
            raise EdgecError(f"{path}: tensor '{name}' has dtype {t.dtype}, which edgec does not load")
        if t.numel() * t.element_size() > t.untyped_storage().nbytes():
            # a stride-0 view: a few bytes in the file, terabytes for any copy of it (the digest makes one)
            raise EdgecError(f"{path}: tensor '{name}' has shape {list(t.shape)} but only "
                             f"{t.untyped_storage().nbytes()} bytes of data; refusing it")
        if not t.is_floating_point():
            continue
        values = t.float() if t.element_size() == 1 else t  # isfinite has no float8 kernels
        # A sum is finite only if every element is (a NaN or Inf makes it NaN or Inf): one pass, no temporary;
        # only a non-finite sum (or an overflowing one) needs the element-wise test.
        if values.numel() and bool(torch.isfinite(values.sum())):
            continue
        if not bool(torch.isfinite(values).all()):
            bad = "NaN" if bool(torch.isnan(values).any()) else "Inf"
            raise EdgecError(f"{path}: tensor '{name}' contains {bad} values")


def load_state_dict_strict(gm, state_dict: dict, path, assign: bool = False) -> None:
    """Strict load, one-line errors. ``assign``: the module takes the given tensors instead of copying them into
    its own (no second copy of the weights; the caller gives them up); not where one tensor has two names
    (tied weights), which a copy keeps tied."""
    _check_fit(gm.state_dict(), state_dict, path)
    if assign:
        named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
        assign = len({id(t) for _, t in named}) == len(named)
    gm.load_state_dict(state_dict, strict=True, assign=assign)
