"""Toolchain cost at scale, asserted by behaviour (no timing): loading does not run weight initialisers, a
checkpoint is hashed once per command, checks run two seeds at two small shapes, derived weights are computed
once per check, passes copy a model at most once, saving does not copy weights but writes the same bytes."""
import torch
from torch import nn

from edgec.app import api
from edgec.core import graph
from edgec.core.fileio import serialize
from edgec.core.graph import Model, derived_weights_cached
from edgec.core.options import FoldOptions
from edgec.core.pass_manager import PassManager
from edgec.core.spec import CHECK_SIZE, Dim
from edgec.models import checkpoint
from edgec.models.checkpoint import check_finite, load_checkpoint, new_model, save_checkpoint
from edgec.passes.bnfold import FoldBatchNorm
from edgec.passes.sttn import FoldSTTN, STTNScaffold


def _ternary_conformer():
    """A small conformer with an STTN scaffold on its Linear/Conv layers (fold.sttn has work to do)."""
    model = new_model("conformer", seed=0)
    return PassManager([STTNScaffold()])(model)[0]


def test_load_skips_initialisers_and_keeps_the_weights(tmp_path, monkeypatch):
    model = new_model("conformer", seed=0)
    path = tmp_path / "m.pt"
    digest = save_checkpoint(model, path)
    calls = []
    real = torch.nn.init.kaiming_uniform_
    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    loaded = load_checkpoint(path)
    assert calls == [], "loading ran the weight initialiser on weights the file overwrites"
    assert torch.nn.init.kaiming_uniform_ is not real and torch.nn.init.kaiming_uniform_ is not checkpoint._keep
    assert loaded.digest() == digest
    ref, got = model.gm.state_dict(), loaded.gm.state_dict()
    assert list(ref) == list(got) and all(torch.equal(ref[k], got[k]) for k in ref)
    x = model.spec.sample(seed=3)
    assert torch.equal(model.run(x)[0], loaded.run(x)[0])  # non-persistent buffers (tables) still computed


def test_fold_hashes_each_state_once_and_checks_at_small_shapes(tmp_path, monkeypatch):
    scaffolded = _ternary_conformer()
    src = tmp_path / "t.pt"
    save_checkpoint(scaffolded, src)
    hashed, shapes = [], []
    real_digest, real_run = graph.digest_of, Model.run
    monkeypatch.setattr(graph, "digest_of", lambda *a: hashed.append(1) or real_digest(*a))
    monkeypatch.setattr(checkpoint, "digest_of", graph.digest_of)
    monkeypatch.setattr(Model, "run", lambda self, x: shapes.append([tuple(t.shape) for t in x]) or real_run(self, x))
    res = api.fold(src, tmp_path / "f.pt", FoldOptions())
    modified = [p for p in res.passes if p["modified"]]
    assert [p["pass"] for p in modified] == ["fold.sttn", "fold.batchnorm"]
    # one hash to verify the file on load, one per model state a fold produced; none for summaries or saving
    assert len(hashed) == 1 + len(modified)
    # each fold checks two seeds x two shapes on both graphs, at the small check shapes
    small = [(2, CHECK_SIZE, 40), (3, CHECK_SIZE // 2 + 1, 40)]
    assert len(shapes) == 8 * len(modified) and {s[0] for s in shapes} == set(small)
    assert all(p["checks"]["equivalence"]["passed"] for p in modified)
    # the same input gives the same bytes
    api.fold(src, tmp_path / "g.pt", FoldOptions())
    assert (tmp_path / "f.pt").read_bytes() == (tmp_path / "g.pt").read_bytes()


def test_check_sizes():
    assert (Dim("t", 200, 137, 16, 2048).check_size(), Dim("t", 200, 137, 16, 2048).check_size(True)) == (32, 17)
    assert (Dim("b", 2, 3).check_size(), Dim("b", 2, 3).check_size(True)) == (2, 3)  # short axes unchanged
    assert (Dim("h", 32, 35).check_size(), Dim("h", 32, 35).check_size(True)) == (32, 35)
    assert (Dim("t", 100, 50, 40, 60).check_size(), Dim("t", 100, 50, 40, 60).check_size(True)) == (40, 41)


def test_derived_weights_computed_once_per_check_with_the_same_result():
    model = _ternary_conformer()
    layers = [m for m in model.gm.modules() if hasattr(type(m), "weight_hat") and isinstance(m, graph.Leaf)]
    assert layers
    x = model.spec.sample(seed=1, check=True)
    plain = model.run(x)
    calls = []
    cls = type(layers[0])
    real = cls.weight_hat
    cls.weight_hat = lambda self: calls.append(1) or real(self)
    try:
        with derived_weights_cached(model.gm):
            cached = [model.run(model.spec.sample(seed=s, check=True)) for s in (1, 2)]
    finally:
        cls.weight_hat = real
    assert len(calls) == sum(isinstance(m, cls) for m in layers)  # once per layer, not once per forward
    assert torch.equal(plain[0], cached[0][0])
    assert not any("weight_hat" in m.__dict__ for m in layers)  # the cache is gone after the block


def test_passes_copy_the_model_once_and_leave_it_unchanged(monkeypatch):
    model = _ternary_conformer()
    before = model.digest()
    deep = []
    real = Model.clone
    monkeypatch.setattr(Model, "clone", lambda self, share_weights=False: (
        deep.append(1) if not share_weights else None) or real(self, share_weights))
    folded, records = PassManager([FoldSTTN(), FoldBatchNorm()])(model)
    assert len(deep) == 1 and model.digest() == before and folded.digest() != before
    assert all(r["checks"]["equivalence"]["passed"] for r in records)
    deep.clear()
    PassManager([FoldSTTN(), FoldBatchNorm()])(model, owned=True)
    assert deep == []


def test_saved_state_shares_whole_tensors_and_writes_the_same_bytes():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight  # one tensor, two names
            self.register_buffer("view", torch.arange(10.0)[2:6])  # a view into a larger storage

        def forward(self, x):
            return self.b(self.a(x)) + self.view

    gm = graph.trace(Tied())
    model = Model(gm, "t", {}, None)
    saved = model.state_to_save()
    assert saved["a.weight"].data_ptr() == gm.a.weight.data_ptr()  # shared, not copied
    assert saved["b.weight"].data_ptr() != gm.a.weight.data_ptr()  # the second name is a copy, as before
    assert serialize(saved) == serialize(model.state_dict())


def test_check_finite_fast_path_still_refuses_nan_and_inf():
    import pytest

    from edgec.core.errors import EdgecError

    check_finite({"w": torch.full((3,), 3e38)}, "f")  # finite values whose sum overflows: accepted
    for bad in (float("nan"), float("inf")):
        with pytest.raises(EdgecError, match="NaN|Inf"):
            check_finite({"w": torch.tensor([1.0, bad])}, "f")


def test_appended_metadata_is_the_same_model_as_a_reserialization():
    """Provenance and the model card are appended to the serialized model instead of parsing and serializing a
    large model again: protobuf reads the concatenation as the model with one more metadata entry."""
    import onnx

    from edgec.onnx.export import append_metadata

    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    proto = onnx.helper.make_model(graph, producer_name="edgec")
    data = proto.SerializeToString(deterministic=True)
    appended = append_metadata(append_metadata(data, "a", "1"), "b", "{\"x\": 2}")
    for key, value in (("a", "1"), ("b", "{\"x\": 2}")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    assert appended == proto.SerializeToString(deterministic=True)
    parsed = onnx.load_model_from_string(appended)
    assert [(e.key, e.value) for e in parsed.metadata_props] == [("a", "1"), ("b", "{\"x\": 2}")]
    onnx.checker.check_model(appended)
