"""`edgec eval` on a detection folder with the zoo lwdetr: COCO mAP for a checkpoint and its ONNX export (they
agree), latency as for other tasks, and one-line refusals."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.app import api
from edgec.app.cli import main
from edgec.core.errors import EdgecError
from edgec.core.options import ExportOptions, ZooCreateOptions
from edgec.evaluation import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
TINY = {"num_classes": 5, "image_size": 32, "depth": 2, "global_blocks": [1], "out_indices": [1],
        "decoder_layers": 1, "num_queries": 10, "embed_dim": 32, "dim": 32, "decoder_ffn": 64}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("deteval")
    proc = subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_detection.py"), "--out", str(d / "shapes"),
                           "--images", "40"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    api.zoo_create("lwdetr", d / "m.pt", ZooCreateOptions(set=TINY))
    api.export(d / "m.pt", d / "m.onnx", ExportOptions())
    return d


def cli(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["edgec", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def test_eval_checkpoint_and_onnx_agree(files, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "eval", files / "m.onnx", "--data", files / "shapes", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["task"] == "detection" and res["kind"] == "onnx" and res["split"] == "test" and res["n"] == 4
    assert res["input_shape"] == [3, 32, 32]  # resized to the model's image_size
    m = res["metrics"]
    assert set(m) == {"map", "map50", "map75", "objects"} and all(0.0 <= m[k] <= 1.0 for k in ("map", "map50", "map75"))
    assert m["map50"] >= m["map"] >= 0 and m["objects"] > 0
    assert res["latency"]["median_ms"] > 0
    pt = evaluate(files / "m.pt", files / "shapes", latency=False, return_predictions=True)
    onnx = evaluate(files / "m.onnx", files / "shapes", latency=False, return_predictions=True)
    assert pt["predictions_by"] == "torch" and onnx["predictions_by"] == "onnxruntime"
    for a, b in zip(pt["predictions"], onnx["predictions"]):
        np.testing.assert_allclose(sorted(a["scores"]), sorted(b["scores"]), atol=1e-5)
        assert len(a["scores"]) == 50  # K = min(100, queries x classes)
    for k in ("map", "map50", "map75"):
        assert pt["metrics"][k] == pytest.approx(onnx["metrics"][k], abs=1e-3)
        assert onnx["metrics"][k] == pytest.approx(m[k])


def test_eval_refuses_bad_detection_data(files, tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.json").write_text('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}')
    (bad / "test.json").write_text('{"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}], '
                                   '"annotations": [], "categories": [{"id": 1, "name": "x"}]}')
    code, out, err = cli(capsys, monkeypatch, "eval", files / "m.pt", "--data", bad, "--no-latency")
    assert code == 2
    assert "a.png: image file missing (test.json image id 1)" in err and "Traceback" not in err
    six = tmp_path / "six"
    shutil.copytree(files / "shapes", six)
    for split in ("train", "val", "test"):
        doc = json.loads((six / f"{split}.json").read_text())
        doc["categories"].append({"id": 6, "name": "extra"})
        (six / f"{split}.json").write_text(json.dumps(doc))
    with pytest.raises(EdgecError, match="outputs 5 class scores but the data has 6 classes"):
        evaluate(files / "m.pt", six, latency=False)
