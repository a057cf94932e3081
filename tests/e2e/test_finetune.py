"""Fine-tuning: real training, keep-best, exact resume, fingerprint refusal, distillation, torchrun/DDP."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.fileio import read_data
from edgec.core.graph import canonical_json
from edgec.core.options import FinetuneOptions
from edgec.data import load_data
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.train import TrainingInterrupted, WarmupCosine, finetune, finetune_file, kd_loss
from edgec.train.loop import evaluate, is_better

ROOT = Path(__file__).resolve().parents[2]


class TinyNet(nn.Module):
    """A user architecture for fast tests: Linear -> BatchNorm -> ReLU -> Dropout -> Linear."""

    summary = "test MLP"

    @staticmethod
    def default_config() -> dict:
        return {"in_features": 16, "hidden": 32, "num_classes": 4, "dropout": 0.1, "batchnorm": True}

    def __init__(self, in_features=16, hidden=32, num_classes=4, dropout=0.1, batchnorm=True):
        super().__init__()
        self.in_features = in_features
        self.fc1 = nn.Linear(in_features, hidden)
        self.norm = nn.BatchNorm1d(hidden) if batchnorm else nn.Identity()
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def input_spec(self):
        from edgec.core.spec import Dim, InputSpec, TensorSpec

        return InputSpec(inputs=(TensorSpec("x", (Dim("batch", 2, 3), self.in_features)),))

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.norm(self.fc1(x)))))


ARCH = f"{__name__}:TinyNet"


def tiny(seed=0, **cfg):
    return new_model(ARCH, cfg, seed=seed)


def make_data(path, n=160, seed=0, task="classification"):
    """4 Gaussian clusters in 16-d (classification) or a noisy linear target (regression)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 0.9
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 16, generator=g)
    if task == "regression":
        w = torch.randn(16, generator=torch.Generator().manual_seed(7)) / 4
        y = x @ w + 0.1 * torch.randn(n, generator=g)
    torch.save({"inputs": x, "targets": y}, path)
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The models here are tiny: one intra-op thread avoids OpenMP spin-wait stalls when the 2 cores are
    shared with other processes (seen as 10-50x slower epochs), and is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(str(make_data(tmp_path_factory.mktemp("data") / "clusters.pt")))


def sd_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------- training
def test_training_learns_and_returns_best(data):
    model = tiny()
    before = model.digest()
    events = []
    best, report = finetune(model, data, epochs=6, batch_size=16, lr=3e-3, progress=events.append)
    losses = [h["train_loss"] for h in report["history"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert report["best"]["uar"] > 0.8
    assert model.digest() == before  # the input model is not modified
    assert not best.gm.training
    # The returned weights are the best epoch's: re-evaluating them reproduces the recorded metrics.
    again = evaluate(best.gm, data.split("val"), data.task, data.num_classes, 16, torch.device("cpu"))
    assert again == report["best"]
    assert report["steps"] == 6 * report["steps_per_epoch"] == report["total_steps"]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 6
    assert kinds.count("step") == report["steps"]
    assert report["final_lr"] < 1e-4  # cosine decayed to ~0


def test_keep_best_returns_the_best_epochs_weights(data, tmp_path, monkeypatch):
    """Scripted val results (uar, loss) per epoch: epoch 4 ties epoch 2's UAR with a lower loss and wins;
    epoch 5 ties epoch 4 exactly and loses (earlier stays). The returned weights are epoch 4's, read
    back from the resume file as it stood at the end of epoch 4."""
    import edgec.train.loop as L

    script = iter([(0.5, 1.0), (0.8, 0.9), (0.8, 0.95), (0.8, 0.85), (0.8, 0.85), (0.6, 0.1)])
    real = L.evaluate

    def scripted(*args, **kwargs):
        uar, loss = next(script)
        return real(*args, **kwargs) | {"uar": uar, "loss": loss}

    monkeypatch.setattr(L, "evaluate", scripted)
    rfile, weights = tmp_path / "run.resume", {}

    def progress(event):
        if event["event"] == "epoch":
            weights[event["epoch"]] = read_data(rfile)["state_dict"]

    best, report = finetune(tiny(), data, epochs=6, batch_size=16, lr=3e-3, resume_file=rfile, progress=progress)
    assert report["best_epoch"] == 4
    assert [h["is_best"] for h in report["history"]] == [True, True, False, True, False, False]
    assert report["best"]["uar"] == 0.8 and report["best"]["loss"] == 0.85
    assert sd_equal(best.state_dict(), weights[4])
    assert not sd_equal(weights[4], weights[6])


def test_is_better_breaks_ties_by_val_loss():
    assert is_better(0.5, 1.0, None)
    assert is_better(0.6, 9.0, {"score": 0.5, "loss": 1.0})
    assert is_better(0.5, 0.9, {"score": 0.5, "loss": 1.0})
    assert not is_better(0.5, 1.0, {"score": 0.5, "loss": 1.0})  # full tie: the earlier epoch stays
    assert not is_better(0.4, 0.1, {"score": 0.5, "loss": 1.0})


def test_warmup_cosine_schedule():
    f = WarmupCosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(10) == 0.0
    assert all(f(i) >= f(i + 1) for i in range(2, 10))


def test_regression_monitors_ccc(tmp_path):
    bundle = load_data(str(make_data(tmp_path / "reg.pt", task="regression")))
    best, report = finetune(tiny(num_classes=1), bundle, epochs=4, batch_size=16, lr=3e-3)
    assert report["monitor"] == "ccc"
    assert {"ccc", "mae", "loss"} <= set(report["best"])
    assert report["history"][-1]["train_loss"] < report["history"][0]["train_loss"]


def test_wrong_output_width_is_a_clear_error(data):
    with pytest.raises(EdgecError, match="num_classes=4"):
        finetune(tiny(num_classes=3), data, epochs=1)


# ----------------------------------------------------------------------------------------------- resume
def _interrupt_after(epoch=None, step=None):
    def progress(event):
        if epoch is not None and event["event"] == "epoch" and event["epoch"] == epoch:
            raise KeyboardInterrupt
        if step is not None and event["event"] == "step" and (event["epoch"], event["step"]) == step:
            raise KeyboardInterrupt

    return progress


@pytest.mark.parametrize("cut", [{"epoch": 1}, {"step": (2, 3)}], ids=["after-epoch-1", "mid-epoch-2"])
def test_resume_is_bit_identical(data, tmp_path, cut):
    hyper = dict(epochs=3, batch_size=16, lr=3e-3, seed=5)
    ref, ref_report = finetune(tiny(), data, resume_file=tmp_path / "ref.resume", **hyper)

    rfile = tmp_path / "run.resume"
    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        finetune(tiny(), data, resume_file=rfile, progress=_interrupt_after(**cut), **hyper)
    assert info.value.exit_code == 130
    state = read_data(rfile)  # weights_only load of a complete file
    assert state["epoch"] == 1 and len(state["history"]) == 1

    out, report = finetune(tiny(), data, resume_file=rfile, resume=True, **hyper)
    assert report["resumed_from"] == 1
    assert sd_equal(out.state_dict(), ref.state_dict())
    assert [h["train_loss"] for h in report["history"]] == [h["train_loss"] for h in ref_report["history"]]
    assert [h["val"] for h in report["history"]] == [h["val"] for h in ref_report["history"]]
    assert report["steps"] == ref_report["steps"] and report["best_epoch"] == ref_report["best_epoch"]
    # The final state (not only the best) matches too.
    assert sd_equal(read_data(rfile)["state_dict"], read_data(tmp_path / "ref.resume")["state_dict"])


def test_resume_refuses_a_different_run(data, tmp_path):
    rfile = tmp_path / "run.resume"
    hyper = dict(epochs=3, batch_size=16, lr=3e-3)
    with pytest.raises(TrainingInterrupted):
        finetune(tiny(), data, resume_file=rfile, progress=_interrupt_after(epoch=1), **hyper)
    with pytest.raises(EdgecError, match=r"different run \(lr: 0.003 in the file, 0.01 now\)"):
        finetune(tiny(), data, resume_file=rfile, resume=True, **(hyper | {"lr": 1e-2}))
    with pytest.raises(EdgecError, match="model:"):
        finetune(tiny(seed=1), data, resume_file=rfile, resume=True, **hyper)
    other = load_data(str(make_data(tmp_path / "other.pt", seed=9)))
    with pytest.raises(EdgecError, match="data:"):
        finetune(tiny(), other, resume_file=rfile, resume=True, **hyper)
    with pytest.raises(EdgecError, match="no resume file"):
        finetune(tiny(), data, resume_file=tmp_path / "missing.resume", resume=True, **hyper)


# ----------------------------------------------------------------------------------------------- distillation
def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    s = torch.randn(8, 5)
    assert float(kd_loss(s, s.clone(), temperature=1.0)) == 0.0
    assert float(kd_loss(s, torch.randn(8, 5), temperature=2.0)) > 0.0


def test_distillation_from_itself_is_zero(data):
    """teacher == student (no dropout/BN, so the train-mode student and the eval-mode teacher compute the
    same function), kd_weight=1, T=1: the loss is exactly 0 on every batch while the weights stay equal
    (lr=0). With lr>0 the first step's loss is exactly 0; afterwards Adam amplifies the ~1e-8 rounding
    gradient of the softmax, so the student drifts slightly."""
    student = tiny(dropout=0.0, batchnorm=False)
    events = []
    best, report = finetune(student, data, epochs=2, batch_size=16, teacher=student, kd_weight=1.0,
                            kd_temperature=1.0, lr=0.0, progress=events.append)
    steps = [e["loss"] for e in events if e["event"] == "step"]
    assert len(steps) == report["steps"] > 0 and set(steps) == {0.0}
    assert all(h["train_kd_loss"] == 0.0 for h in report["history"])
    assert sd_equal(best.state_dict(), student.state_dict())
    events.clear()
    finetune(student, data, epochs=1, batch_size=16, teacher=student, kd_weight=1.0, kd_temperature=1.0,
             progress=events.append)
    steps = [e for e in events if e["event"] == "step"]
    assert steps[0]["loss"] == 0.0 and steps[0]["grad_norm"] < 1e-6


def test_distillation_from_a_trained_teacher(data):
    teacher, _ = finetune(tiny(seed=3), data, epochs=4, batch_size=16, lr=3e-3)
    best, report = finetune(tiny(), data, epochs=3, batch_size=16, lr=3e-3, teacher=teacher)
    h = report["history"]
    assert h[0]["train_kd_loss"] > 0 and h[-1]["train_kd_loss"] < h[0]["train_kd_loss"]
    assert report["fingerprint"]["teacher"] == teacher.digest()


def test_extra_loss_sees_tapped_features(data):
    seen = {}

    def hook(outputs, batch, features):
        seen.update({k: sorted(v) for k, v in features.items()})
        return features["student"]["fc1"].pow(2).mean() * 0.0

    teacher = tiny(seed=2)
    finetune(tiny(), data, epochs=1, batch_size=16, teacher=teacher, extra_loss=hook, feature_layers=["fc*"])
    assert seen == {"student": ["fc1", "fc2"], "teacher": ["fc1", "fc2"]}
    with pytest.raises(EdgecError, match="matches no module"):
        finetune(tiny(), data, epochs=1, extra_loss=hook, feature_layers=["block0"])


# ----------------------------------------------------------------------------------------------- files
def test_finetune_file_interrupt_then_resume(tmp_path):
    src = tmp_path / "in.pt"
    save_checkpoint(tiny(), src)
    data_file = make_data(tmp_path / "clusters.pt")
    out = tmp_path / "out" / "ft.pt"
    kw = dict(data=data_file, arch=ARCH, epochs=3, batch_size=16, lr=3e-3)
    with pytest.raises(TrainingInterrupted):
        finetune_file(src, out, FinetuneOptions(**kw), progress=_interrupt_after(epoch=2))
    assert not out.exists()  # no partial output
    resume_file = out.with_name("ft.pt.resume")
    assert read_data(resume_file)["epoch"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["ft.pt.resume"]  # no temporary files left

    result = finetune_file(src, out, FinetuneOptions(resume=True, **kw)).to_dict()
    json.dumps(result)  # JSON-able
    assert result["written"] and result["resumed_from"] == 2 and result["world_size"] == 1
    assert not resume_file.exists()  # removed after a successful save
    model = load_checkpoint(out, ARCH)
    record = model.provenance[-1]
    assert record["pass"] == "finetune" and record["checks"] == {}
    assert record["params"]["data"] == "clusters.pt" and record["params"]["world_size"] == 1
    assert record["metrics"]["best_epoch"] == result["best_epoch"]
    assert record["output_digest"] == model.digest() == result["digest"]
    assert str(tmp_path) not in canonical_json(model.provenance)
    assert model.passes == []  # fine-tuning is not structural


# ----------------------------------------------------------------------------------------------- torchrun
def test_torchrun_two_processes(tmp_path):
    """2 CPU processes (gloo, DDP) on a tiny ResNet: completes, only rank 0 writes and prints."""
    src = tmp_path / "resnet.pt"
    save_checkpoint(new_model("resnet", {"num_classes": 4, "base_width": 4, "blocks_per_stage": [1, 1, 1, 1]}), src)
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (96,), generator=g)
    x = torch.randn(96, 1, 8, 8, generator=g) * 0.5
    for c in range(4):
        x[y == c, 0, 2 * c : 2 * c + 2, :] += 1.0
    torch.save({"inputs": x, "targets": y}, tmp_path / "images.pt")
    out_dir = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "edgec", "finetune", str(src), "--json", "--data", str(tmp_path / "images.pt"), "-o", str(out_dir / "ft.pt"),
           "--epochs", "2", "--batch-size", "16", "--lr", "3e-3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    assert result["world_size"] == 2 and result["batch_size_per_process"] == 8 and result["written"]
    assert proc.stderr.count("epoch 1/2:") == 1 and proc.stderr.count("epoch 2/2:") == 1
    assert sorted(p.name for p in out_dir.iterdir()) == ["ft.pt"]
    model = load_checkpoint(out_dir / "ft.pt")
    assert model.provenance[-1]["params"]["world_size"] == 2
    assert len(model.provenance[-1]["metrics"]["history"]) == 2


def test_resume_is_bit_identical_for_a_zoo_transformer(tmp_path):
    """ConvTransformer (BatchNorm front-end, attention/FFN dropout) on random log-mel-shaped data."""
    g = torch.Generator().manual_seed(1)
    torch.save({"inputs": torch.randn(48, 24, 8, generator=g), "targets": torch.randint(0, 3, (48,), generator=g)},
               tmp_path / "mel.pt")
    bundle = load_data(str(tmp_path / "mel.pt"))
    cfg = {"n_mels": 8, "num_classes": 3, "d_model": 16, "num_layers": 1, "num_heads": 2, "ffn_dim": 32}
    hyper = dict(epochs=3, batch_size=8, lr=3e-3, seed=2)
    ref, _ = finetune(new_model("convtransformer", cfg), bundle, **hyper)
    rfile = tmp_path / "run.resume"
    with pytest.raises(TrainingInterrupted):
        finetune(new_model("convtransformer", cfg), bundle, resume_file=rfile, progress=_interrupt_after(epoch=2),
                 **hyper)
    out, report = finetune(new_model("convtransformer", cfg), bundle, resume_file=rfile, resume=True, **hyper)
    assert report["resumed_from"] == 2
    assert sd_equal(out.state_dict(), ref.state_dict())
