"""Integrity of what edgec reads back: checkpoint structure (schema), digests over weights *and* provenance,
ONNX files and their provenance metadata, and terminal escaping of strings from files. Every malformed case is
exit 2 with one line naming the field; never exit 3, never a traceback. In-process CLI calls, one tiny model."""
import copy
import json
import re
import sys

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgec.app.cli import main
from edgec.core.errors import EdgecError
from edgec.core.pass_manager import PASSES, get_pass, replay
from edgec.core.schema import MAX_HRF_EXPAND, PASS_PARAMS, check_json
from edgec.models.checkpoint import FORMAT, LEGACY_FORMAT, load_checkpoint, new_model, save_checkpoint, seal


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "tiny.pt"
    save_checkpoint(new_model("resnet", {"base_width": 4}, seed=0), path)
    return path


@pytest.fixture(scope="module")
def container(ckpt):
    return torch.load(ckpt, weights_only=True)


def cli(capsys, monkeypatch, *args):
    """``edgec ARGS`` in process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edgec", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def assert_exit2(result, *fragments):
    code, _, err = result
    assert code == 2, err
    assert "Traceback" not in err and "internal error" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]  # plain progress lines may come first (not a terminal)
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


def write(tmp_path, obj, name="m.pt", sealed=True):
    """Save ``obj``; ``sealed``: with both digests recomputed, so that it verifies."""
    path = tmp_path / name
    torch.save(seal(obj) if sealed else obj, path)
    return path


def _doubling(levels):
    a = [0]
    for _ in range(levels):
        a = [a, a]
    return a


def _set(*keys_and_value):
    """A mutation that sets ``obj[k1][k2]... = value``."""
    *keys, value = keys_and_value

    def mutate(obj):
        target = obj
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value() if callable(value) else value
    return mutate


def _record(name, params, version=1):
    return _set("passes", [{"pass": name, "version": version, "params": params}])


# (mutation, fragments the error line must contain). The digests are left stale: the schema is checked before the
# integrity, so each error must name the field, not the digest.
STRUCTURE = {
    "arch int": (_set("model", "arch", 3), ["model.arch", "valid string", "int"]),
    "arch None": (_set("model", "arch", None), ["model.arch", "NoneType"]),
    "config str": (_set("model", "config", "x"), ["model.config", "dictionary"]),
    "passes int": (_set("passes", 3), ["passes", "valid list"]),
    "passes str": (_set("passes", "fold.hrf"), ["passes", "valid list"]),
    "passes [None]": (_set("passes", [None]), ["passes[0]", "NoneType"]),
    "params list": (_record("fold.batchnorm", [1]), ["passes[0].params", "dictionary"]),
    "params unknown key": (_record("fold.batchnorm", {"code": 1}), ["passes[0].params.code", "unknown key"]),
    "hrf unknown key": (_record("scaffold.hrf", {"expand": 2, "K": 1}), ["passes[0].params.K", "unknown key"]),
    "version str": (_record("fold.batchnorm", {}, version="1"), ["passes[0].version", "integer"]),
    "unknown pass": (_record("evil.pass", {}), ["passes[0].pass", "unknown pass 'evil.pass'", "fold.hrf"]),
    "huge hrf expansion": (_record("scaffold.hrf", {"expand": 100_000}), ["passes[0].params.expand",
                                                                          str(MAX_HRF_EXPAND)]),
    "prune keep unsorted": (_record("prune.channels", {"keep": {"g": [3, 1]}}), ["passes[0].params.keep",
                                                                                  "sorted"]),
    "provenance dict": (_set("provenance", {"a": 1}), ["provenance", "valid list"]),
    "provenance [1]": (_set("provenance", [1]), ["provenance[0]", "int"]),
    "provenance summary int": (_set("provenance", 0, "summary", 5), ["provenance[0].summary", "string"]),
    "provenance version str": (_set("provenance", 0, "version", "1"), ["provenance[0].version", "integer"]),
    "provenance check str": (_set("provenance", 0, "checks", {"eq": {"rel_error": "0", "tolerance": 1}}),
                             ["provenance[0].checks.eq.rel_error", "number"]),
    "provenance tensor": (_set("provenance", 0, "x", lambda: torch.zeros(2)), ["provenance[0].x", "Tensor"]),
    "provenance int key": (_set("provenance", 0, "x", {1: 2}), ["provenance[0].x", "keys must be strings"]),
    "provenance NaN": (_set("provenance", 0, "x", [float("nan")]), ["provenance[0].x[0]", "nan is not a JSON number"]),
    "provenance deep": (_set("provenance", 0, "x", lambda: json.loads("[" * 40 + "]" * 40)), ["nested more than"]),
    "provenance bomb": (_set("provenance", 0, "x", lambda: _doubling(24)), ["provenance[0].x", "entries"]),
    "provenance text bomb": (_set("provenance", 0, "x", lambda: ["a" * 100_000] * 200), ["characters"]),
    "state_dict list": (_set("state_dict", []), ["state_dict", "dictionary"]),
    "state_dict None": (_set("state_dict", None), ["state_dict", "NoneType"]),
    "spec absurd dims": (_set("model", "spec", "inputs", 0, "dims", 1, 10**6), ["model.spec.inputs[0].dims"]),
    "unknown top-level key": (_set("code", "print(1)"), ["code", "unknown key"]),
}


@pytest.mark.parametrize("case", list(STRUCTURE))
def test_malformed_checkpoint_structure_is_exit_2_naming_the_field(case, container, tmp_path, capsys, monkeypatch):
    mutate, fragments = STRUCTURE[case]
    obj = copy.deepcopy(container)
    mutate(obj)
    path = write(tmp_path, obj, sealed=False)
    assert_exit2(cli(capsys, monkeypatch, "inspect", path), *fragments)


TENSORS = {
    "sparse": (lambda t: t.to_sparse(), "sparse_coo tensor"),
    "meta": (lambda t: torch.empty(t.shape, device="meta"), "meta tensor"),
    "complex": (lambda t: t.to(torch.complex64), "complex64"),
    # 4 bytes of data claiming 2**40 elements: any copy (the digest makes one) would need 4 TiB
    "stride-0 view": (lambda t: torch.zeros(1).as_strided((1 << 20, 1 << 20), (0, 0)), "only 4 bytes of data"),
}


@pytest.mark.parametrize("kind", list(TENSORS))
def test_sparse_meta_and_exotic_tensors_are_refused(kind, container, tmp_path, capsys, monkeypatch):
    obj = dict(container, state_dict=dict(container["state_dict"]))
    make, fragment = TENSORS[kind]
    obj["state_dict"]["classifier.bias"] = make(obj["state_dict"]["classifier.bias"])
    path = write(tmp_path, obj, sealed=False)
    for args in ([], ["--no-verify"]):  # checked before the digests, so the same error either way
        assert_exit2(cli(capsys, monkeypatch, "inspect", path, *args), "classifier.bias", fragment)


@pytest.mark.parametrize("sealed", [True, False])
def test_a_zoo_config_size_below_one_is_refused_on_load(sealed, container, tmp_path, capsys, monkeypatch):
    obj = copy.deepcopy(container)
    obj["model"]["config"]["image_size"] = 0
    path = write(tmp_path, obj, sealed=sealed)
    assert_exit2(cli(capsys, monkeypatch, "inspect", path, *([] if sealed else ["--no-verify"])),
                 "model.config", "'image_size' is a size")


# --- integrity --------------------------------------------------------------------------------------------------

def _weights_changed(obj):
    obj["state_dict"]["classifier.bias"] = obj["state_dict"]["classifier.bias"] + 1


INTEGRITY = {
    "digest removed": lambda o: o.pop("digest"),
    "digest empty": _set("digest", ""),
    "digest None": _set("digest", None),
    "digest malformed": _set("digest", "x" * 64),
    "digest an int": _set("digest", 7),
    "container digest removed": lambda o: o.pop("container_digest"),
    "weights changed": _weights_changed,
    "weights changed, digest removed": lambda o: (_weights_changed(o), o.pop("digest")),
    "weights changed, digest None": lambda o: (_weights_changed(o), o.__setitem__("digest", None)),
    "provenance edited": _set("provenance", 0, "params", "seed", 1),
    "capture edited": _set("model", "capture", "method", "fx2"),
}


@pytest.mark.parametrize("case", list(INTEGRITY))
def test_missing_malformed_or_stale_digest_is_an_integrity_error(case, container, tmp_path, capsys, monkeypatch):
    obj = copy.deepcopy(container)
    INTEGRITY[case](obj)
    path = write(tmp_path, obj, sealed=False)
    line = assert_exit2(cli(capsys, monkeypatch, "inspect", path), "integrity", "--no-verify")
    assert re.search(r"'(container_)?digest'|do not match", line)
    code, out, err = cli(capsys, monkeypatch, "inspect", path, "--no-verify", "--json")
    assert code == 0, err
    assert json.loads(out)["arch"] == "resnet"


def test_a_flipped_byte_in_the_pickled_provenance_is_caught(ckpt, tmp_path, capsys, monkeypatch):
    data = bytearray(ckpt.read_bytes())
    at = data.find(b"zoo.create")  # the provenance record's name, stored inside the zip's data.pkl
    assert at > 0
    data[at] = ord("Z")
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    assert_exit2(cli(capsys, monkeypatch, "inspect", path), "integrity", "provenance")


def test_weights_change_is_caught_and_no_verify_loads_the_changed_weights(container, tmp_path):
    obj = copy.deepcopy(container)
    _weights_changed(obj)
    path = write(tmp_path, obj, sealed=False)
    with pytest.raises(EdgecError, match="weights, config or pass log do not match"):
        load_checkpoint(path)
    model = load_checkpoint(path, verify=False)
    assert torch.equal(model.gm.state_dict()["classifier.bias"], obj["state_dict"]["classifier.bias"])


def test_legacy_format_loads_only_with_no_verify(container, tmp_path, capsys, monkeypatch):
    obj = copy.deepcopy(container)
    obj["format"] = LEGACY_FORMAT
    obj.pop("container_digest")
    path = write(tmp_path, obj, sealed=False)
    assert_exit2(cli(capsys, monkeypatch, "inspect", path), LEGACY_FORMAT, "--no-verify")
    assert cli(capsys, monkeypatch, "inspect", path, "--no-verify")[0] == 0


def test_saved_container_carries_both_digests_and_round_trips(container, ckpt):
    assert container["format"] == FORMAT
    assert re.fullmatch(r"[0-9a-f]{64}", container["digest"]) and re.fullmatch(r"[0-9a-f]{64}",
                                                                                container["container_digest"])
    assert container["digest"] != container["container_digest"]
    assert seal(copy.deepcopy(container))["container_digest"] == container["container_digest"]
    assert load_checkpoint(ckpt).digest() == container["digest"]  # the model's identity is unchanged


def test_save_refuses_a_provenance_it_could_not_read_back(tmp_path):
    model = new_model("resnet", {"base_width": 4}, seed=0)
    model.provenance.append({"pass": "x", "version": 1, "params": {"s": {1, 2}}})
    with pytest.raises(EdgecError, match=r"refusing to write m.pt: provenance\[1\].params.s: .*set"):
        save_checkpoint(model, tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_random_bytes_are_not_called_a_code_pickle(tmp_path, capsys, monkeypatch):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(range(256)) * 8)
    line = assert_exit2(cli(capsys, monkeypatch, "inspect", path), "noise.pt", "not a checkpoint")
    assert "run code" not in line


# --- replay and the schema of pass parameters -------------------------------------------------------------------

def test_every_pass_has_a_parameter_schema_matching_its_constructor():
    import inspect

    assert set(PASS_PARAMS) == set(PASSES)
    for name, schema in PASS_PARAMS.items():
        sig = inspect.signature(get_pass(name).__init__)
        accepted = {p for p, v in sig.parameters.items() if p != "self" and v.kind is not v.VAR_KEYWORD}
        assert set(schema.model_fields) == accepted, name


def test_replay_bounds_the_elements_a_record_may_allocate():
    model = new_model("convtransformer", {"num_layers": 1, "d_model": 16, "ffn_dim": 32, "num_heads": 2}, seed=0)
    records = [{"pass": "scaffold.hrf", "version": 1, "params": {"expand": MAX_HRF_EXPAND}}]
    held = sum(t.numel() for t in model.gm.state_dict().values())
    with pytest.raises(EdgecError, match=r"passes\[0\] \(scaffold.hrf\) grows the model to [\d,]+ elements"):
        replay(model, records, max_elements=held + 1)
    with pytest.raises(EdgecError, match=r"expand: Input should be less than or equal to 16"):
        replay(model, [{"pass": "scaffold.hrf", "version": 1, "params": {"expand": 10**6}}])
    with pytest.raises(EdgecError, match=r"needs pass fold.hrf v9"):
        replay(model, [{"pass": "fold.hrf", "version": 9, "params": {}}])


def test_check_json_limits():
    check_json({"a": [1, 2.5, None, True, "x"]}, "t")
    for bad, fragment in [([10**400], "bits"), ({"k": object()}, "object"), (_doubling(60), "entries")]:
        with pytest.raises(EdgecError, match=fragment):
            check_json(bad, "t", max_items=10_000, max_depth=100)


# --- ONNX files ---------------------------------------------------------------------------------------------------

PROVENANCE = {"format": "edgec.provenance/1", "arch": "tiny", "config": {}, "checkpoint_digest": "0" * 64,
              "spec": {"inputs": [{"name": "x", "shape": ["batch", 3], "dtype": "float32"}], "outputs": ["y"],
                       "task": "classification"},
              "passes": [{"pass": "zoo.create", "version": 1, "params": {}, "summary": "made"}]}


def tiny_onnx(provenance=PROVENANCE, *, raw=None, dims=(3,), elem=TensorProto.FLOAT, outputs=True, meta=None):
    """x (batch, 3) + w → y, with ``edgec.provenance`` metadata (``meta``: the raw metadata text instead)."""
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims), raw_data=b"\0" * 12 if raw is None else raw)
    x = helper.make_tensor_value_info("x", elem, ["batch", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [x], [y] if outputs else [], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key = "edgec.provenance"
    entry.value = meta if meta is not None else json.dumps(provenance)
    return model.SerializeToString()


def _prov(**changes):
    return {**PROVENANCE, **changes}


ONNX_CASES = {
    "invalid JSON": (dict(meta="{not json"), ["edgec.provenance", "invalid JSON"]),
    "deep nesting": (dict(meta="[" * 5000 + "]" * 5000), ["edgec.provenance", "nested"]),
    "5000-digit number": (dict(meta='{"format": "edgec.provenance/1", "x": ' + "9" * 5000 + "}"),
                          ["edgec.provenance", "invalid JSON"]),
    "arch an int": (dict(provenance=_prov(arch=5)), ["arch", "string"]),
    "passes a dict": (dict(provenance=_prov(passes={"a": 1})), ["passes", "list"]),
    "record summary a list": (dict(provenance=_prov(passes=[{"pass": "p", "version": 1, "summary": []}])),
                              ["passes[0].summary"]),
    "spec shape absurd": (dict(provenance=_prov(spec={"inputs": [{"name": "x", "shape": [-4]}]})),
                          ["spec.inputs[0].shape[0]"]),
    "n_mels huge": (dict(provenance=_prov(config={"n_mels": 10**9})), ["config", "n_mels"]),
    "unknown format": (dict(provenance=_prov(format="edgec.provenance/9")), ["format"]),
    "no outputs": (dict(outputs=False), ["no outputs"]),
    "unknown element type": (dict(elem=999), ["input 'x'", "unknown element type 999"]),
    "short raw data": (dict(raw=b"\0" * 5), ["initializer 'w'", "need 12 bytes", "holds 5"]),
    "absurd dims": (dict(dims=(1 << 40, 1 << 20)), ["initializer 'w'", "holds 12"]),
    "negative dims": (dict(dims=(-3,)), ["initializer 'w'", "invalid dims"]),
}


@pytest.mark.parametrize("case", list(ONNX_CASES))
def test_malformed_onnx_is_exit_2_for_inspect_and_eval(case, tmp_path, capsys, monkeypatch):
    kwargs, fragments = ONNX_CASES[case]
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_onnx(**kwargs))
    assert_exit2(cli(capsys, monkeypatch, "inspect", path), "m.onnx", *fragments)
    # eval reads the model before the data, so a missing data file is never reached
    assert_exit2(cli(capsys, monkeypatch, "eval", path, "--data", tmp_path / "none.npz"), "m.onnx", *fragments)


def test_invalid_utf8_metadata_is_exit_2(tmp_path, capsys, monkeypatch):
    data = tiny_onnx(meta="Q" * 16)
    path = tmp_path / "u.onnx"
    path.write_bytes(data.replace(b"Q" * 16, b"\xff\xfe" * 8))
    assert_exit2(cli(capsys, monkeypatch, "inspect", path), "u.onnx")


def test_a_wellformed_onnx_inspects(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ok.onnx"
    path.write_bytes(tiny_onnx())
    code, out, err = cli(capsys, monkeypatch, "inspect", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["params"] == 3 and info["arch"] == "tiny" and info["provenance"][0]["summary"] == "made"
    code, out, err = cli(capsys, monkeypatch, "inspect", path)
    assert code == 0 and "1. zoo.create v1 — made" in out, out + err


# --- strings from files on the terminal ---------------------------------------------------------------------------

HOSTILE = "\x1b[2J\x1b]0;owned\x07[bold red]markup[/] \u202eevil"


def test_provenance_strings_are_escaped_for_the_terminal(container, tmp_path, capsys, monkeypatch):
    obj = copy.deepcopy(container)
    obj["provenance"][0]["summary"] = HOSTILE
    obj["provenance"][0]["pass"] = "[link=http://x]zoo[/link]\x1b[31m"
    path = write(tmp_path, obj)
    code, out, err = cli(capsys, monkeypatch, "inspect", path)
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "[bold red]markup[/]" in out and "[link=http://x]zoo[/link]" in out  # shown as text, not applied
    onnx_path = tmp_path / "h.onnx"
    onnx_path.write_bytes(tiny_onnx(_prov(arch="[red]a[/]\x1b[2J", passes=[{"pass": "p", "version": 1,
                                                                           "summary": HOSTILE}])))
    code, out, err = cli(capsys, monkeypatch, "inspect", onnx_path)
    assert code == 0, err
    assert "\x1b" not in out and "[red]a[/]" in out and "[bold red]markup[/]" in out


def test_error_lines_are_escaped(tmp_path, capsys, monkeypatch, container):
    obj = copy.deepcopy(container)
    obj["passes"] = [{"pass": "\x1b[2Jx", "version": 1, "params": {}}]
    line = assert_exit2(cli(capsys, monkeypatch, "inspect", write(tmp_path, obj)), "unknown pass")
    assert "\x1b" not in line


def test_onnx_provenance_round_trip_through_the_reader():
    from edgec.onnx.export import read_provenance

    proto = onnx.load_model_from_string(tiny_onnx())
    assert read_provenance(proto) == PROVENANCE
    assert read_provenance(onnx.load_model_from_string(tiny_onnx(meta=json.dumps(PROVENANCE)))) == PROVENANCE
