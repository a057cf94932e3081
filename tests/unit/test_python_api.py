"""The Python API for users' own models (docs/api.md): plain-PyTorch modules in, the CLI's passes run in memory,
the user's own training loop between scaffold and fold, verified ONNX out."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgec
from edgec.core.errors import EdgecError
from edgec.core.spec import Dim

ROOT = Path(__file__).resolve().parents[2]
# Latency is measured for real on a shared CPU: a generous aim-below margin, retries and a short protocol.
FAST_PRUNE = {"latency_ratio": 0.8, "margin": 0.25, "max_retries": 3, "densities": [1.0, 0.5, 0.25],
              "profile_options": {"repeats": 8, "min_seconds": 0.02, "rounds": 1, "dense_repeats": 15,
                                  "dense_min_seconds": 0.1},
              "measure_options": {"warmup": 3, "repeats": 20, "min_seconds": 0.1}}


# --- models written the way users write them (no edgec imports in the classes) -------------------------

class CNN(nn.Module):
    def __init__(self, classes=4, width=32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 1), nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.head(self.pool(self.block(self.stem(x))).flatten(1))


class KWS(nn.Module):
    """A keyword spotter on the stock nn.TransformerEncoder."""

    def __init__(self, n_mels=20, d=64, classes=5):
        super().__init__()
        self.proj = nn.Linear(n_mels, d)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, 4, 1024, dropout=0.1, batch_first=True), 1)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.proj(x)).mean(1))


class Tagger(nn.Module):
    def __init__(self, vocab=50, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.out = nn.Linear(d, 3)

    def forward(self, ids, mask):
        return self.out(self.emb(ids) * mask.unsqueeze(-1))


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


# --- import edgec -----------------------------------------------------------------------------------------

def test_import_edgec_is_torch_free_and_the_api_loads_on_use():
    code = ("import sys, edgec; assert 'torch' not in sys.modules, 'import edgec imported torch'; "
            "print(sorted(n for n in edgec.__all__ if not n.startswith('_'))); edgec.fold; "
            "assert 'torch' in sys.modules; print(callable(edgec.from_module))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names, loaded = proc.stdout.splitlines()
    assert eval(names) == sorted(["CheckFailed", "EdgecError", "Model", "StepReport", "export", "fold",
                                  "from_module", "load", "prune_to_latency", "save", "scaffold_binary",
                                  "scaffold_hrf", "scaffold_ternary"])
    assert loaded == "True"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        edgec.nope  # noqa: B018


# --- from_module ------------------------------------------------------------------------------------------

def test_from_module_captures_without_touching_the_module():
    torch.manual_seed(0)
    net = CNN().train()
    net.stem[1].eval()  # a mixed train/eval state must survive
    before = _state(net)
    x = torch.randn(2, 3, 24, 24)
    model = edgec.from_module(net, x)
    assert net.training and not net.stem[1].training and net.block[1].training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert model.arch == f"{CNN.__module__}:CNN" and model.config == {}
    (spec,) = model.spec.inputs
    assert spec.name == "x" and spec.dtype == "float32"  # the name comes from forward's signature
    assert isinstance(spec.dims[0], Dim) and spec.dims[0].example == 2 and spec.dims[1:] == (3, 24, 24)
    rec = model.provenance[0]
    assert rec["pass"] == "import.module" and rec["params"]["config_given"] is False
    assert rec["checks"]["example"]["passed"] and rec["output_digest"] == model.digest()
    with torch.no_grad():
        expected = net.eval()(x)
    assert torch.allclose(model.run((x,))[0], expected, atol=1e-6)


def test_from_module_takes_dicts_names_and_dynamic_axes():
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7)
    model = edgec.from_module(Tagger(), {"mask": mask, "ids": ids})  # ordered as forward(ids, mask)
    a, b = model.spec.inputs
    assert (a.name, a.dtype, a.high) == ("ids", "int64", 50)  # tokens sample below the embedding size
    assert isinstance(a.dims[1], Dim) and a.dims[1].example == 7  # int64 rank 2: a dynamic sequence
    assert b.name == "mask" and b.dims[1] == 7
    named = edgec.from_module(Tagger(), (ids, mask), names=["tokens", "m"], dynamic={"m": {1: "seq"}})
    assert [t.name for t in named.spec.inputs] == ["tokens", "m"]
    assert named.spec.inputs[1].dims[1].name == "seq"


@pytest.mark.parametrize(("call", "match"), [
    (lambda: edgec.from_module(CNN(), torch.randn(1, 3, 8, 8, dtype=torch.float64)), "dtype torch.float64"),
    (lambda: edgec.from_module(CNN(), [[1, 2]]), "give a tensor"),
    (lambda: edgec.from_module(CNN(), {"y": torch.randn(1, 3, 8, 8)}), "not arguments of CNN.forward"),
    (lambda: edgec.from_module(Tagger(), {"mask": torch.ones(1, 3)}), "give example inputs for ids"),
    (lambda: edgec.from_module(CNN(), torch.randn(1, 3, 8, 8), names=["a", "b"]), "2 name"),
    (lambda: edgec.from_module(CNN(), torch.randn(1, 3, 8, 8), dynamic={"z": {0: "B"}}), "unknown input"),
    (lambda: edgec.from_module(CNN(), torch.randn(1, 3, 8, 8), dynamic={"x": {4: "B"}}), "not an axis"),
    (lambda: edgec.from_module(CNN(), torch.randn(1, 3, 8, 8), config={"f": object()}), "JSON"),
    (lambda: edgec.from_module(CNN(), torch.randn(1, 4, 8, 8)), "forward failed on the example inputs"),
    (lambda: edgec.from_module("CNN", torch.randn(1)), "torch.nn.Module"),
    (lambda: edgec.fold(CNN()), "edgec.from_module"),
])
def test_bad_input_is_one_edgec_error(call, match):
    with pytest.raises(EdgecError, match=match) as exc:
        call()
    assert exc.value.exit_code == 2 and "\n" not in str(exc.value)


def test_options_are_the_cli_dataclasses():
    model = edgec.from_module(CNN(), torch.randn(1, 3, 8, 8))
    elsewhere = model.clone()
    elsewhere.gm.to("meta")  # stands in for a GPU the user trained on
    for call, match in [
        (lambda: edgec.fold(elsewhere), r"tensors are on meta; move it back first: model.gm.cpu\(\)"),
        (lambda: edgec.fold(edgec.scaffold_ternary(model)), "unpack it"),
        (lambda: edgec.scaffold_ternary(model, groupsize=4), r"unknown option\(s\) groupsize; .*group_size"),
        (lambda: edgec.scaffold_ternary(model, method="int4"), "sttn or dlt"),
        (lambda: edgec.scaffold_ternary(model, group_size=8), "applies to --method dlt"),
        (lambda: edgec.scaffold_hrf(model, arch="x"), r"unknown option\(s\) arch"),
        (lambda: edgec.prune_to_latency(model), "exactly one of"),
        (lambda: edgec.prune_to_latency(model, latency_ratio=1.5), "latency-ratio"),
        (lambda: edgec.export(model, "never.onnx", weights="int3"), "weights"),
    ]:
        with pytest.raises(EdgecError, match=match):
            call()
    assert not Path("never.onnx").exists()


def test_reports_list_skips_and_strict_refuses_those_not_chosen():
    class Mixer(nn.Module):  # a weight used functionally: no scaffold can reach it
        def __init__(self):
            super().__init__()
            self.inp, self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
            self.mix = nn.Parameter(torch.randn(8, 8))

        def forward(self, x):
            return self.head(self.mid(self.inp(x)) @ self.mix)

    model = edgec.from_module(Mixer(), torch.randn(2, 8))
    scaffolded, report = edgec.scaffold_ternary(model)
    assert {s["layer"] for s in report.skipped} == {"inp", "mix", "head"}  # first/last kept fp32, mix unreachable
    assert report.to_dict()["schema"] == "edgec.api.step/1" and report.scaffolds == 1
    assert report.after["params"] == scaffolded.param_count() and report.before["digest"] == model.digest()
    with pytest.raises(EdgecError, match=r"could not handle 1 layer\(s\).*mix"):
        edgec.scaffold_ternary(model, strict=True)
    _, report = edgec.scaffold_ternary(model, strict=True, exclude=["mix"])  # acknowledged: no error
    assert report.scaffolds == 1


# --- the user's own training loop between scaffold and fold -----------------------------------------------

def _user_loop(module, example, classes, steps=20):
    """What a user writes: an optimizer over the parameters, their loss, their batches."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(32, *example.shape[1:], generator=g)
    ys = torch.randint(0, classes, (32,), generator=g)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    module.train()
    losses = []
    for step in range(steps):
        i = (step * 8) % 32
        loss = nn.functional.cross_entropy(module(xs[i:i + 8]), ys[i:i + 8])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    module.eval()
    return losses


@pytest.mark.parametrize(("make", "example", "classes", "dynamic"), [
    # 96 px: enough work per run that a 4x narrower conv is measurably faster (at 48 px the run is mostly
    # per-op overhead, and the table's fastest configuration sat within noise of an 0.8 budget)
    (CNN, torch.randn(1, 3, 96, 96), 4, None),
    (KWS, torch.randn(1, 50, 20), 5, {"x": {1: "time"}}),
], ids=["cnn", "transformer"])
def test_prune_scaffold_user_loop_fold_export(make, example, classes, dynamic, tmp_path):
    torch.manual_seed(0)
    model = edgec.from_module(make(), example, dynamic=dynamic)
    digest = model.digest()

    pruned, result = edgec.prune_to_latency(model, **FAST_PRUNE)  # one-shot: no data
    assert result.mode == "one-shot" and result.output is None
    assert result.measured_ms <= result.local_budget_ms and pruned.param_count() < model.param_count()

    ternary, report = edgec.scaffold_ternary(pruned)
    assert report.modified and report.scaffolds >= 1 and ternary.scaffolds()
    losses = _user_loop(ternary.gm, example, classes)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])  # the scaffolds train in a plain loop

    folded, report = edgec.fold(ternary)
    assert report.modified and not folded.scaffolds() and ternary.scaffolds()
    out = tmp_path / "model.onnx"
    exported = edgec.export(folded, out)
    assert exported.checks["ort_parity"]["passed"] and exported.weights == "int2"
    assert out.stat().st_size == exported.file_bytes

    # the file, run independently at another batch size, gives what the folded model gives (in the session
    # configuration the export verified: ORT's default may quantize activations for 2-bit MatMulNBits)
    x = torch.randn(3, *example.shape[1:])
    options = ort.SessionOptions()
    for key, value in exported.checks["ort_parity"].get("session_config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.allclose(got, folded.run((x,))[0].numpy(), atol=1e-4)

    # every step was pure, and the chain says what happened, the user's loop included
    assert model.digest() == digest and not pruned.scaffolds()
    passes = [r["pass"] for r in folded.provenance]
    assert passes[:5] == ["import.module", "prune.channels", "prune.alcs", "scaffold.sttn", "train.external"]
    assert "fold.sttn" in passes
    ext = passes.index("train.external")
    assert folded.provenance[ext]["input_digest"] == folded.provenance[ext - 1]["output_digest"]


# --- save / load --------------------------------------------------------------------------------------

def test_save_warns_when_the_checkpoint_could_not_be_rebuilt(tmp_path):
    model = edgec.from_module(CNN(), torch.randn(1, 3, 8, 8))
    with pytest.warns(UserWarning, match=r"constructor arguments of .*CNN \(classes, width\) are unknown"):
        edgec.save(model, tmp_path / "a.pt")

    class Local(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x)

    local = edgec.from_module(Local(), torch.randn(1, 4), config={})
    with pytest.warns(UserWarning, match="defined in a script or a function"):
        edgec.save(local, tmp_path / "b.pt")


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = edgec.from_module(CNN(width=8), torch.randn(1, 3, 8, 8), config={"width": 8})
    folded, _ = edgec.fold(model)
    saved = edgec.save(folded, tmp_path / "m.pt")
    assert saved.digest == folded.digest()
    with pytest.raises(EdgecError, match="user architecture"):
        edgec.load(tmp_path / "m.pt")  # a checkpoint never chooses the code it runs
    loaded = edgec.load(tmp_path / "m.pt", arch=model.arch)
    assert loaded.digest() == folded.digest()
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(loaded.run((x,))[0], folded.run((x,))[0], atol=1e-6)
