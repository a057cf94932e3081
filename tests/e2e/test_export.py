"""Verified export: parity on every zoo model at two shapes, determinism, metadata, scaffold refusal."""
import json

import onnx
import pytest
import torch
from conftest import run_cli

from edgec import models
from edgec.core.errors import EdgecError
from edgec.core.graph import Scaffold
from edgec.models.checkpoint import new_model
from edgec.onnx.export import PROVENANCE_KEY, export, ort_session


@pytest.mark.parametrize("arch", sorted(models.ZOO))
def test_export_parity_two_shapes(arch):
    model = new_model(arch, seed=0)
    data, record = export(model)
    parity = record["checks"]["ort_parity"]
    assert parity["passed"]
    for key in ("traced_shape", "alt_shape"):
        assert parity["parity"][key]["rel_error"] < 1e-4
    assert parity["parity"]["traced_shape"]["shape"] != parity["parity"]["alt_shape"]["shape"]
    # and independently of the exporter's own check: run a third shape (batch 1) through ORT
    session = ort_session(data)
    inputs = model.spec.sample(seed=7, batch=1)
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})
    for g, ref in zip(got, model.run(inputs)):
        torch.testing.assert_close(torch.from_numpy(g), ref, rtol=1e-4, atol=1e-4)


def test_metadata_is_clean_and_carries_provenance():
    model = new_model("conformer", seed=0)
    data, _ = export(model)
    proto = onnx.load_from_string(data)
    assert proto.producer_name == "edgec"
    keys = [p.key for p in proto.metadata_props]
    assert keys == [PROVENANCE_KEY]
    prov = json.loads(proto.metadata_props[0].value)
    assert prov["arch"] == "conformer" and prov["checkpoint_digest"] == model.digest()
    assert [r["pass"] for r in prov["passes"]] == ["zoo.create", "export.onnx"]
    assert all(len(n.metadata_props) == 0 for n in proto.graph.node)
    text = data.decode("latin-1")
    assert "/work/" not in text and "site-packages" not in text and "/tmp" not in text


def test_export_twice_is_byte_identical_across_processes(tmp_path, conformer_ckpt):
    run_cli("export", conformer_ckpt, "-o", tmp_path / "a.onnx", check=0)
    run_cli("export", conformer_ckpt, "-o", tmp_path / "b.onnx", check=0)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


class _Demo(Scaffold):
    kind, folded_by = "demo", "fold.demo"

    def forward(self, x):
        return x


def test_export_refuses_unfolded_scaffold(tmp_path):
    model = new_model("resnet", {"base_width": 8}, seed=0)
    model.gm.add_submodule("demo", _Demo())
    with pytest.raises(EdgecError, match="unfolded training scaffold.*demo at demo.*edgec fold"):
        export(model)
