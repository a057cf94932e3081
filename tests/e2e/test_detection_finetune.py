"""Detection fine-tuning end to end: a tiny zoo LW-DETR on a tiny generated detection set (the fixture generator),
through the CLI with --json, exact resume, set-matched logits distillation and OFF on a ternary scaffold."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.core.fileio import read_data
from edgec.data import load_data
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.train import TrainingInterrupted, finetune
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"image_size": 32, "num_classes": 5, "patch_size": 8, "windows": 2, "embed_dim": 32, "depth": 2,
        "num_heads": 2, "global_blocks": [1], "out_indices": [1], "dim": 32, "decoder_layers": 2,
        "decoder_heads": 2, "decoder_ffn": 64, "num_queries": 8, "groups": 2}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """30 synthetic scenes (the generator splits them 80/10/10 into train/val/test) in COCO json + PNGs."""
    spec = importlib.util.spec_from_file_location("make_detection", ROOT / "fixtures" / "make_detection.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path_factory.mktemp("det") / "shapes"
    mod.build(str(out), 30, 0)
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("lw") / "lw.pt"
    save_checkpoint(new_model("lwdetr", TINY, seed=0), path)
    return path


@pytest.fixture(scope="module")
def data(folder):
    return load_data(str(folder), image_size=32)


def test_finetune_cli_reports_val_map(folder, ckpt, tmp_path):
    out = tmp_path / "ft.pt"
    proc = run_cli("finetune", ckpt, "--data", folder, "-o", out, "--epochs", "2", "--batch-size", "8",
                   "--lr", "3e-3", "--json", env={"OMP_NUM_THREADS": "1"}, check=0)
    res = json.loads(proc.stdout)
    assert res["task"] == "detection" and res["monitor"] == "map" and res["written"]
    assert res["classes"] == ["circle", "square", "triangle", "cross", "ring"]
    assert {"map", "map50", "map75", "loss"} <= set(res["best"])
    assert 0.0 <= res["best"]["map"] <= res["best"]["map50"] <= 1.0
    assert len(res["history"]) == 2 and all(math.isfinite(h["train_loss"]) for h in res["history"])
    # keep-best: the best epoch has the highest val mAP, ties broken by the lower val loss
    rank = sorted(res["history"], key=lambda h: (-h["val"]["map"], h["val"]["loss"]))
    assert res["best_epoch"] == rank[0]["epoch"] and res["best"] == rank[0]["val"]
    assert "val map" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ft.pt"]  # the resume file is gone
    model = load_checkpoint(out)
    rec = model.provenance[-1]
    assert rec["pass"] == "finetune" and rec["metrics"]["monitor"] == "map"
    assert rec["params"]["data"] == "shapes"
    model.gm.eval()
    logits, boxes = model.gm(torch.rand(1, 3, 32, 32))
    assert logits.shape == (1, 8, 5) and boxes.shape == (1, 8, 4)  # one query group at inference


def _interrupt_after_epoch(n):
    def progress(event):
        if event["event"] == "epoch" and event["epoch"] == n:
            raise KeyboardInterrupt
    return progress


def test_resume_is_bit_identical(ckpt, data, tmp_path):
    hyper = {"epochs": 2, "batch_size": 8, "lr": 3e-3, "seed": 1}
    ref, ref_report = finetune(load_checkpoint(ckpt), data, resume_file=tmp_path / "ref.resume", **hyper)
    rfile = tmp_path / "run.resume"
    with pytest.raises(TrainingInterrupted, match="--resume"):
        finetune(load_checkpoint(ckpt), data, resume_file=rfile, progress=_interrupt_after_epoch(1), **hyper)
    out, report = finetune(load_checkpoint(ckpt), data, resume_file=rfile, resume=True, **hyper)
    assert report["resumed_from"] == 1 and report["monitor"] == "map"
    assert [h["val"] for h in report["history"]] == [h["val"] for h in ref_report["history"]]
    assert out.digest() == ref.digest()
    saved, want = read_data(rfile)["state_dict"], read_data(tmp_path / "ref.resume")["state_dict"]
    assert all(torch.equal(saved[k], want[k]) for k in want)


def test_distillation_on_a_ternary_scaffold(ckpt, data, tmp_path):
    """--distill logits: set-matched KD from the fp32 model; --distill off: block features, the student's extra
    query groups cut to group 0 (the teacher runs one group)."""
    from edgec.app.api import scaffold_ternary
    from edgec.core.options import ScaffoldTernaryOptions

    student = tmp_path / "lw_t.pt"
    scaffold_ternary(ckpt, student, ScaffoldTernaryOptions())
    teacher = load_checkpoint(ckpt)
    hyper = {"epochs": 1, "batch_size": 8, "lr": 3e-3}
    _, rep = finetune(load_checkpoint(student), data, teacher=teacher, distill="logits", **hyper)
    kd = rep["history"][0]["train_kd_loss"]
    assert rep["distill"]["mode"] == "logits" and math.isfinite(kd) and kd > 0
    _, rep = finetune(load_checkpoint(student), data, teacher=teacher, distill="off", **hyper)
    layers = rep["history"][0]["train_off_layers"]
    assert any(n.startswith("decoder.") for n in layers) and all(math.isfinite(v) for v in layers.values())


def test_binary_scaffold_trains_with_latent_supervision(ckpt, data, tmp_path):
    """The binary scaffold's real-mode forward also returns (logits, boxes): its task loss is the set loss."""
    from edgec.app.api import scaffold_binary
    from edgec.core.options import ScaffoldBinaryOptions

    student = tmp_path / "lw_b.pt"
    scaffold_binary(ckpt, student, ScaffoldBinaryOptions())
    _, rep = finetune(load_checkpoint(student), data, epochs=1, batch_size=8, lr=3e-3)
    row = rep["history"][0]
    assert rep["distill"]["binary_weights"] == [0.5, 0.5]
    assert math.isfinite(row["train_real_loss"]) and row["train_real_loss"] > 1.0
    assert row["train_loss"] > row["train_task_loss"]


def test_a_model_with_too_few_queries_is_refused(data):
    model = new_model("lwdetr", TINY | {"num_queries": 4}, seed=0)
    with pytest.raises(EdgecError, match="up to 6 objects but the model .* has 4 queries"):
        finetune(model, data, epochs=1, batch_size=8)


def test_task_mismatches_are_one_line(data, tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.rand(16, 3, 32, 32, generator=g), "targets": torch.arange(16) % 5},
               tmp_path / "cls.pt")
    with pytest.raises(EdgecError, match="is a detection model but the data is a classification task"):
        finetune(new_model("lwdetr", TINY, seed=0), load_data(str(tmp_path / "cls.pt")), epochs=1, batch_size=8)
    with pytest.raises(EdgecError, match="a detection model must output"):
        resnet = new_model("resnet", {"in_channels": 3, "num_classes": 5, "base_width": 4, "blocks_per_stage": [1, 1, 1, 1]})
        finetune(resnet, data, epochs=1, batch_size=8)
