"""The model card `export` writes (MODEL.card.md and the `edgec.card` ONNX metadata) and the gate arithmetic
behind it: contents, byte-identical output, the size fixed point, escaping; gate parsing and judging."""
import json
import re
from types import SimpleNamespace

import onnx
import pytest
from gate_helpers import CLASSES, make_project

from edgec.app import card as C
from edgec.app import gates as G
from edgec.app.api import export_model
from edgec.core.errors import EdgecError
from edgec.core.options import ExportOptions
from edgec.data.features import feature_params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    return folder, make_project(folder)


@pytest.fixture(scope="module")
def bare(project):
    """The verified export without a card (the exporter's own determinism is tested in test_export.py)."""
    from edgec.onnx.export import export

    return export(project[1])


@pytest.fixture(scope="module")
def exported(project, bare):
    """The same model exported twice with data (two names, two folders) and a passing metric gate; the
    exporter's bytes are reused so that only the card is built twice."""
    folder, model = project
    opts = ExportOptions(data=str(folder / "d.pt"), min_metric=["accuracy=0.99"], max_size_kb=500)
    (folder / "a").mkdir()
    (folder / "b").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("edgec.onnx.export.export", lambda *a, **k: (bare[0], dict(bare[1])))
        first = export_model(model, folder / "a" / "MODEL.onnx", opts)
        second = export_model(model, folder / "b" / "other.onnx", opts)
    return folder, model, first, second


def _json_block(md: str) -> dict:
    return json.loads(re.search(r"```json\n(.*)\n```", md, flags=re.S).group(1))


def test_card_is_written_beside_the_onnx_and_embedded_in_its_metadata(exported):
    folder, model, first, _ = exported
    onnx_path, md_path = folder / "a" / "MODEL.onnx", folder / "a" / "MODEL.card.md"
    assert first.card == str(md_path) and md_path.is_file()
    data = onnx_path.read_bytes()
    proto = onnx.load_model_from_string(data)
    assert [p.key for p in proto.metadata_props] == ["edgec.provenance", C.CARD_KEY]
    card = C.read_card(data)
    assert card == _json_block(md_path.read_text())  # the markdown carries exactly the metadata's JSON
    # the card states the final file's size, card included (the fixed point)
    assert card["size"]["file_bytes"] == len(data) == first.file_bytes
    assert card["format"] == "edgec.card/1" and card["task"] == "classification" and card["arch"] == "mlp.py:Mlp"
    assert card["inputs"] == [{"name": "x", "shape": ["batch", 8], "dtype": "float32"}]
    assert card["checkpoint_digest"] == model.digest() and card["params"] == model.param_count() == 8 * 16 + 16 + 51
    assert card["classes"] == CLASSES and card["classes_from"] == "data given at export"
    assert card["preprocessing"]["kind"] == "none"
    assert card["bits"] == {"32": {"layers": 2, "weights": 8 * 16 + 16 * 3}}


def test_card_metrics_passes_and_gates(exported):
    folder, model, first, _ = exported
    card = C.read_card((folder / "a" / "MODEL.onnx").read_bytes())
    (metrics,) = card["metrics"]
    assert metrics["source"] == "this file, at export" and metrics["split"] == "test" and metrics["n"] == 30
    assert metrics["metrics"]["accuracy"] == 1.0 and metrics["data"] == "d.pt"
    from edgec.data import load_data

    assert metrics["data_digest"] == load_data(str(folder / "d.pt")).digest
    assert [p["pass"] for p in card["passes"]] == ["import.module", "export.onnx"]
    assert card["passes"][1]["checks"]["ort_parity"]["passed"] is True
    assert card["passes"][1]["checks"]["ort_parity"]["rel_error"] < 1e-4
    assert card["gates"] == [
        {"gate": "min_metric", "metric": "accuracy", "limit": 0.99, "passed": True, "value": 1.0},
        {"gate": "max_size_kb", "metric": None, "limit": 500.0, "passed": True}]
    assert first.gates["passed"] and first.gates["measured"]["file_bytes"] == first.file_bytes
    assert card["latency"][0]["note"].startswith("not measured")


def test_card_and_onnx_are_byte_identical_for_the_same_inputs(exported):
    folder, *_ = exported
    a, b = folder / "a", folder / "b"
    assert (a / "MODEL.onnx").read_bytes() == (b / "other.onnx").read_bytes()
    assert (a / "MODEL.card.md").read_bytes() == (b / "other.card.md").read_bytes()
    text = (a / "MODEL.card.md").read_text()
    assert str(folder) not in text and "/tmp" not in text and "other" not in text  # no paths, no output name
    assert not re.search(r"\d{4}-\d\d-\d\d", text)  # no dates


def test_markdown_sections_and_escaping(exported):
    folder, *_ = exported
    md = (folder / "a" / "MODEL.card.md").read_text()
    for section in ("Inputs", "Preprocessing", "Class labels", "Metrics", "Latency", "Size", "Bit widths", "Passes",
                    "Gates", "Machine-readable"):
        assert f"\n## {section}\n" in md
    assert "1: no\\|maybe" in md  # a '|' in a label cannot break the table
    table_rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert table_rows and all(line.endswith(" |") for line in table_rows)


def test_the_size_gate_is_judged_on_the_final_bytes(project, bare):
    """A limit between the card-less and the final size fails: the card (and its size) count."""
    model = project[1]
    data, record = bare
    kib = (len(data) + 200) / 1024  # above the bare export, below the file with its card
    gates = G.parse(max_size_kb=kib)
    final, card, report = C.attach(data, C.base_card(model, record, G.Measured()), G.decide_size(gates, G.Measured()))
    assert len(final) > kib * 1024 and card["size"]["file_bytes"] == len(final)
    assert report["passed"] is False and card["gates"] == [
        {"gate": "max_size_kb", "metric": None, "limit": kib, "passed": False}]
    assert report["failed"][0].startswith("size ") and "over by" in report["failed"][0]


def test_audio_models_list_every_log_mel_parameter():
    spec = SimpleNamespace(extra={"features": "log-mel", "n_mels": 40})
    finetuned = {"pass": "finetune", "params": {"data_options": {"n_mels": 64, "frames": 120}}}
    model = SimpleNamespace(spec=spec, provenance=[finetuned], config={"n_mels": 40})
    assert C.preprocessing(model, None) == feature_params(16000, 64, 120, "utterance")
    pre = C.preprocessing(SimpleNamespace(spec=spec, provenance=[], config={"n_mels": 40}), None)
    assert pre["n_mels"] == 40 and pre["frames"] == 200 and pre["hop_length"] == 160 and pre["kind"] == "log-mel"


def test_card_path_and_recorded_history():
    assert C.card_path("out/MODEL.onnx").as_posix() == "out/MODEL.card.md"
    assert C.finite({"ccc": float("nan"), "m": [float("inf"), 0.5]}) == {"ccc": None, "m": [None, 0.5]}
    records = [{"pass": "zoo.create", "version": 1, "params": {}},
               {"pass": "finetune", "version": 1, "params": {"data": "speech", "data_digest": "ab" * 32},
                "metrics": {"val": {"uar": 0.8, "loss": 0.5}}, "checks": {}},
               {"pass": "prune.alcs", "version": 1,
                "params": {"budget_ms": 2.0, "latency_ratio": None, "threads": 1, "batch": 1,
                           "table": {"runtime": "onnxruntime 1.2", "cpu": "X", "threads": 1, "units": [1, 2]}},
                "metrics": {"estimated_ms": 1.9}, "checks": {"latency": {"passed": True, "budget": "2 ms"}}}]
    (m,) = C.recorded_metrics(records)
    assert m["metrics"] == {"uar": 0.8, "loss": 0.5} and m["passes_after"] == ["prune.alcs"] and m["split"] == "val"
    (lat,) = C.recorded_latency(records)
    assert lat["budget_ms"] == 2.0 and lat["estimated_ms"] == 1.9 and lat["machine"]["cpu"] == "X"
    assert lat["checks"] == {"latency": {"passed": True, "budget": "2 ms"}}
    assert C.passes(records)[2]["params"] == {"budget_ms": 2.0, "latency_ratio": None, "threads": 1, "batch": 1}


# --- gate parsing and judging ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"min_metric": ["uar"]}, "takes NAME=VALUE"),
    ({"min_metric": ["wer=0.1"]}, "unknown metric 'wer'"),
    ({"min_metric": ["mae=0.1"]}, "mae is lower-is-better"),
    ({"min_metric": ["uar=1.5"]}, "must be in [0, 1]"),
    ({"min_metric": ["uar=abc"]}, "must be a number"),
    ({"min_metric": {"uar": True}}, "must be a finite number"),
    ({"min_metric": ["uar=0.5", "uar=0.6"]}, "uar is given twice"),
    ({"max_metric_drop": -0.1}, "max_metric_drop must be in [0, 2]"),
    ({"max_latency_ms": 0}, "max_latency_ms must be > 0"),
    ({"max_size_kb": float("nan")}, "max_size_kb must be a finite number"),
])
def test_bad_gate_values_are_one_line_errors(kwargs, message):
    with pytest.raises(EdgecError, match=re.escape(message)):
        G.parse(**kwargs)


def test_gate_forms_parse_alike():
    assert G.parse(min_metric=["uar=0.85", "accuracy=0.9"]).min_metric == {"uar": 0.85, "accuracy": 0.9}
    assert G.parse(min_metric="ccc=-0.2").min_metric == {"ccc": -0.2}
    assert G.parse(min_metric={"macro_f1": 0.5}).min_metric == {"macro_f1": 0.5}
    assert G.parse().empty and not G.parse(max_size_kb=1).needs_data and G.parse(max_metric_drop=0).needs_data
    assert G.parse(max_metric_drop=0.1).drop_metrics("regression") == ["ccc"]
    assert G.parse(min_metric="accuracy=0.5", max_metric_drop=0.1).drop_metrics("classification") == ["accuracy"]


def test_judge_says_which_gate_failed_and_by_how_much():
    gates = G.parse(min_metric=["uar=0.85"], max_metric_drop=0.02, max_latency_ms=5, max_size_kb=100)
    m = G.Measured(evaluation={"task": "classification", "metrics": {"uar": 0.80}},
                   baseline={"metrics": {"uar": 0.83}}, latency_ms=4.0, file_bytes=150 * 1024)
    report = G.judge(gates, m)
    assert report["passed"] is False
    rows = {r["gate"]: r for r in report["checks"]}
    assert rows["min_metric"]["passed"] is False and rows["min_metric"]["margin"] == pytest.approx(-0.05)
    assert rows["max_metric_drop"]["value"] == pytest.approx(0.03) and not rows["max_metric_drop"]["passed"]
    assert rows["max_latency_ms"]["passed"] and rows["max_latency_ms"]["margin"] == pytest.approx(1.0)
    assert rows["max_size_kb"]["value"] == 150 and rows["max_size_kb"]["margin"] == pytest.approx(-50)
    assert report["failed"] == ["uar 0.8 < 0.85 (short by 0.05)",
                                "uar dropped 0.03 (0.83 → 0.8) > 0.02 (over by 0.01)",
                                "size 150 KiB > 100 KiB (over by 50 KiB)"]
    exact = G.judge(G.parse(min_metric=["uar=0.8"]), m)  # equal to the limit passes
    assert exact["passed"] and exact["checks"][0]["margin"] == 0


def test_a_metric_the_task_does_not_have_is_bad_input():
    m = G.Measured(evaluation={"task": "regression", "metrics": {"ccc": 0.5, "mae": 1.0, "loss": 2.0}})
    with pytest.raises(EdgecError, match=r"gate metric 'uar' is not measured for regression data .*ccc, mae"):
        G.judge(G.parse(min_metric=["uar=0.5"]), m)
