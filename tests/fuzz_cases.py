"""Malformed inputs for tests/e2e/test_fuzz.py, and the harness that feeds them to the CLI.

Every case is one edgec command line over one generated file: mutated checkpoints (structure and byte flips),
ONNX files, data files, recipes, latency tables and CLI values. The promise checked: exit 0 or 2 (some cases:
exactly 2), never 3, never a traceback, never a raw control character from a file on the terminal, strict JSON
under ``--json``, never code run from a file.

The cases run in one child process (``python tests/fuzz_cases.py --child FOLDER START``) through
``edgec.app.cli.main`` in-process, each under an alarm and the child under an address-space cap, because some
inputs are built to allocate gigabytes or loop for ever: such a case must fail the test, not the machine. A
child that dies or hangs is replaced and continues after the case that killed it. Generation is deterministic
(fixed seeds, fixed offsets), so the same cases run everywhere.

    python tests/fuzz_cases.py --table [FOLDER]    # run everything, print the outcome table
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

OK_OR_BAD = frozenset({0, 2})  # a malformed input may still be usable (a flipped byte in unused zip padding)
BAD = frozenset({2})  # this input is wrong: a clear exit 2
OK = frozenset({0})  # the unmodified control inputs
CASE_TIMEOUT_S = 15  # a case (one tiny-model command) takes well under a second
MEMORY_HEADROOM = 3 << 30  # the child may grow this much past its size after imports
TOTAL_BUDGET_S = 600
# control characters a file could smuggle onto a terminal (ESC, BEL, CSI/OSC in C1); \t \n \r are fine
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
HOSTILE = "touch PWNED"  # what the hostile pickles would run; the test checks that PWNED never appears


@dataclass(frozen=True)
class Case:
    id: str  # "kind/name"
    argv: tuple  # edgec arguments; run in the fuzz folder
    make: object = None  # make(folder) writes the inputs (a callable or None)
    expect: frozenset = OK_OR_BAD
    needs: str | None = None  # "no_verify": skipped while SourceOptions has no such field

    @property
    def kind(self) -> str:
        return self.id.split("/")[0]


CASES: list[Case] = []


def case(id, argv, make=None, expect=OK_OR_BAD, needs=None) -> None:
    CASES.append(Case(id, tuple(map(str, argv)), make, expect, needs))


def slug(id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", id)


# --------------------------------------------------------------------------------------------- base inputs
RESNET = {"base_width": 4, "blocks_per_stage": [1, 1, 1, 1], "image_size": 8}
BASE_FILES = ("r.pt", "t.pt", "c.pt", "m.onnx", "d.npz")
TRANSFORMER = {"n_mels": 8, "num_classes": 2, "d_model": 8, "num_layers": 1, "num_heads": 2, "ffn_dim": 16}


def make_base(folder: Path) -> None:
    """r.pt (tiny ResNet), t.pt (tiny ConvTransformer with an HRF scaffold: a structural pass log), c.pt (the
    same without it, for audio), m.onnx (a small hand-built classifier with edgec metadata), d.npz, audio/."""
    from edgec.app import api
    from edgec.core.options import ScaffoldHrfOptions, ZooCreateOptions

    api.zoo_create("resnet", folder / "r.pt", ZooCreateOptions(set=RESNET))
    api.zoo_create("convtransformer", folder / "c.pt", ZooCreateOptions(set=TRANSFORMER))
    api.scaffold_hrf(folder / "c.pt", folder / "t.pt", ScaffoldHrfOptions(expand=2))
    (folder / "m.onnx").write_bytes(onnx_bytes())
    save_npz(folder / "d.npz")
    make_audio(folder / "audio")
    for fifo in ("fifo", "recipes/fifo", "fifo-in", "fifo-in.npz"):
        os.mkfifo(folder / fifo)
    (folder / "recipes" / "blocker").write_text("a file where a folder is expected")


def tensors(n=24, seed=0):
    import numpy as np

    g = np.random.default_rng(seed)
    return g.standard_normal((n, 1, 8, 8)).astype("float32"), g.integers(0, 10, n)


def save_npz(path, **override):
    import numpy as np

    x, y = tensors()
    arrays = {"inputs": x, "targets": y, **override}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


# --------------------------------------------------------------------------------------------- checkpoints
_LOADED: dict = {}


def load_container(path):
    """A private copy of the checkpoint's container (read once per file)."""
    import torch

    if path not in _LOADED:
        _LOADED[path] = torch.load(path, map_location="cpu", weights_only=True)
    return copy.deepcopy(_LOADED[path])


def save_container(obj, path) -> None:
    import torch

    torch.save(obj, path)


@dataclass(frozen=True)
class Whole:
    """A mutation's result that replaces the whole container (any other return value is ignored)."""

    value: object


def ckpt_mutation(id, base, mutate, expect=BAD, verify_variant=True) -> None:
    """``inspect`` on ``base`` with ``mutate(container)`` applied (it edits in place or returns a ``Whole``);
    the digest is left as it was. With ``verify_variant`` the same file is also read with --no-verify, so that
    the structure check, not the digest check, must refuse it."""
    name = f"ckpt/{slug(id)}.pt"

    def make(folder):
        obj = load_container(folder / base)
        new = mutate(obj)
        save_container(new.value if isinstance(new, Whole) else obj, folder / name)

    case(f"ckpt/{id}", ["inspect", name], make, expect)
    if verify_variant:
        case(f"ckpt/{id}+no-verify", ["inspect", name, "--no-verify"], None, expect, needs="no_verify")


def _set(path: str, value):
    """A mutation setting ``container[a][b]...`` (``path`` "a.b"; ``-`` deletes the key)."""
    keys = path.split(".")

    def mutate(obj):
        target = obj
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value == "-":
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return mutate


def _replace(value):
    return lambda obj: Whole(value() if callable(value) else copy.deepcopy(value))


def _first_weight(obj):
    return next(k for k, v in obj["state_dict"].items() if v.is_floating_point() and v.ndim > 1)


def _tensor_edit(edit):
    def mutate(obj):
        k = _first_weight(obj)
        obj["state_dict"][k] = edit(obj["state_dict"][k])
    return mutate


def _changed_weights(digest="-"):
    def mutate(obj):
        k = _first_weight(obj)
        obj["state_dict"][k] = obj["state_dict"][k].clone()
        obj["state_dict"][k].view(-1)[0] += 0.5
        if digest == "-":
            del obj["digest"]
        elif digest != "keep":
            obj["digest"] = digest
    return mutate


def _hrf_params(**params):
    def mutate(obj):
        rec = obj["passes"][0]
        rec["params"] = params["raw"] if "raw" in params else {**rec["params"], **params}
    return mutate


def _doubling(levels=48):
    """A list whose pickle is tiny (shared references) and whose traversal visits 2**levels leaves."""
    x = ["bomb"]
    for _ in range(levels):
        x = [x, x]
    return x


def _deep(levels=800):
    x = []
    for _ in range(levels):
        x = [x]
    return x


class _Hostile:
    def __reduce__(self):
        return (os.system, (HOSTILE,))


def _sparse(t):
    return t.to_sparse()


def _meta(t):
    import torch

    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _strided_giant(t):
    import torch

    return torch.zeros(1).expand(1 << 40, *t.shape[1:])  # stored as one element; as a view 2**40 rows


def _int(t):
    return t.to(__import__("torch").int64)


def _complex(t):
    return t.to(__import__("torch").complex64)


ESCAPES = "\x1b[2J\x1b]0;pwned\x07[bold red]X[/] [/oops] [link=file:///etc/passwd]y[/link]\x9b31m"


def define_checkpoint_cases() -> None:
    case("ckpt/control", ["inspect", "r.pt"], None, OK)
    case("ckpt/control-hrf", ["inspect", "t.pt"], None, OK)
    top = {"list": [1, 2], "int": 5, "none": None, "str": "edgec.checkpoint/1", "tensor": "TENSOR"}
    for name, value in top.items():
        value = (lambda: __import__("torch").zeros(3)) if value == "TENSOR" else value
        ckpt_mutation(f"top-{name}", "r.pt", _replace(value), verify_variant=False)
    for name, value in {"future": "edgec.checkpoint/99", "int": 5, "missing": "-"}.items():
        ckpt_mutation(f"format-{name}", "r.pt", _set("format", value), verify_variant=False)
    for name, value in {"none": None, "str": "resnet", "list": [], "missing": "-"}.items():
        ckpt_mutation(f"model-{name}", "r.pt", _set("model", value))
    arch = {"int": 5, "none": None, "empty": "", "unknown": "nonexistent", "list": ["resnet"],
            "module": "os:system", "file": "/etc/passwd:X", "escape": "\x1b[2Jx"}
    for name, value in arch.items():
        ckpt_mutation(f"arch-{name}", "r.pt", _set("model.arch", value))
    config = {"str": "x", "int": 5, "none": None, "list": [], "width-str": {"base_width": "x"},
              "width-0": {"base_width": 0}, "width-neg": {"base_width": -1}, "width-huge": {"base_width": 1 << 20},
              "width-2e70": {"base_width": 1 << 70}, "blocks-int": {"blocks_per_stage": 5},
              "unknown-key": {"bogus": 1}, "image-0": {"image_size": 0}, "classes-0": {"num_classes": 0}}
    for name, value in config.items():
        mutate = _set("model.config", value) if not isinstance(value, dict) else (
            lambda obj, v=value: obj["model"]["config"].update(v))
        ckpt_mutation(f"config-{name}", "r.pt", mutate)
    huge_input = {"name": "pixels", "dims": [1 << 40, 1, 8, 8], "dtype": "float32"}
    spec = {"str": "x", "int": 5, "inputs-int": {"inputs": 5}, "inputs-name-int": {"inputs": [{"name": 5}]},
            "huge-input": {"inputs": [huge_input]},
            "dtype-bogus": {"inputs": [{**huge_input, "dims": [2, 1, 8, 8], "dtype": "bogus"}]},
            "dim-dict-bad": {"inputs": [{**huge_input, "dims": [{"name": "b"}, 1, 8, 8]}]}}
    for name, value in spec.items():
        ckpt_mutation(f"spec-{name}", "r.pt", _set("model.spec", value))
    ckpt_mutation("capture-str", "r.pt", _set("model.capture", "x"), expect=OK_OR_BAD)
    passes = {"int": 5, "str": "fold.batchnorm", "list-none": [None], "list-int": [5], "list-empty-dict": [{}],
              "unknown-pass": [{"pass": "nope", "version": 1, "params": {}}], "pass-int": [{"pass": 5}],
              "bnfold-twice": [{"pass": "fold.batchnorm", "version": 1, "params": {}}] * 2}
    for name, value in passes.items():
        ckpt_mutation(f"passes-{name}", "r.pt", _set("passes", value))
    hrf = {"params-list": _hrf_params(raw=[]), "params-none": _hrf_params(raw=None),
           "params-unknown-key": _hrf_params(bogus=1), "expand-huge": _hrf_params(expand=10 ** 8),
           "expand-0": _hrf_params(expand=0), "expand-str": _hrf_params(expand="2"),
           "version-str": _set("passes.0.version", "1"), "version-999": _set("passes.0.version", 999),
           "version-none": _set("passes.0.version", None), "name-int": _set("passes.0.pass", 5)}
    for name, mutate in hrf.items():
        ckpt_mutation(f"hrf-{name}", "t.pt", mutate)
    prov = {"int": 5, "str": "x", "list-none": [None], "list-int": [1, 2], "dict": {"a": 1},
            "none": None, "deep": _deep, "doubling-bomb": _doubling,
            "int-5000-digits": lambda: [{"pass": "zoo.create", "version": 1, "x": 10 ** 5000}],
            "nan": [{"pass": "zoo.create", "version": 1, "x": float("nan")}],
            "bytes": [{"pass": "zoo.create", "version": 1, "x": b"\xff"}],
            "tensor": lambda: [{"pass": "zoo.create", "version": 1, "x": __import__("torch").ones(2)}],
            "int-keys": [{1: 2}]}
    for name, value in prov.items():
        ckpt_mutation(f"provenance-{name}", "r.pt",
                      lambda obj, v=value: obj.__setitem__("provenance", v() if callable(v) else copy.deepcopy(v)))
    ckpt_mutation("provenance-count-bomb", "r.pt", lambda obj: obj.__setitem__("provenance", [0] * 1_100_000),
                  verify_variant=False)  # 1.1 M entries: 3 s to unpickle, so read once
    # strings a terminal would obey; a provenance entry of a valid checkpoint may hold them (exit 0 or 2)
    ckpt_mutation("provenance-escapes", "r.pt", lambda obj: obj["provenance"][0].update(
        {"pass": "zoo.create" + ESCAPES, "note": ESCAPES}), expect=OK_OR_BAD)
    ckpt_mutation("provenance-edited", "r.pt", lambda obj: obj["provenance"][0]["params"].update(seed=1),
                  verify_variant=False)
    sd = {"list": [], "none": None, "empty": {}, "int-key": "INTKEY", "str-value": "STR"}
    for name, value in sd.items():
        def mutate(obj, v=value):
            if v == "INTKEY":
                obj["state_dict"] = dict(enumerate(obj["state_dict"].values()))
            elif v == "STR":
                obj["state_dict"][_first_weight(obj)] = "x"
            else:
                obj["state_dict"] = v
        ckpt_mutation(f"state_dict-{name}", "r.pt", mutate)
    edits = {"sparse": _sparse, "meta": _meta, "int64": _int, "complex": _complex, "strided-giant": _strided_giant,
             "shape": lambda t: t[:1], "nan": lambda t: t * float("nan")}
    for name, edit in edits.items():
        ckpt_mutation(f"tensor-{name}", "r.pt", _tensor_edit(edit))
    ckpt_mutation("state_dict-extra-key", "r.pt", lambda obj: obj["state_dict"].update(bogus=obj["state_dict"][
        _first_weight(obj)]))
    ckpt_mutation("state_dict-missing-key", "r.pt", lambda obj: obj["state_dict"].pop(_first_weight(obj)))
    for name, digest in {"keep": "keep", "removed": "-", "empty": "", "none": None}.items():
        ckpt_mutation(f"weights-changed-digest-{name}", "r.pt", _changed_weights(digest), verify_variant=False)
    for name, value in {"int": 5, "not-hex": "zz", "list": ["x"], "missing": "-", "empty": "", "none": None}.items():
        ckpt_mutation(f"digest-{name}", "r.pt", _set("digest", value), verify_variant=False)
    ckpt_mutation("hostile-pickle", "r.pt", lambda obj: obj.__setitem__("provenance", [_Hostile()]),
                  verify_variant=False)
    case("ckpt/hostile-legacy-pickle", ["inspect", "ckpt/legacy.pt"], _legacy_pickle, BAD)
    define_checkpoint_bytes()
    for name in ("control", "provenance-escapes", "provenance-nan", "provenance-bytes", "digest-missing"):
        path = "r.pt" if name == "control" else f"ckpt/{name}.pt"
        case(f"ckpt/{name}+json", ["inspect", path, "--json"], expect=OK if name == "control" else BAD)
        if name != "control":
            case(f"ckpt/{name}+no-verify+json", ["inspect", path, "--no-verify", "--json"],
                 expect=OK_OR_BAD if name in ("provenance-escapes", "digest-missing") else BAD, needs="no_verify")


def _legacy_pickle(folder):
    import pickle

    (folder / "ckpt" / "legacy.pt").write_bytes(pickle.dumps({"format": "edgec.checkpoint/1", "x": _Hostile()}))


def _write_bytes(name, fn, base="r.pt"):
    def make(folder):
        (folder / name).write_bytes(fn((folder / base).read_bytes()))
    return make


def _flip(offset_fraction):
    def fn(raw):
        b = bytearray(raw)
        i = int(len(b) * offset_fraction)
        b[i] ^= 0x5A
        return bytes(b)
    return fn


def _flip_in(needle: bytes, after: int = 0):
    """Flip one byte of the first occurrence of ``needle`` (a string in the pickled provenance)."""
    def fn(raw):
        i = raw.index(needle) + after
        b = bytearray(raw)
        b[i] ^= 0x01
        return bytes(b)
    return fn


def define_checkpoint_bytes() -> None:
    for name, fn in {"empty": lambda r: b"", "random": lambda r: random.Random(1).randbytes(2048),
                     "truncated-4k": lambda r: r[:4000], "truncated-half": lambda r: r[: len(r) // 2],
                     "truncated-last": lambda r: r[:-1], "zip-garbage": lambda r: b"PK\x03\x04" + r[4:64]}.items():
        case(f"ckpt/bytes-{name}", ["inspect", f"ckpt/bytes-{name}.pt"], _write_bytes(f"ckpt/bytes-{name}.pt", fn),
             BAD)
    rng = random.Random(11)
    for i in range(10):
        frac = round(rng.random(), 4)
        path = f"ckpt/flip-{i}.pt"
        case(f"ckpt/flip-{i}@{frac}", ["inspect", path], _write_bytes(path, _flip(frac)))
    # bytes of the pickled provenance: covered by the digest, so a changed byte is an integrity error
    for name, (needle, after) in {"pass-name": (b"zoo.create", 3), "params-key": (b"seed", 1),
                                  "output-digest": (b"output_digest", 20)}.items():
        path = f"ckpt/flip-provenance-{name}.pt"
        case(f"ckpt/flip-provenance-{name}", ["inspect", path], _write_bytes(path, _flip_in(needle, after)), BAD)


# --------------------------------------------------------------------------------------------- ONNX
PROVENANCE = {"arch": "resnet", "config": {**RESNET, "in_channels": 1, "num_classes": 10},
              "format": "edgec.provenance/1", "checkpoint_digest": "0" * 64,
              "passes": [{"pass": "zoo.create", "version": 1, "params": {"arch": "resnet", "seed": 0}},
                         {"pass": "export.onnx", "version": 1, "params": {"opset": 20, "weights": "fp32"}}],
              "spec": {"inputs": [{"dtype": "float32", "name": "pixels", "shape": ["batch", 1, "height", "width"]}],
                       "outputs": ["logits"], "task": "classification"}}
PLACEHOLDER = "@" * 24


def onnx_model(provenance=PROVENANCE, *, meta=None, edit=None):
    """Flatten → Gemm(64 → 10): input pixels [batch, 1, 8, 8], output logits [batch, 10]; ``edit(model)``."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    w = numpy_helper.from_array(g.standard_normal((64, 10)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "B")
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("Gemm", ["flat", "W", "B"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT,
                                                                         ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], producer_name="edgec")
    model.ir_version = 10
    text = provenance if isinstance(provenance, str) else json.dumps(provenance, sort_keys=True)
    entries = [("edgec.provenance", text)] if provenance is not None else []
    for key, value in [*entries, *(meta or [])]:
        p = model.metadata_props.add()
        p.key, p.value = key, value
    if edit:
        edit(model)
    return model


def onnx_bytes(*args, **kwargs) -> bytes:
    return onnx_model(*args, **kwargs).SerializeToString()


def onnx_case(name, make_bytes, expect=OK_OR_BAD) -> None:
    path = f"onnx/{slug(name)}.onnx"

    def make(folder):
        (folder / path).write_bytes(make_bytes(folder))

    case(f"onnx/{name}/inspect", ["inspect", path], make, expect)
    case(f"onnx/{name}/eval", ["eval", path, "--data", "d.npz", "--no-latency"], None, expect)


def _patched(provenance_bytes: bytes):
    """A model whose provenance value is arbitrary bytes (protobuf would refuse to serialise invalid UTF-8)."""
    def make(folder):
        raw = onnx_bytes(PLACEHOLDER)
        assert len(provenance_bytes) == len(PLACEHOLDER)
        return raw.replace(PLACEHOLDER.encode(), provenance_bytes)
    return make


def _graph_edit(fn):
    return lambda folder: onnx_bytes(edit=fn)


def _no_outputs(m):
    del m.graph.output[:]


def _elem_type(m):
    m.graph.input[0].type.tensor_type.elem_type = 999


def _short_raw(m):
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:10]


def _absurd_init_dims(m):
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([1 << 31, 1 << 31])


def _absurd_input_dim(m):
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 1 << 40


def _negative_dim(m):
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = -5


def _external(location):
    def edit(m):
        from onnx import TensorProto

        t = m.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "2560")):
            e = t.external_data.add()
            e.key, e.value = k, v
    return edit


def _opset(version):
    def edit(m):
        m.opset_import[0].version = version
    return edit


def _no_opset(m):
    del m.opset_import[:]


def _ir_version(m):
    m.ir_version = 999


def _unknown_op(m):
    m.graph.node[0].op_type, m.graph.node[0].domain = "Bogus", "evil.domain"


def _untyped_input(m):
    m.graph.input[0].ClearField("type")


def _dangling_input(m):
    m.graph.node[1].input[0] = "nowhere"


def define_onnx_cases() -> None:
    onnx_case("control", lambda f: onnx_bytes(), OK)
    onnx_case("no-provenance", lambda f: onnx_bytes(None), OK_OR_BAD)
    bad_meta = {"invalid-json": "{", "number": "5", "list": "[]", "string": '"str"', "null": "null",
                "passes-int": '{"passes": 5}', "passes-list-int": '{"passes": [5]}',
                "pass-name-int": '{"passes": [{"pass": 5}]}', "config-str": '{"config": "x"}',
                "config-values": '{"config": {"n_mels": "x", "image_size": [1]}}', "spec-int": '{"spec": 5}',
                "spec-task-int": '{"spec": {"task": 5}}', "spec-inputs-int": '{"spec": {"inputs": 5}}',
                "arch-dict": '{"arch": {"x": 1}}', "deep": "[" * 100_000 + "]" * 100_000,
                "digits-5000": '{"checkpoint_digest": ' + "9" * 5000 + "}", "nan": '{"x": NaN}',
                "spec-huge-input": json.dumps({**PROVENANCE, "spec": {**PROVENANCE["spec"], "inputs": [
                    {"dtype": "float32", "name": "pixels", "shape": [1 << 40, 1, 8, 8]}]}})}
    for name, text in bad_meta.items():
        onnx_case(f"provenance-{name}", lambda f, t=text: onnx_bytes(t))
    onnx_case("provenance-invalid-utf8", _patched(b'{"a": "\xff\xfe\xfd"}' + b" " * 12))
    onnx_case("provenance-escapes", lambda f: onnx_bytes({**PROVENANCE, "arch": "resnet" + ESCAPES, "passes": [
        {"pass": "zoo.create" + ESCAPES, "version": 1, "params": {"note": ESCAPES}}]}))
    onnx_case("provenance-twice", lambda f: onnx_bytes(meta=[("edgec.provenance", "{")]))
    onnx_case("card-invalid", lambda f: onnx_bytes(meta=[("edgec.card", "{" * 5000)]))
    for name in ("provenance-escapes", "provenance-invalid-json", "control"):
        case(f"onnx/{name}/inspect+json", ["inspect", f"onnx/{name}.onnx", "--json"])
    edits = {"no-outputs": _no_outputs, "elem-type-999": _elem_type, "short-raw-data": _short_raw,
             "absurd-initializer-dims": _absurd_init_dims, "absurd-input-dim": _absurd_input_dim,
             "negative-dim": _negative_dim, "external-traversal": _external("../../../../../../etc/passwd"),
             "external-absolute": _external("/etc/passwd"), "external-missing": _external("weights.bin"),
             "opset-999": _opset(999), "opset-1": _opset(1), "no-opset": _no_opset, "ir-version-999": _ir_version,
             "unknown-op": _unknown_op, "untyped-input": _untyped_input, "dangling-input": _dangling_input}
    for name, fn in edits.items():
        onnx_case(name, _graph_edit(fn))
    for name, fn in {"empty": lambda r: b"", "random": lambda r: random.Random(2).randbytes(512),
                     "truncated": lambda r: r[: len(r) // 2]}.items():
        onnx_case(f"bytes-{name}", lambda f, fn=fn: fn(onnx_bytes()))
    rng = random.Random(12)
    for i in range(6):
        frac = round(rng.random(), 4)
        onnx_case(f"flip-{i}@{frac}", lambda f, frac=frac: _flip(frac)(onnx_bytes()))


# --------------------------------------------------------------------------------------------- data files
def data_case(name, suffix, make_file, expect=BAD, model="m.onnx") -> None:
    path = f"data/{slug(name)}{suffix}"

    def make(folder):
        make_file(folder / path)

    case(f"data/{name}", ["eval", model, "--data", path, "--no-latency"], make, expect)


def _npz(**override):
    return lambda p: save_npz(p, **override)


def _pt(obj_fn):
    return lambda p: save_container(obj_fn(), p)


def _raw(data: bytes):
    return lambda p: p.write_bytes(data)


def _safetensors(header: bytes, body: bytes = b"", length: int | None = None):
    return _raw(struct.pack("<Q", len(header) if length is None else length) + header + body)


def _torch_data(**override):
    def obj():
        import torch

        x, y = tensors()
        return {"inputs": torch.from_numpy(x), "targets": torch.from_numpy(y), **override}
    return obj


def define_data_cases() -> None:
    import numpy as np

    x, y = tensors()
    data_case("control-npz", ".npz", _npz(), OK)
    npz = {"pickled-member": {"inputs": np.array([{"a": 1}] * 24, dtype=object)},
           "targets-uint64-huge": {"targets": np.full(24, 2 ** 63 + 5, dtype=np.uint64)},
           "targets-int64-max": {"targets": np.full(24, np.iinfo(np.int64).max)},
           "targets-2e62": {"targets": np.full(24, 2 ** 62)}, "targets-negative": {"targets": -y},
           "targets-nan": {"targets": np.full(24, np.nan)}, "targets-2d": {"targets": y.reshape(4, 6)},
           "inputs-wrong-size": {"inputs": x[:, :, :3, :3]}, "inputs-int": {"inputs": x.astype(np.int64)},
           "inputs-bool": {"inputs": x > 0}, "inputs-nan": {"inputs": x * np.nan},
           "inputs-complex": {"inputs": x.astype(np.complex64)}, "inputs-float16": {"inputs": x.astype(np.float16)},
           "empty": {"inputs": x[:0], "targets": y[:0]}, "scalar": {"inputs": np.float32(1), "targets": np.int64(1)},
           "inputs-1d": {"inputs": x.reshape(-1)[:24]}, "lengths-differ": {"targets": y[:5]},
           "missing-targets": {"targets": None}, "val-inputs-only": {"val_inputs": x},
           "classes-int": {"classes": np.arange(10)}, "classes-duplicate": {"classes": np.array(["a"] * 10)},
           "classes-too-few": {"classes": np.array(["a", "b"])},
           "classes-escapes": {"classes": np.array([ESCAPES + str(i) for i in range(10)])},
           "classes-2d": {"classes": np.array([["a", "b"]] * 5)}}
    for name, override in npz.items():
        expect = OK_OR_BAD if name in ("inputs-float16", "inputs-int", "classes-escapes") else BAD
        data_case(f"npz-{name}", ".npz", _npz(**override), expect)
    for name, data in {"empty": b"", "random": random.Random(3).randbytes(300), "not-zip": b"PK\x03\x04junk"}.items():
        data_case(f"npz-bytes-{name}", ".npz", _raw(data))
    data_case("npz-truncated", ".npz", lambda p: (save_npz(p), p.write_bytes(p.read_bytes()[:700])))

    def torch_obj(name):
        import torch

        xt = torch.from_numpy(x)
        return {"sparse-inputs": lambda: _torch_data(inputs=xt.to_sparse())(),
                "meta-inputs": lambda: _torch_data(inputs=torch.empty(xt.shape, device="meta"))(),
                "meta-targets": lambda: _torch_data(targets=torch.empty(24, dtype=torch.int64, device="meta"))(),
                "strided-giant": lambda: _torch_data(inputs=torch.zeros(1).expand(1 << 40, 1, 8, 8),
                                                     targets=torch.zeros(1, dtype=torch.int64).expand(1 << 40))(),
                "list": lambda: [xt, torch.from_numpy(y)], "targets-list": lambda: _torch_data(targets=[1] * 24)(),
                "hostile": lambda: _torch_data(classes=_Hostile())(),
                "classes-nested": lambda: _torch_data(classes=[["a"]] * 10)()}[name]
    for name in ("sparse-inputs", "meta-inputs", "meta-targets", "strided-giant", "list", "targets-list", "hostile",
                 "classes-nested"):
        data_case(f"pt-{name}", ".pt", lambda p, n=name: save_container(torch_obj(n)(), p))
    header = json.dumps({"inputs": {"dtype": "F32", "shape": [24, 1, 8, 8], "data_offsets": [0, 6144]}}).encode()
    st = {"length-huge": _safetensors(header, length=1 << 60), "header-invalid-json": _safetensors(b"{" * 64),
          "offsets-out-of-range": _safetensors(header, b"\0" * 16), "dtype-unknown": _safetensors(
              header.replace(b"F32", b"Q99"), b"\0" * 6144),
          "header-deep": _safetensors(b"[" * 50_000 + b"]" * 50_000), "truncated": _raw(b"\x10\0\0")}
    for name, make in st.items():
        data_case(f"safetensors-{name}", ".safetensors", make)
    define_audio_cases()
    for name, expect in (("npz-classes-escapes", OK_OR_BAD), ("npz-targets-int64-max", BAD)):
        case(f"data/{name}+json", ["eval", "m.onnx", "--data", f"data/{name}.npz", "--no-latency", "--json"],
             expect=expect)


# --------------------------------------------------------------------------------------------- audio
def wav(*, rate=16000, channels=1, bits=16, n=800, tag=1, fmt_size=None, data_size=None, cut=None) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    pcm = random.Random(n).randbytes(n * channels * bits // 8)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt) if fmt_size is None else fmt_size) + fmt
            + b"data" + struct.pack("<I", len(pcm) if data_size is None else data_size) + pcm)
    raw = b"RIFF" + struct.pack("<I", len(body)) + body
    return raw[:cut] if cut else raw


def make_audio(folder: Path, *, bad: bytes | None = None, csv_text: str | bytes | None = None) -> None:
    """Two classes, train and test rows; ``bad`` replaces the first test WAV, ``csv_text`` labels.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["path,label,split"]
    for i in range(6):
        label, split = ("yes", "no")[i % 2], ("train", "test")[i // 4]
        (folder / f"{i}.wav").write_bytes(bad if bad is not None and i == 4 else wav(n=800 + i))
        rows.append(f"{i}.wav,{label},{split}")
    text = "\n".join(rows) + "\n" if csv_text is None else csv_text
    (folder / "labels.csv").write_bytes(text.encode() if isinstance(text, str) else text)


def audio_case(name, expect=BAD, **kwargs) -> None:
    path = f"data/audio-{slug(name)}"
    case(f"data/audio-{name}", ["eval", "c.pt", "--data", path, "--no-latency"],
         lambda folder: make_audio(folder / path, **kwargs), expect)


def define_audio_cases() -> None:
    case("data/audio-control", ["eval", "c.pt", "--data", "audio", "--no-latency"], None, OK)
    wavs = {"fmt-size-huge": wav(fmt_size=0xFFFFFFF0), "data-size-huge": wav(data_size=0xFFFFFFF0),
            "channels-0": wav(channels=0), "bits-8": wav(bits=8), "rate-8k": wav(rate=8000),
            "truncated-header": wav(cut=30), "riff-only": b"RIFF", "extensible-short": wav(tag=0xFFFE),
            "bits-0": wav(bits=0), "random": random.Random(4).randbytes(200)}
    for name, raw in wavs.items():  # a data chunk longer than the file is read as far as it goes
        audio_case(f"wav-{name}", bad=raw, expect=OK_OR_BAD if name == "data-size-huge" else BAD)
    good = "\n".join(f"{i}.wav,{('yes', 'no')[i % 2]},{('train', 'test')[i // 4]}" for i in range(6))
    csvs = {"invalid-utf8": b"path,label\n\xff\xfe,yes\n", "traversal": f"path,label,split\n{good}\n"
            "../../../../../../etc/passwd,yes,test\n", "absolute": f"path,label,split\n{good}\n/etc/passwd,no,test\n",
            "unknown-column": "path,label,evil\n0.wav,yes,x\n", "empty": "", "missing-wav":
            f"path,label,split\n{good}\nnope.wav,yes,test\n", "label-escapes": f"path,label,split\n{good}\n"
            f"0.wav,{ESCAPES},train\n", "nul": "path,label\n0.wav,\0yes\n"}
    for name, text in csvs.items():
        audio_case(f"csv-{name}", csv_text=text, expect=OK_OR_BAD if name == "label-escapes" else BAD)


# --------------------------------------------------------------------------------------------- recipes
GOOD_RECIPE = ('name = "fuzz"\n[[steps]]\nrun = "zoo.create"\nname = "resnet"\noutput = "base.pt"\n'
               'set = {base_width = 4, blocks_per_stage = [1, 1, 1, 1], image_size = 8}\n'
               '[[steps]]\nrun = "inspect"\ninput = "base.pt"\n')
GOOD_STEPS = GOOD_RECIPE.split("\n", 1)[1]


def recipe_case(name, text, *, dry_run=True, out=None, expect=BAD, path=None) -> None:
    path = path or f"recipes/{slug(name)}.toml"

    def make(folder):
        p = folder / path
        if text is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(text.encode() if isinstance(text, str) else text)

    argv = ["run", path, "--out", out or f"recipes/out-{slug(name)}"] + (["--dry-run"] if dry_run else [])
    case(f"recipe/{name}", argv, make, expect)


def _step(**params) -> str:
    def value(v):
        return json.dumps(v) if not isinstance(v, dict) else "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
    return "[[steps]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in params.items())


def define_recipe_cases() -> None:
    recipe_case("control-dry-run", GOOD_RECIPE, expect=OK)
    recipe_case("control-run", GOOD_RECIPE, dry_run=False, expect=OK)
    create = {"run": "zoo.create", "name": "resnet", "output": "a.pt"}
    recipes = {
        "run-list": _step(run=["fold"], input="r.pt"), "run-table": '[[steps]]\nrun = {a = 1}\n',
        "run-int": _step(run=5), "steps-int": "steps = 5\n", "steps-str": 'steps = "x"\n',
        "steps-table": '[steps]\nrun = "fold"\n', "no-steps": 'name = "x"\n', "name-int": "name = 5\n" + GOOD_STEPS,
        "step-without-run": "[[steps]]\ninput = 'x'\n",
        "deep-array": "x = " + "[" * 5000 + "]" * 5000 + "\n" + GOOD_STEPS,
        "invalid-toml": "[[steps\n", "invalid-utf8": b"name = \"\xff\xfe\"\n", "nul": "name = \"a\0b\"\n",
        "unknown-step": _step(run="fly"), "unknown-param": _step(**create, bogus=1),
        "seed-str": _step(**create, seed="x"), "seed-float": _step(**create, seed=1.5),
        "seed-bool": _step(**create, seed=True), "seed-huge": _step(**create, seed=2 ** 63 - 1),
        "seed-negative": _step(**create, seed=-1),
        "both-latency-budgets": _step(run="prune", input="{recipe_dir}/../r.pt", output="p.pt", latency_ms=1.0,
                                      latency_ratio=0.5),
        "method-dtl": _step(run="scaffold.ternary", input="{recipe_dir}/../c.pt", output="s.pt", method="dtl"),
        "arch-unimportable": _step(run="zoo.create", name="nonexistent_mod:Cls", output="a.pt"),
        "arch-file-missing": _step(run="zoo.create", name="missing.py:Cls", output="a.pt"),
        "device-meta": _step(run="finetune", input="{recipe_dir}/../r.pt", output="f.pt",
                             data="{recipe_dir}/../d.npz", device="meta"),
        "device-unknown": _step(run="finetune", input="{recipe_dir}/../r.pt", output="f.pt",
                                data="{recipe_dir}/../d.npz", device="quantum"),
        "classes-0": _step(**create, set={**RESNET, "num_classes": 0}),
        "width-0": _step(**create, set={**RESNET, "base_width": 0}),
        "width-negative": _step(**create, set={**RESNET, "base_width": -1}),
        "data-builtins-exit": _step(run="eval", input="{recipe_dir}/../m.onnx", data="builtins:exit"),
        "output-is-input": _step(run="fold", input="{recipe_dir}/../r.pt", output="{recipe_dir}/../r.pt"),
        "outputs-collide": _step(**create) + _step(**create),
        "output-parent-is-file": _step(run="zoo.create", name="resnet", output="{recipe_dir}/../d.npz/x.pt"),
        "output-is-report": _step(run="zoo.create", name="resnet", output="report.json", set=RESNET),
        "output-is-fifo": _step(run="zoo.create", name="resnet", output="{recipe_dir}/fifo", set=RESNET),
        "resume-is-output": _step(run="finetune", input="{recipe_dir}/../r.pt", output="f.pt",
                                  data="{recipe_dir}/../d.npz", resume_file="f.pt"),
        "epochs-list": _step(run="finetune", input="{recipe_dir}/../r.pt", output="f.pt",
                             data="{recipe_dir}/../d.npz", epochs=[1]),
        "gates-garbage": GOOD_RECIPE + "[gates]\nmin_metric = 5\nbogus = [1]\n",
        "gates-not-table": "gates = 5\n" + GOOD_RECIPE,  # top level: after [[steps]] it would be a step key
        "gates-metric-str": GOOD_RECIPE + '[gates]\nmin_metric = "uar=abc"\n',
        "gates-metric-table-str": GOOD_RECIPE + '[gates]\nmin_metric = {uar = "x"}\n',
        "gates-size-negative": GOOD_RECIPE + "[gates]\nmax_size_kb = -1\n",
        "gates-latency-str": GOOD_RECIPE + '[gates]\nmax_latency_ms = "fast"\n',
        "huge-string": 'name = "' + "x" * 2_000_000 + '"\n' + GOOD_STEPS,
    }
    valid = ("seed-negative", "seed-huge", "huge-string")  # odd but legal: exit 0 or 2
    for name, text in recipes.items():
        recipe_case(name, text, expect=OK_OR_BAD if name in valid else BAD)
    for name in ("classes-0", "width-0", "output-parent-is-file", "output-is-fifo", "outputs-collide",
                 "output-is-report", "seed-huge"):  # also run for real: the checks must not wait for --dry-run
        recipe_case(f"{name}/run", recipes[name], dry_run=False, path=f"recipes/{slug(name)}.toml",
                    expect=OK_OR_BAD if name in valid else BAD)
    for name, expect in (("control-dry-run", OK), ("run-list", BAD), ("width-0", BAD)):
        case(f"recipe/{name}+json", ["run", f"recipes/{name}.toml", "--out", f"recipes/out-json-{name}",
                                     "--dry-run", "--json"], expect=expect)
    recipe_case("path-is-directory", None, path="recipes")
    recipe_case("path-missing", None, path="recipes/missing.toml")
    recipe_case("out-is-file", GOOD_RECIPE, out="recipes/blocker", dry_run=False)
    recipe_case("out-under-file", GOOD_RECIPE, out="recipes/blocker/sub", dry_run=False)
    recipe_case("out-is-file/dry-run", GOOD_RECIPE, out="recipes/blocker", path="recipes/out-is-file.toml")


# --------------------------------------------------------------------------------------------- latency tables
TABLE = {"format": "edgec.latency-table/1", "remainder_ms": 0.5, "run_overhead_ms": 0.1,
         "key": {"arch": "resnet", "config_digest": "0" * 64, "threads": 1, "runtime": "onnxruntime",
                 "inputs": [{"name": "pixels", "shape": [1, 1, 8, 8], "dtype": "float32"}],
                 "runtime_version": "1", "provider": "CPUExecutionProvider", "cpu": "x", "machine": "x", "cores": 1},
         "dense": {"median_ms": 1.0}, "interactions": [],
         "units": [{"name": "u", "layers": ["stem.0"], "patterns": {"channel": {"density": [1.0, 0.5],
                                                                                 "median_ms": [0.5, 0.3]}}}]}


def table_case(name, text) -> None:
    path = f"tables/{slug(name)}.json"

    def make(folder):
        (folder / path).write_bytes(text.encode() if isinstance(text, str) else text)

    case(f"table/{name}", ["profile", "r.pt", "--table", path], make, BAD)


def _table(**edits) -> str:
    """TABLE with ``edits`` ("a.b" paths; "-" deletes), as JSON (NaN written as the invalid token NaN)."""
    t = copy.deepcopy(TABLE)
    for path, value in edits.items():
        *keys, last = path.split(".")
        target = t
        for k in keys:
            target = target[int(k)] if isinstance(target, list) else target[k]
        if value == "-":
            del target[last]
        else:
            target[int(last) if isinstance(target, list) else last] = value
    return json.dumps(t)


def define_table_cases() -> None:
    """A hand-made table (it never fits r.pt: the check after reading refuses it) and broken variants."""
    table_case("skeleton", _table())  # well-formed, but measured for another config: exit 2
    for name, text in {"invalid-json": "{", "list": "[]", "deep": "[" * 100_000 + "]" * 100_000,
                       "digits-5000": '{"format": ' + "9" * 5000 + "}", "invalid-utf8": b'{"format": "\xff"}',
                       "empty": ""}.items():
        table_case(name, text)
    edits = {"remainder-negative": {"remainder_ms": -1.158}, "remainder-nan": {"remainder_ms": float("nan")},
             "remainder-str": {"remainder_ms": "1"}, "dense-zero": {"dense.median_ms": 0},
             "dense-missing": {"dense": "-"}, "key-missing": {"key": "-"}, "key-int": {"key": 5},
             "units-int": {"units": 5}, "units-list-none": {"units": [None]}, "unit-name-list": {"units.0.name": []},
             "median-negative": {"units.0.patterns.channel.median_ms": [0.5, -0.3]},
             "density-zero": {"units.0.patterns.channel.density": [1.0, 0.0]},
             "curve-lengths-differ": {"units.0.patterns.channel.density": [1.0]},
             "patterns-list": {"units.0.patterns": []}, "interactions-int": {"interactions": 5},
             "interaction-empty": {"interactions": [{}]}, "overhead-negative": {"run_overhead_ms": -1}}
    for name, edit in edits.items():
        table_case(name, _table(**edit))


# --------------------------------------------------------------------------------------------- CLI values
def define_cli_cases() -> None:
    zoo = ["zoo", "create"]
    case("cli/seed-2e64", [*zoo, "resnet", "--seed", 2 ** 64, "-o", "cli/a.pt"], expect=BAD)
    case("cli/seed-negative", [*zoo, "resnet", "--seed", -1, "-o", "cli/b.pt"])
    sizes = {"resnet": ["num_classes=0", "in_channels=0", "base_width=0", "image_size=-1"],
             "convtransformer": ["num_layers=0", "num_layers=-1", "ffn_dim=0", "num_classes=0", "n_mels=0"],
             "bert": ["vocab_size=0"]}
    for arch, sets in sizes.items():
        for s in sets:
            case(f"cli/zoo-{arch}-{s}", [*zoo, arch, "--set", s, "-o", f"cli/{arch}-{slug(s)}.pt"], expect=BAD)
    ft = ["finetune", "r.pt", "--data", "d.npz", "--epochs", "1"]
    case("cli/device-meta", [*ft, "--device", "meta", "-o", "cli/f1.pt"], expect=BAD)
    case("cli/device-unknown", [*ft, "--device", "quantum", "-o", "cli/f2.pt"], expect=BAD)
    case("cli/resume-file-is-output", [*ft, "-o", "cli/f3.pt", "--resume-file", "cli/f3.pt"], expect=BAD)
    case("cli/finetune-wrong-feature-size", ["finetune", "r.pt", "--data", "data/npz-inputs-wrong-size.npz",
                                             "--epochs", "1", "-o", "cli/f4.pt"], expect=BAD)
    case("cli/output-fifo", ["fold", "r.pt", "-o", "fifo"], expect=BAD)
    case("cli/output-parent-is-file", ["fold", "r.pt", "-o", "d.npz/x.pt"], expect=BAD)
    case("cli/data-builtins-exit", ["eval", "m.onnx", "--data", "builtins:exit", "--no-latency"], expect=BAD)
    case("cli/threads-0", ["eval", "m.onnx", "--data", "d.npz", "--threads", "0"], expect=BAD)
    case("cli/input-name-escapes", ["inspect", "x\x1b[2J\x1b]0;t\x07.pt"], expect=BAD)
    case("cli/export-opset-1", ["export", "r.pt", "--opset", "1", "-o", "cli/o1.onnx"], expect=BAD)
    gates = {"min-metric-not-number": ["--min-metric", "uar=abc"], "min-metric-no-value": ["--min-metric", "uar"],
             "min-metric-unknown": ["--min-metric", "bogus=0.5", "--data", "d.npz"],
             "min-metric-without-data": ["--min-metric", "uar=0.5"], "max-size-negative": ["--max-size-kb", "-1"],
             "max-latency-nan": ["--max-latency-ms", "nan"], "max-drop-negative": ["--max-metric-drop", "-0.1"]}
    for name, extra in gates.items():  # refused before any export work
        case(f"cli/export-gate-{name}", ["export", "r.pt", "-o", f"cli/{name}.onnx", *extra], expect=BAD)
    case("cli/prune-gate-min-metric-not-number", ["prune", "r.pt", "--latency-ratio", "0.8", "--min-metric",
                                                  "uar=abc", "-o", "cli/p.pt"], expect=BAD)
    # a FIFO as an input would block a reader for ever: it must be refused
    for name, argv in {"inspect": ["inspect", "fifo-in"], "eval-data": ["eval", "m.onnx", "--data", "fifo-in.npz"],
                       "recipe": ["run", "fifo-in", "--dry-run"], "table": ["profile", "r.pt", "--table", "fifo-in"]}.items():
        case(f"cli/input-fifo-{name}", argv, expect=BAD)


define_checkpoint_cases()
define_onnx_cases()
define_data_cases()
define_recipe_cases()
define_table_cases()
define_cli_cases()
assert len({c.id for c in CASES}) == len(CASES), "duplicate case ids"


# --------------------------------------------------------------------------------------------- the child
class CaseTimeout(BaseException):
    """Raised by the alarm; a BaseException so the CLI's ``except Exception`` cannot swallow it."""


def _alarm(signum, frame):
    raise CaseTimeout()


@contextlib.contextmanager
def _capture_fd2():
    """C-level writes to stderr (onnxruntime, torch) go to a temporary file as well."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        holder = {}
        try:
            yield holder
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            holder["text"] = tmp.read().decode("utf-8", "replace")


def run_case(c: Case, cli_main) -> dict:
    if c.needs == "no_verify":
        from edgec.core.options import SourceOptions

        if "no_verify" not in SourceOptions.__dataclass_fields__:
            return {"id": c.id, "skipped": "SourceOptions has no no_verify field yet"}
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["edgec", *c.argv]
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_TIMEOUT_S)
    with _capture_fd2() as fd2, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except CaseTimeout:
            code = f"timeout after {CASE_TIMEOUT_S} s"
        except BaseException as exc:  # noqa: BLE001 - whatever escapes the CLI is the finding
            code = f"escaped the CLI: {type(exc).__name__}: {str(exc)[:200]}"
        finally:
            signal.alarm(0)
    return {"id": c.id, "code": code, "seconds": round(time.perf_counter() - start, 3),
            "stdout": out.getvalue()[-4000:], "stderr": err.getvalue()[-4000:], "fd2": fd2["text"][-4000:]}


def _reuse_click_command(cli) -> None:
    """``cli.main`` calls ``cli.app(...)``, and typer rebuilds the click command on every call (0.1 s, as long
    as most cases): build it once. The command, its parsing and edgec's error handling are unchanged."""
    import typer.main

    command = typer.main.get_command(cli.app)
    cli.app = lambda *args, **kwargs: command(*args, **kwargs)


def _cap_memory() -> None:
    import resource

    with open("/proc/self/statm") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + MEMORY_HEADROOM
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def generate(folder: Path) -> None:
    for sub in ("ckpt", "onnx", "data", "recipes", "tables", "cli"):
        (folder / sub).mkdir(exist_ok=True)
    make_base(folder)
    hashes = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in BASE_FILES}
    (folder / "base-hashes.json").write_text(json.dumps(hashes))  # the test checks that no case modified them
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)  # pickling the deep provenance recurses through torch's persistent_id
    try:
        for c in CASES:
            if c.make is not None:
                c.make(folder)
    finally:
        sys.setrecursionlimit(limit)
    (folder / "generated").write_text(str(len(CASES)))


def child(folder: Path, start: int) -> None:
    os.chdir(folder)
    os.environ.pop("EDGEC_DEBUG", None)
    import torch  # noqa: F401  (imported before the cap: its import maps a lot)

    from edgec.app import api, cli  # noqa: F401  (api: every command's imports, before the cap)

    _reuse_click_command(cli)

    if not (folder / "generated").exists():
        generate(folder)
    _cap_memory()
    with open(folder / "results.jsonl", "a") as results, open(folder / "progress", "a") as progress:
        for i in range(start, len(CASES)):
            progress.write(f"{i}\n")
            progress.flush()
            results.write(json.dumps(run_case(CASES[i], cli.main)) + "\n")
            results.flush()


# --------------------------------------------------------------------------------------------- the parent
def _last_started(folder: Path) -> int | None:
    try:
        lines = (folder / "progress").read_text().split()
    except FileNotFoundError:
        return None
    return int(lines[-1]) if lines else None


def run_all(folder: str | Path, budget_s: float = TOTAL_BUDGET_S) -> dict[str, dict]:
    """Run every case (children replaced after a crash or hang); ``{case id: result}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # one intra-op thread: tiny models, and OpenMP threads spinning on a shared CPU are ~10x slower
    env = {k: v for k, v in os.environ.items() if k != "EDGEC_DEBUG"} | {"OMP_NUM_THREADS": "1"}
    deadline, start, lost = time.monotonic() + budget_s, 0, {}
    while start < len(CASES) and time.monotonic() < deadline:
        with open(folder / f"child-{start}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(folder), str(start)], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
        seen, since = None, time.monotonic()
        while proc.poll() is None:
            time.sleep(0.1)
            now, current = time.monotonic(), _last_started(folder)
            if current != seen:
                seen, since = current, now
            if (current is not None and now - since > CASE_TIMEOUT_S + 20) or now > deadline:
                proc.kill()
                proc.wait()
        current = _last_started(folder)
        if proc.returncode == 0:
            break
        if current is None or current < start:  # died while generating
            raise RuntimeError(f"the fuzz child failed before any case:\n{(folder / f'child-{start}.log').read_text()[-3000:]}")
        done = {json.loads(line)["id"] for line in (folder / "results.jsonl").read_text().splitlines()}
        if CASES[current].id not in done:
            lost[CASES[current].id] = {"id": CASES[current].id, "code": f"child died (returncode {proc.returncode})"
                                       if time.monotonic() <= deadline else "not finished within the budget"}
        start = current + 1
    results = {}
    path = folder / "results.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        results[r["id"]] = r
    results.update(lost)
    return results


def problem(c: Case, r: dict | None) -> str | None:
    """Why the outcome breaks the promise, or None."""
    if r is None:
        return "not run"
    code, problems = r["code"], []
    last = (r.get("stderr") or "").strip().splitlines()[-1:] or [""]
    if code not in c.expect:
        problems.append(f"exit {code} (expected {' or '.join(map(str, sorted(c.expect)))}): {last[0][:300]}")
    text = r.get("stdout", "") + r.get("stderr", "")
    if "Traceback" in text + r.get("fd2", ""):
        problems.append("a traceback was printed")
    bad = _CONTROL.search(text)
    if bad:
        problems.append(f"raw control character {bad.group()!r} on the terminal")
    if "--json" in c.argv and isinstance(code, int):
        problems.append(_json_problem(r))
    return "; ".join(p for p in problems if p) or None


def _strict_constant(name):
    raise ValueError(f"{name} is not JSON")


def _json_problem(r: dict) -> str | None:
    """``--json``: stdout is one strict JSON document (no NaN/Infinity); an error is the edgec.error/1 object."""
    try:
        doc = json.loads(r["stdout"], parse_constant=_strict_constant)
    except ValueError as exc:
        return f"--json printed invalid JSON ({exc})"
    if r["code"] != 0 and (doc.get("schema") != "edgec.error/1" or doc.get("exit_code") != r["code"]):
        return f"--json error object is not edgec.error/1 with exit_code {r['code']}: {r['stdout'][:200]}"
    return None


def table(results: dict) -> str:
    rows, lines = Counter(), []
    for c in CASES:
        r = results.get(c.id)
        if r is None or "skipped" in r:
            outcome = "skipped"
        else:
            why = problem(c, r)
            outcome = f"exit {r['code']}" if isinstance(r["code"], int) else "crash/timeout"
            outcome += " FAIL" if why else ""
            if why:
                lines.append(f"  {c.id}: {why}")
        rows[(c.kind, outcome)] += 1
    kinds = sorted({k for k, _ in rows})
    outcomes = sorted({o for _, o in rows})
    head = f"{'kind':8}" + "".join(f"{o:>16}" for o in outcomes) + f"{'total':>8}"
    body = [f"{k:8}" + "".join(f"{rows[(k, o)]:>16}" for o in outcomes) + f"{sum(rows[(k, o)] for o in outcomes):>8}"
            for k in kinds]
    return "\n".join([head, *body, f"{len(CASES)} cases", *(["failures:"] + lines if lines else [])])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:2] == ["--table"]:  # optional: a new folder to keep the inputs and results.jsonl in
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.setdefault("EDGEC_CACHE", os.path.join(tmp, "cache"))
            print(table(run_all(sys.argv[2] if len(sys.argv) > 2 else Path(tmp) / "fuzz")))
    else:
        sys.exit(__doc__)
