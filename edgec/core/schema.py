"""Schemas of the data edgec reads back from its own files: the checkpoint container, the structural pass log that
loading replays, provenance records and the ONNX provenance metadata (see docs/integrity.md).

Two layers: :func:`check_json` walks the raw data first, iteratively and with limits (depth, entries, characters,
integer size, JSON types only), so a hostile file cannot exhaust the stack, memory or time; then pydantic models
check the shapes and types of every key edgec acts on. Any failure is one ``EdgecError`` naming the field, e.g.
``passes[0].params.expand``. Torch-free; pydantic is imported here, and the CLI does not import this module at
start-up.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from edgec.core.errors import EdgecError
from edgec.core.limits import MAX_DEPTH, MAX_INT_DIGITS, MAX_ITEMS

# --- limits (documented in docs/integrity.md) ------------------------------------------------------------------
MAX_CHARS = 16 * 1024 * 1024  # characters of all strings (keys and values) in one document, counted per visit
MAX_INT_BITS = int(MAX_INT_DIGITS * math.log2(10)) + 1  # larger integers are never real values
MAX_RECORDS = 10_000  # structural passes or provenance records in one file
MAX_HRF_EXPAND = 16  # HRF expansion factor K (the paper uses 1, 2, 4, 8); K·d·(d + f) weights per FFN
MAX_GROUP_SIZE = 1 << 20  # DLT quantisation group size
MAX_UNIT_INDEX = (1 << 31) - 1  # a kept channel index of prune.channels
MAX_DIM = 1 << 20  # an example input axis
MAX_DIM_BOUND = (1 << 31) - 1  # a dynamic axis's min/max
MAX_INPUT_ELEMENTS = 1 << 26  # elements of one example input (256 MiB as float32)
MAX_N_MELS = 4096  # log-mel bins a model or its data options may name
MAX_FRAMES = 1_000_000  # frames per clip in recorded data options
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.manual_seed accepts

DIGEST_PATTERN = r"^[0-9a-f]{64}$"


# --- the raw walk -----------------------------------------------------------------------------------------------

def field_path(path) -> str:
    """``("passes", 0, "params")`` → ``passes[0].params``."""
    out = ""
    for p in path:
        key = str(p) if len(str(p)) <= 60 else str(p)[:57] + "..."  # a key from a file may be any length
        out += f"[{p}]" if isinstance(p, int) else (f".{key}" if out else key)
    return out or "(top level)"


def _unlink(node) -> tuple:
    """A path kept as a linked list ``(key, parent)`` (one small tuple per entry) back to a tuple."""
    keys = []
    while node is not None:
        keys.append(node[0])
        node = node[1]
    return tuple(reversed(keys))


def check_json(obj, what: str, prefix: tuple = (), *, max_depth: int = MAX_DEPTH, max_items: int = MAX_ITEMS,
               max_chars: int = MAX_CHARS) -> None:
    """Refuse anything but JSON-like data (dict with str keys, list/tuple, str, int, finite float, bool, None)
    within the limits. Shared references (a pickle may hold one list many times) are counted at every visit, so a
    "doubling list" stops at ``max_items`` instead of expanding exponentially. Scalars are checked in place and
    only containers are stacked, which keeps the worst case (``max_items`` entries) near a second."""
    root = None
    for key in prefix:
        root = (key, root)

    def fail(node, problem: str):
        raise EdgecError(f"{what}: {field_path(_unlink(node))}: {problem}")

    if not isinstance(obj, (dict, list, tuple)):
        _check_scalar(obj, root, fail, max_chars)
        return
    stack, items, chars = [(obj, root, len(prefix))], 0, 0
    while stack:
        value, node, depth = stack.pop()
        if depth >= max_depth:
            fail(node, f"nested more than {max_depth} levels deep; refusing it")
        items += len(value)
        if items > max_items:
            fail(node, f"more than {max_items} entries in all; refusing it")
        is_dict = isinstance(value, dict)
        for k, v in (value.items() if is_dict else enumerate(value)):
            if is_dict:
                if type(k) is not str:
                    fail(node, f"a key of type {type(k).__name__} ({k!r:.40}); keys must be strings")
                chars += len(k)
            t = type(v)
            if t is str:
                chars += len(v)
            elif t is int:
                if v.bit_length() > MAX_INT_BITS:
                    fail((k, node), f"an integer of {v.bit_length()} bits; refusing it")
            elif t is float:
                if not math.isfinite(v):
                    fail((k, node), f"{v} is not a JSON number; refusing it")
            elif v is None or t is bool:
                pass
            elif isinstance(v, (dict, list, tuple)):
                stack.append((v, (k, node), depth + 1))
            else:
                _check_scalar(v, (k, node), fail, max_chars)
                chars += len(v) if isinstance(v, str) else 0
        if chars > max_chars:
            fail(node, f"more than {max_chars} characters of text in all; refusing it")


def _check_scalar(v, node, fail, max_chars: int) -> None:
    """A value that is not a container: a JSON scalar (subclasses of str/int/float accepted) within limits."""
    if isinstance(v, str):
        if len(v) > max_chars:
            fail(node, f"more than {max_chars} characters of text; refusing it")
    elif isinstance(v, float):
        if not math.isfinite(v):  # JSON has no NaN/Infinity: --json output and ONNX metadata must stay JSON
            fail(node, f"{v} is not a JSON number; refusing it")
    elif isinstance(v, bool) or v is None:
        return
    elif isinstance(v, int):
        if v.bit_length() > MAX_INT_BITS:
            fail(node, f"an integer of {v.bit_length()} bits; refusing it")
    else:
        fail(node, f"a value of type {type(v).__name__}, not JSON (string, number, list, dict)")


def validate(model: type[BaseModel], data, what: str, prefix: tuple = ()):
    """``model.model_validate(data)``; the first error becomes one EdgecError naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise EdgecError(f"{what}: {describe_error(exc, prefix)}") from None


def describe_error(exc: ValidationError, prefix: tuple = ()) -> str:
    """``field: problem (got TYPE)`` for the first error of a pydantic ``ValidationError``."""
    err = exc.errors(include_url=False)[0]
    where = field_path(tuple(prefix) + tuple(p for p in err["loc"] if p != "__root__"))
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key (this edgec does not read it)"
    if kind == "missing":
        return f"{where}: missing"
    if kind == "value_error" and msg.startswith("Value error, @"):  # from _nested: a path below this one
        return f"{where}.{msg.removeprefix('Value error, @')}"
    got = err.get("input")
    shown = "" if kind.startswith("value_error") else f" (got {type(got).__name__})"
    return f"{where}: {msg.removeprefix('Value error, ')}{shown}"


# --- shared field types -----------------------------------------------------------------------------------------

Name = Annotated[StrictStr, Field(min_length=1, max_length=1000)]
Text = Annotated[StrictStr, Field(max_length=1 << 20)]
Number = Annotated[StrictFloat, Field(allow_inf_nan=True)]  # StrictFloat accepts ints, never bools or strings
Positive = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
Seed = Annotated[StrictInt, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]
Globs = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=1000)]], Field(max_length=10_000)]
Digest = Annotated[StrictStr, Field(pattern=DIGEST_PATTERN)]
Version = Annotated[StrictInt, Field(ge=1, le=1_000_000)]


class _Closed(BaseModel):
    """Unknown keys refused: every key is acted on."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class _Open(BaseModel):
    """Unknown keys allowed (they are informational and were JSON-checked by :func:`check_json`)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- structural pass parameters (what ``replay`` hands to each pass; see edgec.core.pass_manager.PASSES) --------

class NoParams(_Closed):
    pass


class HrfParams(_Closed):
    expand: Annotated[StrictInt, Field(ge=1, le=MAX_HRF_EXPAND)] = 4
    include: Globs = ["*"]
    exclude: Globs = []
    init: Literal["default", "preserve"] = "default"
    seed: Seed = 0


class _LowBitParams(_Closed):
    include: Globs = ["*"]
    exclude: Globs = []
    keep_first_last: StrictBool = True
    first_layer: Literal["input", "first-linear"] = "first-linear"  # absent in v1 records (edgec.passes.lowbit_common)
    last_layer: Literal["heads", "last-linear"] = "last-linear"  # absent in v1/v2 records (edgec.passes.lowbit_common)


class SttnParams(_LowBitParams):
    activations: Literal["none", "ternary"] = "none"
    seed: Seed = 0
    clip: Positive = 1.96


class DltParams(_LowBitParams):
    activations: Literal["none", "ternary"] = "none"
    group_size: Annotated[StrictInt, Field(ge=0, le=MAX_GROUP_SIZE)] = 128
    shift_init: Literal["zero", "mean"] = "zero"
    clip: Positive = 1.5


class BinaryParams(_LowBitParams):
    activations: Literal["none", "binary"] = "none"
    latent_weight: Annotated[list[Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]],
                             Field(min_length=2, max_length=2)] = [0.5, 0.5]
    clip: Positive = 1.0


class PruneParams(_Closed):
    keep: dict[Name, Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_UNIT_INDEX)]],
                               Field(max_length=MAX_UNIT_INDEX)]] = {}

    @field_validator("keep")
    @classmethod
    def _sorted_unique(cls, keep: dict) -> dict:
        for group, idx in keep.items():
            if any(b <= a for a, b in zip(idx, idx[1:])):
                raise ValueError(f"group '{group}': kept indices must be sorted and distinct")
        return keep


# Every structural pass (edgec.core.pass_manager.PASSES has the same names; a unit test keeps them in step).
PASS_PARAMS: dict[str, type[BaseModel]] = {
    "fold.batchnorm": NoParams,
    "scaffold.hrf": HrfParams,
    "fold.hrf": NoParams,
    "scaffold.sttn": SttnParams,
    "fold.sttn": NoParams,
    "scaffold.dlt": DltParams,
    "fold.dlt": NoParams,
    "prune.channels": PruneParams,
    "scaffold.binary": BinaryParams,
    "fold.binary": NoParams,
}


class StructuralRecord(_Closed):
    pass_: Name = Field(alias="pass")
    version: Version
    params: dict[StrictStr, Any] = {}


def check_pass_log(passes, what: str, prefix: tuple = ("passes",)) -> None:
    """The structural pass log: a list of ``{pass, version, params}`` with known pass names and, per pass, known
    parameters of the right types within bounds (an HRF expansion above ``MAX_HRF_EXPAND`` is refused)."""
    if not isinstance(passes, (list, tuple)):
        raise EdgecError(f"{what}: {field_path(prefix)}: a {type(passes).__name__}, expected a list of records")
    if len(passes) > MAX_RECORDS:
        raise EdgecError(f"{what}: {field_path(prefix)}: {len(passes)} records, more than {MAX_RECORDS}")
    for i, rec in enumerate(passes):
        validate(StructuralRecord, rec, what, (*prefix, i))
        schema = PASS_PARAMS.get(rec["pass"])
        if schema is None:
            raise EdgecError(f"{what}: {field_path((*prefix, i, 'pass'))}: unknown pass '{rec['pass']:.100}'; this "
                             f"edgec knows: {', '.join(sorted(PASS_PARAMS))}")
        validate(schema, rec.get("params", {}), what, (*prefix, i, "params"))


# --- provenance records -----------------------------------------------------------------------------------------

class Skip(_Open):
    layer: Text
    reason: Text
    deliberate: StrictBool = False


class CheckNumbers(_Open):
    """The keys of a check that the CLI formats as numbers."""

    rel_error: Number
    tolerance: Number
    passed: StrictBool = True


class Sizes(_Open):
    params: Annotated[StrictInt, Field(ge=0)]
    bytes: Annotated[StrictInt, Field(ge=0)]


class DataOptionsRecord(_Open):
    """A ``finetune`` record's ``params.data_options``: eval featurises audio with them."""

    n_mels: Annotated[StrictInt, Field(ge=1, le=MAX_N_MELS)] | None = None
    frames: Annotated[StrictInt, Field(ge=1, le=MAX_FRAMES)] | None = None
    val_fraction: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    block_size: Annotated[StrictInt, Field(ge=2)] | None = None  # text: tokens per causal-LM block


class ProvenanceRecord(_Open):
    """One provenance record (edgec.core.provenance.record). Steps add their own keys; the ones edgec reads back
    (the CLI's provenance tree, eval's featurisation, the teacher search by digest) are typed here."""

    pass_: Name = Field(alias="pass")
    version: Version
    params: dict[StrictStr, Any] = {}
    summary: Text = ""
    modified: StrictBool | None = None
    input_digest: Annotated[StrictStr, Field(max_length=200)] | None = None
    output_digest: Annotated[StrictStr, Field(max_length=200)] | None = None
    checks: dict[StrictStr, Any] = {}
    metrics: dict[StrictStr, Any] = {}
    skipped: Annotated[list[Skip], Field(max_length=1_000_000)] = []

    @model_validator(mode="after")
    def _read_back(self):
        for name, check in self.checks.items():
            if isinstance(check, dict) and "rel_error" in check and "tolerance" in check:
                _nested(CheckNumbers, check, ("checks", name))
        if "before" in self.metrics or "after" in self.metrics:
            for side in ("before", "after"):
                _nested(Sizes, self.metrics.get(side), ("metrics", side))
        if self.pass_ == "finetune" and self.params.get("data_options") is not None:
            _nested(DataOptionsRecord, self.params["data_options"], ("params", "data_options"))
        return self


def _nested(model: type[BaseModel], data, path: tuple) -> None:
    """Validate a sub-dict inside a model validator, naming its path (pydantic reports the record's root)."""
    try:
        model.model_validate(data)
    except ValidationError as exc:
        raise ValueError("@" + describe_error(exc, path)) from None


def check_provenance(records, what: str, prefix: tuple = ("provenance",)) -> None:
    """A list of provenance records, each typed as :class:`ProvenanceRecord` (the raw data already walked)."""
    if not isinstance(records, (list, tuple)):
        raise EdgecError(f"{what}: {field_path(prefix)}: a {type(records).__name__}, expected a list of records")
    if len(records) > MAX_RECORDS:
        raise EdgecError(f"{what}: {field_path(prefix)}: {len(records)} records, more than {MAX_RECORDS}")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise EdgecError(f"{what}: {field_path((*prefix, i))}: a value of type {type(rec).__name__}, expected a "
                             "record (dict)")
        try:
            ProvenanceRecord.model_validate(rec)
        except ValidationError as exc:
            raise EdgecError(f"{what}: {describe_error(exc, (*prefix, i))}") from None


# --- input specs ------------------------------------------------------------------------------------------------

class DimModel(_Closed):
    name: Name
    example: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)]
    alt: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)]
    min: Annotated[StrictInt, Field(ge=0, le=MAX_DIM_BOUND)] = 1
    max: Annotated[StrictInt, Field(ge=1, le=MAX_DIM_BOUND)] = 4096


class TensorSpecModel(_Closed):
    name: Name
    dims: Annotated[list[Any], Field(max_length=16)]
    dtype: Literal["float32", "int64", "bool"] = "float32"
    high: Annotated[StrictInt, Field(ge=1, le=1 << 62)] | None = None
    ones: StrictBool = False

    @field_validator("dims")
    @classmethod
    def _dims(cls, dims: list) -> list:
        sizes = [1, 1]  # elements at the example and the alternative shape
        for axis, d in enumerate(dims):
            if isinstance(d, bool) or not isinstance(d, (int, dict)):
                raise ValueError(f"axis {axis}: a {type(d).__name__}; expected a size or a dynamic axis")
            if isinstance(d, int):
                if not 1 <= d <= MAX_DIM:
                    raise ValueError(f"axis {axis}: size {d} is outside 1..{MAX_DIM}")
                sizes = [s * d for s in sizes]
            else:
                try:
                    dim = DimModel.model_validate(d)
                except ValidationError as exc:
                    raise ValueError(f"axis {axis}: {describe_error(exc)}") from None
                sizes = [sizes[0] * dim.example, sizes[1] * dim.alt]
        if max(sizes) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"an example input of {max(sizes)} elements, more than {MAX_INPUT_ELEMENTS}")
        return dims


class SpecModel(_Closed):
    inputs: Annotated[list[TensorSpecModel], Field(min_length=1, max_length=64)]
    outputs: Annotated[list[Name], Field(max_length=1000)] = ["logits"]
    task: Annotated[StrictStr, Field(max_length=100)] = "classification"
    extra: dict[StrictStr, Any] = {}


# --- the checkpoint container -----------------------------------------------------------------------------------

class ModelSection(_Closed):
    arch: Name
    config: dict[StrictStr, Any]
    spec: SpecModel | None = None
    capture: dict[StrictStr, Any] = {}


class Container(_Closed):
    """``{format, model, passes, state_dict, provenance, digest, container_digest}`` (edgec.models.checkpoint).
    The digests are checked for integrity, not here: ``--no-verify`` skips that check, never this one."""

    format: Name
    model: ModelSection
    passes: list[Any]
    state_dict: dict[StrictStr, Any]
    provenance: list[Any] = []
    digest: Any = None
    container_digest: Any = None


def check_container(obj, what: str) -> None:
    """A checkpoint container: plain-data parts walked with limits, then every field typed; tensors (the
    ``state_dict`` values) are checked by the checkpoint reader."""
    if not isinstance(obj, dict):
        raise EdgecError(f"{what}: a {type(obj).__name__}, not an edgec checkpoint container")
    for key in ("model", "passes", "provenance"):
        if key in obj:
            check_json(obj[key], what, (key,))
    validate(Container, obj, what)
    check_pass_log(obj["passes"], what)
    check_provenance(obj.get("provenance", []), what)


# --- ONNX provenance metadata -----------------------------------------------------------------------------------

class InputJson(_Open):
    name: Name
    shape: Annotated[list[Annotated[StrictInt, Field(ge=0, le=MAX_DIM_BOUND)] | Name], Field(max_length=64)]
    dtype: Annotated[StrictStr, Field(max_length=100)] = "float32"


class SpecJson(_Open):
    inputs: Annotated[list[InputJson], Field(max_length=1000)] = []
    outputs: Annotated[list[Name], Field(max_length=1000)] = []
    task: Annotated[StrictStr, Field(max_length=100)] = "classification"


ONNX_PROVENANCE_FORMAT = "edgec.provenance/1"


class OnnxProvenance(_Open):
    """The JSON under the ``edgec.provenance`` metadata key of an exported ONNX file (edgec.onnx.export)."""

    format: Literal["edgec.provenance/1"]
    arch: Name | None = None
    config: dict[StrictStr, Any] = {}
    spec: SpecJson | None = None
    checkpoint_digest: Digest | None = None
    passes: list[Any] = []

    @field_validator("config")
    @classmethod
    def _n_mels(cls, config: dict) -> dict:
        n = config.get("n_mels")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N_MELS):
            raise ValueError(f"n_mels must be an integer in 1..{MAX_N_MELS}, got {n!r:.40}")
        return config


def check_onnx_provenance(data, what: str) -> dict:
    """The parsed ``edgec.provenance`` JSON (already size/depth limited by ``load_json``), typed."""
    check_json(data, what)
    if not isinstance(data, dict):
        raise EdgecError(f"{what}: a JSON {type(data).__name__}, expected an object")
    validate(OnnxProvenance, data, what)
    check_provenance(data.get("passes", []), what, ("passes",))
    return data


__all__ = ["MAX_CHARS", "MAX_HRF_EXPAND", "MAX_INPUT_ELEMENTS", "MAX_RECORDS", "PASS_PARAMS", "Container",
           "OnnxProvenance", "ProvenanceRecord", "check_container", "check_json", "check_onnx_provenance",
           "check_pass_log", "check_provenance", "describe_error", "field_path", "validate"]
