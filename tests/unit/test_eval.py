"""`edgec eval` protocol (edgec.evaluation) and the onnxruntime latency protocol (edgec.onnx.session)."""
import json
import re

import numpy as np
import pytest
import torch

from edgec.core.errors import EdgecError

SMALL_RESNET = {"base_width": 8, "blocks_per_stage": [1, 1, 1, 1]}
FAST = {"warmup": 2, "repeats": 5, "min_seconds": 0.0}


def _well_separated(model, n, seed, margin=1e-2):
    """Random inputs whose top-2 logits differ by more than `margin` (no argmax can flip between runtimes)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, 1, 8, 8, generator=g)
    logits = model.run((x,))[0]
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > margin
    assert int(keep.sum()) >= n
    return x[keep][:n], logits[keep][:n]


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory):
    """A small ResNet as .pt and verified .onnx, and a tensor file whose targets make the metrics known:
    every even item's target is the model's own prediction, every odd item's the next class."""
    from edgec.models.checkpoint import new_model, save_checkpoint
    from edgec.onnx.export import export

    d = tmp_path_factory.mktemp("eval")
    model = new_model("resnet", SMALL_RESNET, seed=0)
    save_checkpoint(model, d / "r.pt")
    data, _ = export(model)
    (d / "r.onnx").write_bytes(data)
    x, logits = _well_separated(model, 150, seed=0)
    pred = logits.argmax(1)
    y = pred.clone()
    y[1::2] = (y[1::2] + 1) % 10
    classes = [f"c{i}" for i in range(10)]
    torch.save({"inputs": x[:100], "targets": y[:100], "test_inputs": x[100:], "test_targets": y[100:],
                "classes": classes}, d / "data.pt")
    torch.save({"inputs": x, "targets": y, "classes": classes}, d / "noval.pt")
    return {"dir": d, "model": model, "x_test": x[100:], "y_test": y[100:], "logits_test": logits[100:],
            "pred_test": pred[100:]}


@pytest.mark.filterwarnings("ignore:y_pred contains classes")
def test_metrics_on_a_known_model(resnet_files):
    from sklearn.metrics import balanced_accuracy_score, f1_score

    from edgec.evaluation import evaluate

    f = resnet_files
    r = evaluate(f["dir"] / "r.pt", f["dir"] / "data.pt", latency=False, return_predictions=True)
    y = f["y_test"].numpy()
    assert r["predictions"] == f["pred_test"].tolist()
    assert r["split"] == "test" and r["split_note"] is None and r["n"] == 50
    assert r["task"] == "classification" and r["classes"] == [f"c{i}" for i in range(10)]
    assert r["metrics"]["accuracy"] == 0.5  # half the targets are the model's own predictions
    assert r["metrics"]["uar"] == pytest.approx(balanced_accuracy_score(y, r["predictions"]), abs=1e-12)
    labels = sorted(set(y.tolist()) | set(r["predictions"]))
    assert r["metrics"]["macro_f1"] == pytest.approx(f1_score(y, r["predictions"], labels=labels, average="macro"),
                                                     abs=1e-12)
    ce = torch.nn.functional.cross_entropy(f["logits_test"].double(), f["y_test"]).item()
    assert r["metrics"]["loss"] == pytest.approx(ce, rel=1e-9)
    assert r["latency"] is None and "disabled" in r["latency_note"]
    assert r["kind"] == "checkpoint" and r["arch"] == "resnet" and r["predictions_by"] == "torch"
    assert r["params"] == f["model"].param_count()
    assert r["input"] == "r.pt" and r["file_bytes"] == (f["dir"] / "r.pt").stat().st_size
    assert r["input_shape"] == [1, 8, 8]


def test_checkpoint_and_its_onnx_give_the_same_metrics(resnet_files):
    from edgec.evaluation import evaluate

    f = resnet_files
    a = evaluate(f["dir"] / "r.pt", f["dir"] / "data.pt", return_predictions=True, **FAST)
    b = evaluate(f["dir"] / "r.onnx", f["dir"] / "data.pt", return_predictions=True, **FAST)
    assert a["predictions_by"] == "torch" and b["predictions_by"] == "onnxruntime"
    assert a["predictions"] == b["predictions"]
    assert a["metrics"].keys() == b["metrics"].keys() == {"accuracy", "uar", "macro_f1", "loss"}
    for k in a["metrics"]:
        assert abs(a["metrics"][k] - b["metrics"][k]) <= 1e-6, k
    assert b["kind"] == "onnx" and b["arch"] == "resnet"
    assert b["provenance_passes"] == ["zoo.create", "export.onnx"]
    assert a["checkpoint_digest"] == b["checkpoint_digest"]  # the .onnx names the checkpoint it came from
    assert 0 < b["params"] <= a["params"]  # initializers; the exporter folds BatchNorm away
    assert b["file_bytes"] == b["onnx_bytes"] == (f["dir"] / "r.onnx").stat().st_size
    assert 0 < a["onnx_bytes"] < b["file_bytes"]  # in-memory export without the provenance metadata
    for r in (a, b):
        lat = r["latency"]
        assert r["latency_note"] is None
        assert {"median_ms", "p10_ms", "p90_ms", "mean_ms", "repeats", "threads"} <= lat.keys()
        assert lat["median_ms"] > 0 and lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
        assert lat["repeats"] >= 5 and lat["threads"] == 1 and lat["batch"] == 1
        assert lat["input_shape"] == [1, 1, 8, 8]
        assert r["machine"]["threads"] == 1
        text = json.dumps(r)  # plain data, file names only
        assert str(f["dir"]) not in text


def test_latency_batch_and_threads(resnet_files):
    from edgec.evaluation import evaluate

    f = resnet_files
    r = evaluate(f["dir"] / "r.onnx", f["dir"] / "data.pt", threads=2, latency_batch=8, **FAST)
    assert r["latency"]["input_shape"] == [8, 1, 8, 8] and r["latency"]["threads"] == 2
    assert r["machine"]["threads"] == 2


def test_split_falls_back_to_val(resnet_files):
    from edgec.evaluation import evaluate

    f = resnet_files
    r = evaluate(f["dir"] / "r.onnx", f["dir"] / "noval.pt", latency=False, val_fraction=0.2)
    assert r["split"] == "val" and "no test split" in r["split_note"] and r["n"] == 30
    r = evaluate(f["dir"] / "r.onnx", f["dir"] / "noval.pt", split="train", latency=False)
    assert r["split"] == "train" and r["split_note"] is None and r["n"] == 120
    with pytest.raises(EdgecError, match="no 'test' split|no test split|neither"):
        evaluate(f["dir"] / "r.onnx", f["dir"] / "noval.pt", val_fraction=0.0, latency=False)


def test_regression_metrics(tmp_path):
    from edgec.evaluation import evaluate
    from edgec.models.checkpoint import new_model, save_checkpoint

    model = new_model("resnet", {**SMALL_RESNET, "num_classes": 1}, seed=1)
    save_checkpoint(model, tmp_path / "reg.pt")
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    out = model.run((x,))[0][:, 0].double()
    t = 2 * out + 1
    torch.save({"inputs": x, "targets": t.float(), "val_inputs": x[:20], "val_targets": t[:20].float()},
               tmp_path / "reg_data.pt")
    r = evaluate(tmp_path / "reg.pt", tmp_path / "reg_data.pt", latency=False)
    assert r["task"] == "regression" and r["split"] == "val" and r["classes"] is None
    p, tt = out[:20].numpy(), t[:20].float().double().numpy()
    ccc = 2 * np.cov(tt, p, bias=True)[0, 1] / (tt.var() + p.var() + (tt.mean() - p.mean()) ** 2)
    assert r["metrics"]["ccc"] == pytest.approx(ccc, abs=1e-6)
    assert r["metrics"]["mae"] == pytest.approx(np.abs(tt - p).mean(), rel=1e-5)


def test_scaffolded_model_has_metrics_but_no_latency(resnet_files):
    from edgec.core.graph import Scaffold, set_submodule
    from edgec.data import load_data
    from edgec.evaluation import evaluate_model
    from edgec.models.checkpoint import load_checkpoint

    class Wrap(Scaffold):
        kind, folded_by = "test", "fold.test"

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    f = resnet_files
    model = load_checkpoint(f["dir"] / "r.pt")
    set_submodule(model.gm, "classifier", Wrap(model.gm.classifier))
    bundle = load_data(str(f["dir"] / "data.pt"))
    r = evaluate_model(model, bundle)
    assert r["latency"] is None and r["onnx_bytes"] is None
    assert "scaffold" in r["latency_note"] and "edgec fold" in r["latency_note"]
    assert r["metrics"]["accuracy"] == 0.5


def test_two_input_model_gets_a_mask(tmp_path):
    from edgec.evaluation import evaluate
    from edgec.models.checkpoint import new_model, save_checkpoint

    cfg = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
           "num_labels": 3}
    save_checkpoint(new_model("bert", cfg, seed=0), tmp_path / "bert.pt")
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randint(0, 1000, (30, 16), generator=g),
                "targets": torch.randint(0, 3, (30,), generator=g)}, tmp_path / "tok.pt")
    r = evaluate(tmp_path / "bert.pt", tmp_path / "tok.pt", latency=False)
    assert r["n"] == 6 and set(r["metrics"]) == {"accuracy", "uar", "macro_f1", "loss"}
    torch.save({"inputs": torch.randn(30, 16), "targets": torch.randint(0, 3, (30,), generator=g)},
               tmp_path / "floats.pt")
    with pytest.raises(EdgecError, match="token ids"):
        evaluate(tmp_path / "bert.pt", tmp_path / "floats.pt", latency=False)


# --- bad inputs ----------------------------------------------------------------------------------

def test_missing_files(resnet_files, tmp_path):
    from edgec.evaluation import evaluate

    f = resnet_files
    for name in ("nope.pt", "nope.onnx"):
        with pytest.raises(EdgecError, match="no such file"):
            evaluate(tmp_path / name, f["dir"] / "data.pt")
    with pytest.raises(EdgecError, match="no such data"):
        evaluate(f["dir"] / "r.onnx", tmp_path / "missing.pt")
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(EdgecError, match="ONNX|onnxruntime"):
        evaluate(tmp_path / "junk.onnx", f["dir"] / "data.pt")


def test_data_shape_mismatch_is_a_clear_error(conformer_ckpt, resnet_files, tmp_path):
    from edgec.evaluation import evaluate

    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(10, 200, 80, generator=g), "targets": torch.arange(10) % 4},
               tmp_path / "mel80.pt")
    with pytest.raises(EdgecError) as info:
        evaluate(conformer_ckpt, tmp_path / "mel80.pt")
    msg = str(info.value)
    assert "(200, 80)" in msg and "features" in msg and "needs 40" in msg and "n_mels=40" in msg

    torch.save({"inputs": torch.randn(10, 3, 8, 8, generator=g), "targets": torch.arange(10)}, tmp_path / "rgb.pt")
    for name in ("r.pt", "r.onnx"):
        with pytest.raises(EdgecError, match=r"axis 1: data has 3, the model needs 1"):
            evaluate(resnet_files["dir"] / name, tmp_path / "rgb.pt")
    torch.save({"inputs": torch.randn(10, 8, 8, generator=g), "targets": torch.arange(10)}, tmp_path / "flat.pt")
    with pytest.raises(EdgecError, match="2 axes"):
        evaluate(resnet_files["dir"] / "r.pt", tmp_path / "flat.pt")


def test_fewer_outputs_than_classes_is_an_error(resnet_files, tmp_path):
    from edgec.evaluation import evaluate

    x = resnet_files["x_test"]
    torch.save({"inputs": x, "targets": torch.arange(len(x)) % 12}, tmp_path / "twelve.pt")
    with pytest.raises(EdgecError, match="outputs 10 class scores but the data has 12 classes"):
        evaluate(resnet_files["dir"] / "r.onnx", tmp_path / "twelve.pt", latency=False)


# --- latency protocol ----------------------------------------------------------------------------

def _tiny_onnx() -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 1000, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_measure_onnx(tmp_path):
    from edgec.onnx.session import measure_onnx

    data = _tiny_onnx()
    x = np.ones((4, 64), dtype=np.float32)
    r = measure_onnx(data, {"x": x}, threads=1, warmup=2, repeats=10, min_seconds=0.0)
    assert {"median_ms", "p10_ms", "p90_ms", "mean_ms", "repeats", "threads"} <= r.keys()
    assert r["median_ms"] > 0 and r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["repeats"] == 10
    assert r["threads"] == 1
    (tmp_path / "tiny.onnx").write_bytes(data)
    r = measure_onnx(tmp_path / "tiny.onnx", [torch.ones(1, 64)], repeats=3, min_seconds=0.01, max_repeats=100000)
    assert r["repeats"] >= 3
    r = measure_onnx(data, {"x": x}, repeats=3, min_seconds=10.0, max_repeats=20)
    assert r["repeats"] == 20  # max_repeats bounds min_seconds
    with pytest.raises(EdgecError, match="missing"):
        measure_onnx(data, {"input": x})
    with pytest.raises(EdgecError, match="no such file"):
        measure_onnx(tmp_path / "absent.onnx", {"x": x})
    with pytest.raises(EdgecError, match="onnxruntime"):
        measure_onnx(data, {"x": np.ones((4, 63), dtype=np.float32)})


def test_machine_key_and_sample_inputs():
    import onnxruntime

    from edgec.models.checkpoint import new_model
    from edgec.onnx.session import machine_id, machine_key, sample_inputs

    k = machine_key(3)
    assert k["runtime"] == "onnxruntime" and k["runtime_version"] == onnxruntime.__version__
    assert k["threads"] == 3 and k["cpu"] and k["cores"] >= 1 and k["usable_cores"] >= 1
    assert json.loads(json.dumps(k)) == k
    assert re.fullmatch(r"[0-9a-f]{12}", machine_id(k)) and machine_id(k) == machine_id(machine_key(3))
    assert machine_id(k) != machine_id(machine_key(1))
    spec = new_model("resnet", SMALL_RESNET).spec
    s = sample_inputs(spec, batch=4)
    assert list(s) == ["pixels"] and s["pixels"].shape == (4, 1, 8, 8) and s["pixels"].dtype == np.float32
    assert np.array_equal(s["pixels"], sample_inputs(spec, batch=4)["pixels"])  # deterministic
