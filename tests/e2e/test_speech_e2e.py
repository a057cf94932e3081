"""The HRF headline path on the real fixture task, through the CLI: scaffold → finetune → fold → export → eval.

Trains a small conformer on speech synthesised by espeak-ng (speaker-disjoint splits) and checks that
training reduces the loss, that held-out speakers are classified well above chance, that the folded model
has the base architecture, and that eval gives the same metrics for the checkpoint and its ONNX file.
"""
import json
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, run_cli


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    bundled = ROOT / "fixtures" / "speech"
    if (bundled / "labels.csv").exists():
        return bundled
    if not shutil.which("espeak-ng"):
        pytest.skip("espeak-ng is not installed (make test installs it)")
    out = tmp_path_factory.mktemp("speech")
    subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_speech.py"), "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="module")
def trained(speech, tmp_path_factory):
    d = tmp_path_factory.mktemp("e2e")
    run_cli("zoo", "create", "conformer", "--set", "num_layers=1", "-o", d / "base.pt", check=0)
    run_cli("scaffold", "hrf", d / "base.pt", "-o", d / "hrf.pt", check=0)
    res = json.loads(run_cli("finetune", d / "hrf.pt", "--data", speech, "-o", d / "ft.pt", "--epochs", "5",
                             "--lr", "0.002", "--json", check=0).stdout)
    return d, res


def test_finetune_learns_and_beats_chance_on_held_out_speakers(trained, speech):
    d, res = trained
    losses = [h["train_loss"] for h in res["history"]]
    assert losses[-1] < 0.7 * losses[0], losses
    assert res["best"]["uar"] > 0.6  # 4 classes: chance is 0.25
    assert not (d / "ft.pt.resume").exists()  # training state lives beside, not in, the model; removed on success
    ev = json.loads(run_cli("eval", d / "ft.pt", "--data", speech, "--no-latency", "--json", check=0).stdout)
    assert ev["split"] == "test" and ev["metrics"]["uar"] > 0.5, ev["metrics"]


def test_fold_restores_base_architecture_and_eval_agrees_on_pt_and_onnx(trained, speech):
    from edgec.core.pass_manager import PassManager
    from edgec.models.checkpoint import load_checkpoint
    from edgec.passes.bnfold import FoldBatchNorm

    d, _ = trained
    fold = json.loads(run_cli("fold", d / "ft.pt", "-o", d / "folded.pt", "--json", check=0).stdout)
    by_pass = {p["pass"]: p for p in fold["passes"]}
    assert by_pass["fold.hrf"]["checks"]["equivalence"]["rel_error"] <= 1e-5
    assert by_pass["fold.batchnorm"]["modified"]
    base, folded = load_checkpoint(d / "base.pt"), load_checkpoint(d / "folded.pt")
    # deHRF gives back the base graph exactly; the BatchNorm fold then removes BN (and adds a conv bias)
    base_bn, _ = PassManager([FoldBatchNorm()])(base)
    assert {k: tuple(v.shape) for k, v in folded.gm.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in base_bn.gm.state_dict().items()}
    assert folded.param_count() == base_bn.param_count()
    run_cli("export", d / "folded.pt", "-o", d / "m.onnx", check=0)
    ev_pt = json.loads(run_cli("eval", d / "folded.pt", "--data", speech, "--no-latency", "--json", check=0).stdout)
    ev_onnx = json.loads(run_cli("eval", d / "m.onnx", "--data", speech, "--json", check=0).stdout)
    for k in ("accuracy", "uar", "macro_f1"):
        assert ev_pt["metrics"][k] == pytest.approx(ev_onnx["metrics"][k], abs=1e-6)
    assert ev_onnx["latency"]["median_ms"] > 0
    prov = [r["pass"] for r in json.loads(run_cli("inspect", d / "m.onnx", "--json", check=0).stdout)["provenance"]]
    assert prov == ["zoo.create", "scaffold.hrf", "finetune", "fold.hrf", "fold.batchnorm", "export.onnx"]
