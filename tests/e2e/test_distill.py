"""Distillation in fine-tuning: OFF (cosine feature distillation on block outputs), logits KD, the default
teacher found by digest, resume, DDP, and the binary latent-weight supervision hook."""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgec import models
from edgec.core.errors import EdgecError
from edgec.core.fileio import read_data
from edgec.core.graph import trace
from edgec.core.options import FinetuneOptions
from edgec.core.pass_manager import PassManager
from edgec.data import load_data
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.passes.hrf import HRFScaffold
from edgec.train import (
    TrainingInterrupted,
    block_names,
    feature_extractor,
    finetune,
    finetune_file,
    off_loss,
    resolve_layers,
)
from edgec.train.distill import check_features, feature_dim, off_distance

ROOT = Path(__file__).resolve().parents[2]


class Block(nn.Module):
    """Pre-norm residual FFN block: x + fc2(gelu(fc1(norm(x))))."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class BlockNet(nn.Module):
    """A user architecture with blocks: Linear embed -> N residual blocks (tokens) -> mean -> Linear head."""

    summary = "test block MLP"

    @staticmethod
    def default_config() -> dict:
        return {"in_features": 16, "tokens": 4, "width": 16, "depth": 2, "num_classes": 4}

    def __init__(self, in_features=16, tokens=4, width=16, depth=2, num_classes=4):
        super().__init__()
        self.in_features, self.tokens, self.width = in_features, tokens, width
        self.embed = nn.Linear(in_features // tokens, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def input_spec(self):
        from edgec.core.spec import Dim, InputSpec, TensorSpec

        return InputSpec(inputs=(TensorSpec("x", (Dim("batch", 2, 3), self.in_features)),))

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], self.tokens, -1))
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


ARCH = f"{__name__}:BlockNet"


def net(seed=0, **cfg):
    return new_model(ARCH, cfg, seed=seed)


def make_data(path, n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(123)) * 0.9
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, 16, generator=g)
    torch.save({"inputs": x, "targets": y}, path)
    return path


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_data(str(make_data(tmp_path_factory.mktemp("data") / "clusters.pt")))


@pytest.fixture(scope="module")
def teacher(data):
    fp, _ = finetune(net(seed=3), data, epochs=3, batch_size=16, lr=3e-3)
    return fp


def sd_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def scaffold(model):
    out, _ = PassManager([HRFScaffold(init="preserve")])(model)
    return out


# ----------------------------------------------------------------------------------------------- the loss
def test_off_loss_is_zero_for_identical_features_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    tokens, fmap = torch.randn(3, 7, 16, generator=g) * 5, torch.randn(2, 8, 4, 4, generator=g)
    for t in (tokens, fmap, torch.randn(4, 10, generator=g)):
        assert float(off_distance(t, t.clone())) == 0.0
        assert float(off_distance(t, torch.randn(t.shape, generator=g))) > 0.1
    # The cosine runs over the feature dim per token (last dim) / per position over channels (dim 1, NCHW):
    # rescaling each token / position by a positive factor changes nothing, mixing within one does.
    assert feature_dim(tokens) == 2 and feature_dim(fmap) == 1
    assert float(off_distance(tokens * torch.rand(3, 7, 1, generator=g).add(0.5), tokens)) < 1e-6
    assert float(off_distance(fmap * torch.rand(2, 1, 4, 4, generator=g).add(0.5), fmap)) < 1e-6
    assert float(off_distance(fmap.flip(1), fmap)) > 0.1
    total, per = off_loss({"a": tokens, "b": fmap}, {"a": tokens, "b": -fmap})
    assert per["a"] == 0.0 and float(per["b"]) == pytest.approx(2.0) and float(total) == pytest.approx(1.0)


def test_off_from_an_identical_teacher_is_exactly_zero(data):
    """student == teacher (no dropout/BN, lr 0): the OFF term is exactly 0 in every epoch."""
    model = net()
    best, report = finetune(model, data, epochs=2, batch_size=16, lr=0.0, teacher=model, distill="off")
    assert [h["train_off_loss"] for h in report["history"]] == [0.0, 0.0]
    assert all(v == 0.0 for h in report["history"] for v in h["train_off_layers"].values())
    assert report["distill"]["off_layers"] == ["blocks.0", "blocks.1"]
    assert sd_equal(best.state_dict(), model.state_dict())


def test_off_loss_decreases_in_training(data, teacher):
    """A fresh student trained towards a trained teacher with OFF dominating the loss (λ = 5)."""
    best, report = finetune(net(seed=0), data, epochs=5, batch_size=16, lr=3e-3, teacher=teacher, distill="off",
                            off_weight=5.0)
    off = [h["train_off_loss"] for h in report["history"]]
    print("OFF per epoch:", [round(v, 4) for v in off])
    assert off[0] > 0.05 and off[-1] < 0.5 * off[0], off
    assert all(b < a for a, b in zip(off, off[1:])), off
    h = report["history"][-1]
    assert set(h["train_off_layers"]) == {"blocks.0", "blocks.1"}
    assert h["train_loss"] == pytest.approx(h["train_task_loss"] + 5.0 * h["train_off_loss"], rel=1e-6)
    assert "train_kd_loss" not in h  # kd_weight defaults to 0 with OFF
    fp = report["fingerprint"]
    assert fp["distill"] == "off" and fp["off_weight"] == 5.0 and fp["teacher"] == teacher.digest()


# ----------------------------------------------------------------------------------------------- layers
@pytest.mark.parametrize("arch,cfg,count", [
    ("conformer", {"d_model": 16, "num_heads": 2, "ffn_dim": 32, "num_layers": 2, "n_mels": 16,
                   "subsampling_channels": 4, "conv_kernel": 3}, 2),
    ("resnet", {"base_width": 4, "blocks_per_stage": [1, 2, 1, 1]}, 5),
    ("bert", {"hidden_size": 16, "num_hidden_layers": 3, "intermediate_size": 32, "vocab_size": 50,
              "max_position_embeddings": 16}, 3),
])
def test_default_layers_are_the_block_outputs(arch, cfg, count):
    """One feature per block, equal to what the eager block module returns, and the same shapes in an
    HRF-scaffolded student (scaffolds keep the block names)."""
    torch.manual_seed(0)
    module = models.build(arch, models.full_config(arch, cfg))
    gm = trace(module)
    names = block_names(gm)
    assert len(names) == count and resolve_layers(gm) == names
    captured = {}
    hooks = [module.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o))
             for n in names]
    inputs = module.input_spec().sample(seed=0)
    with torch.no_grad():
        ref = module(*inputs)
        out, feats = feature_extractor(gm, names)(*inputs)
    for h in hooks:
        h.remove()
    assert torch.equal(out, ref)
    assert all(torch.equal(captured[n], f) for n, f in zip(names, feats))
    # the feature graph shares the student's parameters (no copy)
    fgm = feature_extractor(gm, names)
    assert all(p is q for p, q in zip(gm.parameters(), fgm.parameters()))

    teacher = new_model(arch, cfg)
    student = scaffold(teacher) if arch != "resnet" else teacher.clone()
    assert block_names(student.gm) == names
    s_feats = feature_extractor(student.gm, names)(*inputs)[1]
    t_feats = feature_extractor(teacher.gm, names)(*inputs)[1]
    check_features(dict(zip(names, s_feats)), dict(zip(names, t_feats)))  # shapes match: no error


def test_off_layer_globs_and_mismatches(data):
    gm = net().gm
    assert resolve_layers(gm, ["blocks.*"]) == ["blocks.0", "blocks.1"]  # outermost matches only
    assert resolve_layers(gm, ["blocks.1.fc*", "embed"]) == ["embed", "blocks.1.fc1", "blocks.1.fc2"]
    with pytest.raises(EdgecError, match="matches no module .*blocks.0, blocks.1"):
        resolve_layers(gm, ["layer.*"])
    best, report = finetune(net(), data, epochs=1, batch_size=16, teacher=net(seed=1), distill="off",
                            off_layers="blocks.1,head")
    assert report["distill"]["off_layers"] == ["blocks.1", "head"]
    with pytest.raises(EdgecError, match=r"same shape.*'blocks.0': student \[2, 4, 16\] vs teacher \[2, 4, 8\]"):
        finetune(net(), data, epochs=1, teacher=net(width=8), distill="off")
    with pytest.raises(EdgecError, match="needs a teacher"):
        finetune(net(), data, epochs=1, distill="off")
    with pytest.raises(EdgecError, match="only applies with distill 'off'"):
        finetune(net(), data, epochs=1, teacher=net(), distill="logits", off_layers=["blocks.*"])


# ----------------------------------------------------------------------------------------------- files
def test_teacher_is_found_by_digest_and_recorded(tmp_path, teacher):
    data_file = make_data(tmp_path / "clusters.pt")
    save_checkpoint(teacher, tmp_path / "fp.pt")
    student = scaffold(teacher)
    save_checkpoint(student, tmp_path / "hrf.pt")
    save_checkpoint(net(seed=7), tmp_path / "other.pt")  # a decoy with another digest
    res = finetune_file(tmp_path / "hrf.pt", tmp_path / "out" / "ft.pt",
                        FinetuneOptions(data=data_file, arch=ARCH, epochs=2, batch_size=16, lr=1e-3,
                                        distill="off")).to_dict()
    json.dumps(res)
    assert res["distill"]["teacher_file"] == "fp.pt" and res["distill"]["teacher_source"] == "scaffold provenance"
    record = load_checkpoint(tmp_path / "out" / "ft.pt", ARCH).provenance[-1]
    params = record["params"]
    assert params["distill"] == "off" and params["teacher"] == "fp.pt"
    assert params["teacher_digest"] == teacher.digest() == student.provenance[-1]["input_digest"]
    assert params["off_weight"] == 1.0 and params["off_layers"] == ["blocks.0", "blocks.1"]
    assert params["kd_weight"] == 0.0
    assert [set(h) >= {"train_off_loss", "train_task_loss"} for h in record["metrics"]["history"]] == [True, True]

    # Without the full-precision file next to it: a clear error naming the digest.
    lone = tmp_path / "lone"
    lone.mkdir()
    save_checkpoint(student, lone / "hrf.pt")
    want = teacher.digest()[:12]
    with pytest.raises(EdgecError, match=rf"--distill off needs a teacher: pass --teacher CKPT \(the full-precision "
                                         rf"checkpoint the scaffold came from, digest {want}…, was not found next to hrf.pt\)"):
        finetune_file(lone / "hrf.pt", lone / "ft.pt", FinetuneOptions(data=data_file, arch=ARCH, epochs=1,
                                                                        distill="off"))
    save_checkpoint(net(), lone / "plain.pt")
    with pytest.raises(EdgecError, match="records no scaffold pass"):
        finetune_file(lone / "plain.pt", lone / "ft.pt", FinetuneOptions(data=data_file, arch=ARCH, epochs=1,
                                                                          distill="logits"))


def test_logits_only_distillation(tmp_path, teacher):
    """kd_weight 1.0: pure distillation (STTN's recipe); the teacher is found by digest here too."""
    data_file = make_data(tmp_path / "clusters.pt")
    save_checkpoint(teacher, tmp_path / "fp.pt")
    save_checkpoint(scaffold(teacher), tmp_path / "hrf.pt")
    res = finetune_file(tmp_path / "hrf.pt", tmp_path / "ft.pt",
                        FinetuneOptions(data=data_file, arch=ARCH, epochs=2, batch_size=16, lr=1e-3,
                                        distill="logits", kd_weight=1.0, kd_temperature=4.0)).to_dict()
    h = res["history"]
    assert all(r["train_loss"] == pytest.approx(r["train_kd_loss"]) for r in h)  # no task term at weight 1
    params = load_checkpoint(tmp_path / "ft.pt", ARCH).provenance[-1]["params"]
    assert params["distill"] == "logits" and params["kd_weight"] == 1.0 and params["teacher"] == "fp.pt"
    assert "off_layers" not in params


# ----------------------------------------------------------------------------------------------- resume
def test_resume_with_off_is_bit_identical(data, teacher, tmp_path):
    hyper = dict(epochs=3, batch_size=16, lr=3e-3, seed=4, teacher=teacher, distill="off", off_weight=2.0)
    ref, ref_report = finetune(scaffold(teacher), data, **hyper)
    rfile = tmp_path / "run.resume"

    def cut(event):
        if event["event"] == "step" and (event["epoch"], event["step"]) == (2, 2):
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        finetune(scaffold(teacher), data, resume_file=rfile, progress=cut, **hyper)
    assert read_data(rfile)["epoch"] == 1
    with pytest.raises(EdgecError, match=r"off_weight: 2.0 in the file, 1.0 now"):
        finetune(scaffold(teacher), data, resume_file=rfile, resume=True, **(hyper | {"off_weight": 1.0}))
    out, report = finetune(scaffold(teacher), data, resume_file=rfile, resume=True, **hyper)
    assert report["resumed_from"] == 1
    assert sd_equal(out.state_dict(), ref.state_dict())
    assert report["history"] == [h | {"seconds": r["seconds"]} for h, r in zip(ref_report["history"],
                                                                                report["history"])]


# ----------------------------------------------------------------------------------------------- binary
def _binary_pass():
    """The binary pass (``BinaryScaffold``) with its training-loss API (``edgec.layers.binary``) as one namespace."""
    try:
        mod = importlib.import_module("edgec.passes.binary")
        api = importlib.import_module("edgec.layers.binary")
    except ImportError as exc:
        pytest.skip(f"edgec.passes.binary / edgec.layers.binary is not importable yet ({exc})")
    names = {"binary_aux_loss": api, "real_mode": api, "binary_latent_weights": api, "BinaryScaffold": mod}
    missing = [n for n, m in names.items() if not hasattr(m, n)]
    if missing:
        pytest.skip(f"the binary pass lacks {', '.join(missing)}")
    return SimpleNamespace(**{n: getattr(m, n) for n, m in names.items()})


def test_binary_latent_weight_supervision(data, teacher):
    """Binary student: + λ1·CE(real network under real_mode) + λ2·mean(1 − cos(y_b, y_r)); λ default to the
    scaffold's recorded latent_weight, binary_weights overrides, (0, 0) turns it off."""
    binary = _binary_pass()
    student, _ = PassManager([binary.BinaryScaffold(latent_weight=(0.25, 2.0))])(teacher)
    assert binary.binary_latent_weights(student.gm) == (0.25, 2.0)
    for weights, want in ((None, (0.25, 2.0)), ((0.5, 1.0), (0.5, 1.0))):
        best, report = finetune(student, data, epochs=2, batch_size=16, lr=1e-3, binary_weights=weights)
        lam1, lam2 = want
        for r in report["history"]:
            assert r["train_loss"] == pytest.approx(r["train_task_loss"] + lam1 * r["train_real_loss"]
                                                    + lam2 * r["train_binary_aux_loss"], rel=1e-5)
            assert r["train_binary_aux_loss"] > 0 and r["train_real_loss"] > 0
        assert report["fingerprint"]["binary_weights"] == list(want)
        assert report["distill"]["binary_weights"] == list(want)
    best, report = finetune(student, data, epochs=1, batch_size=16, binary_weights=(0, 0))
    assert "train_real_loss" not in report["history"][0] and "binary_weights" not in report["fingerprint"]
    # with OFF from the full-precision teacher at the same time
    best, report = finetune(student, data, epochs=1, batch_size=16, teacher=teacher, distill="off")
    assert {"train_off_loss", "train_real_loss", "train_binary_aux_loss"} <= set(report["history"][0])
    with pytest.raises(EdgecError, match="needs a student with binary scaffolds"):
        finetune(net(), data, epochs=1, binary_weights=(0.5, 1.0))


# ----------------------------------------------------------------------------------------------- DDP
SCRIPT = """
import json, sys, torch
sys.path.insert(0, {test_dir!r})
from edgec.core.options import FinetuneOptions
from edgec.train import finetune_file
res = finetune_file({src!r}, {out!r}, FinetuneOptions(data={data!r}, arch="test_distill:BlockNet", epochs=2,
                    batch_size=16, lr=3e-3, distill="off", off_weight=2.0)).to_dict()
with open({out!r} + f".rank{{res['rank']}}.json", "w") as f:
    json.dump({{"rank": res["rank"], "digest": res["digest"], "off": [h["train_off_loss"] for h in res["history"]]}}, f)
"""


@pytest.mark.parametrize("kind", ["hrf", "binary"])
def test_torchrun_two_processes_with_off(tmp_path, teacher, kind):
    """2 CPU processes (gloo): the OFF feature graph (and for a binary student the real-mode forward) runs
    inside DDP, so both ranks end with the same weights (their batches differ: unsynchronised gradients would
    give different digests). The teacher is found by digest on both ranks."""
    save_checkpoint(teacher, tmp_path / "fp.pt")
    if kind == "binary":
        student, _ = PassManager([_binary_pass().BinaryScaffold()])(teacher)
    else:
        student = scaffold(teacher)
    save_checkpoint(student, tmp_path / "hrf.pt")
    data_file = make_data(tmp_path / "clusters.pt")
    script = tmp_path / "run_off.py"
    script.write_text(SCRIPT.format(test_dir=str(Path(__file__).parent), src=str(tmp_path / "hrf.pt"),
                                    data=str(data_file), out=str(tmp_path / "out" / "ft.pt")))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / "out" / f"ft.pt.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in results] == [0, 1]
    assert results[0]["digest"] == results[1]["digest"]
    assert results[0]["off"] == results[1]["off"] and all(v > 0 for v in results[0]["off"])
    model = load_checkpoint(tmp_path / "out" / "ft.pt", ARCH)
    assert model.digest() == results[0]["digest"] and model.provenance[-1]["params"]["world_size"] == 2


