"""Bring your own model: plain-PyTorch classes from tests/user_models (no edgec code in them) go through the whole
chain from their own files — import (state_dict, safetensors, Lightning), inspect, scaffold, fold, prune, export."""
import json
import shutil

import pytest
import torch
from conftest import ROOT, run_cli
from safetensors.torch import save_file

from edgec.app import api
from edgec.core.options import (
    ExportOptions,
    FoldOptions,
    ScaffoldHrfOptions,
    ScaffoldTernaryOptions,
    SourceOptions,
)
from edgec.models import resolve
from edgec.models.checkpoint import load_checkpoint

USER = ROOT / "tests" / "user_models"

# name: (file:Class, constructor arguments (non-default sizes), --input-shape, FFNs per model (None: no HRF))
MODELS = {
    "mobilenet": ("mobilenet.py:MobileNet", {"width": 16, "num_classes": 7}, ["x=1x3x32x32"], None),
    "kws": ("kws.py:KeywordTransformer", {"d_model": 48, "num_layers": 2, "num_classes": 9},
            ["feats=1xT=50x40"], 2),
    "nanogpt": ("nanogpt.py:GPT", {"vocab_size": 256, "n_layer": 2, "n_embd": 96}, ["idx=1x64:int64"], 2),
    "buffered": ("buffered.py:NormalizedMLP", {"hidden": 1024}, ["x=1x20"], None),
}
FORMS = ("pt", "safetensors", "ckpt")


def _arch(project, name):
    return f"{project / MODELS[name][0].split(':')[0]}:{MODELS[name][0].split(':')[1]}"


def _weights(project, name, form, seed=0):
    """The user's own save of a freshly initialised model, in one of the forms users have."""
    cls = resolve(_arch(project, name))
    torch.manual_seed(seed)
    module = cls(**MODELS[name][1]).eval()
    state = module.state_dict()
    path = project / f"{name}.{form}"
    if form == "pt":
        torch.save(state, path)
    elif form == "safetensors":
        # safetensors refuses shared storage (nanoGPT ties wte and lm_head); users save a clone of each tensor
        save_file({k: v.clone().contiguous() for k, v in state.items()}, path)
    else:  # a Lightning checkpoint: the LightningModule holds the net as `model`, hparams as saved
        torch.save({"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"model.{k}": v for k, v in state.items()},
                    "hyper_parameters": {**MODELS[name][1], "lr": 1e-3}}, path)
    return module, path


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A user's project folder: their model files, no edgec code."""
    root = tmp_path_factory.mktemp("project")
    for f in USER.glob("*.py"):
        shutil.copy(f, root / f.name)
    return root


def _import(project, name, form, out, cli=True):
    """``edgec import torch`` of the user's file (by the CLI, or the API function the CLI calls)."""
    arch, config, shapes, _ = MODELS[name]
    module, weights = _weights(project, name, form)
    config = None if form == "ckpt" else config  # a Lightning checkpoint brings its own hyper_parameters
    if not cli:
        src = SourceOptions(arch=str(project / arch), arch_config=config, input_shape=shapes)
        return module, api.import_torch(weights, out, src).to_dict()
    args = ["import", "torch", weights, "--arch", arch, "-o", out, "--json"]
    if config:
        args += ["--arch-config", json.dumps(config)]
    for s in shapes:
        args += ["--input-shape", s]
    return module, json.loads(run_cli(*args, cwd=project, check=0).stdout)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_import_every_form_matches_the_users_module(project, name, form):
    out = project / f"{name}-{form}.edgec.pt"
    module, res = _import(project, name, form, out, cli=form == "pt")  # the chain test below uses the CLI too
    model = load_checkpoint(out, _arch(project, name))
    inputs = model.spec.sample(seed=3)
    with torch.no_grad():
        ref = module(*inputs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    got = model.run(inputs)[0]
    assert torch.allclose(ref, got, rtol=1e-5, atol=1e-5)
    assert str(project) not in out.read_bytes().decode("latin-1")  # no absolute path stored


def _cli_json(*args, cwd, check=0):
    return json.loads(run_cli(*args, "--json", cwd=cwd, check=check).stdout)


def _encoder_linears(model) -> set[str]:
    return {n for n, m in model.gm.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_chain_from_the_users_file(project, name):
    """import → inspect → scaffold (hrf where there are FFNs, ternary) → fold → export with parity, and
    prune → export: the CLI for import, inspect and prune; the same API the CLI calls for the rest."""
    arch, config, shapes, ffns = MODELS[name]
    work = project / f"chain-{name}"
    work.mkdir()
    form = FORMS[sorted(MODELS).index(name) % len(FORMS)]  # each model from another of the user's forms
    module, _ = _import(project, name, form, work / "m.pt")
    info = _cli_json("inspect", work / "m.pt", "--arch", arch, cwd=project)
    assert info["params"] == sum(p.numel() for p in module.parameters())
    a = project / arch  # the API takes the same arch string; relative to the project here
    if ffns:
        hrf = api.scaffold_hrf(work / "m.pt", work / "h.pt", ScaffoldHrfOptions(arch=str(a)))
        assert hrf.scaffolds == ffns  # one FFN per layer, also inside the stock encoder layers
        folded = api.fold(work / "h.pt", work / "hf.pt", FoldOptions(arch=str(a)))
        assert folded.scaffolds_left == 0 and all(c.get("passed", True) for p in folded.passes
                                                  for c in p["checks"].values() if isinstance(c, dict))
    tern = api.scaffold_ternary(work / "m.pt", work / "t.pt", ScaffoldTernaryOptions(arch=str(a)))
    assert tern.scaffolds > 0 and all(s["reason"] for s in tern.skipped)
    api.fold(work / "t.pt", work / "tf.pt", FoldOptions(arch=str(a)))
    # forms=cast: forms=auto's per-layer timing is tested in tests/e2e/test_lowbit_forms.py
    exported = api.export(work / "tf.pt", work / "t.onnx", ExportOptions(arch=str(a), forms="cast"))
    assert exported.checks["ort_parity"]["passed"] and exported.weights == "int2"
    # retries: the latency model underestimates depthwise CNNs here, so the measured loop tightens more often
    pruned = _cli_json("prune", work / "m.pt", "-o", work / "p.pt", "--latency-ratio", "0.85", "--arch", arch,
                       "--max-retries", "6", cwd=project)
    chosen = pruned["attempts"][-1]  # checked against 0.85 x the dense model measured side by side with it
    assert pruned["measured_ms"] <= pruned["local_budget_ms"] == pytest.approx(0.85 * chosen["dense_side_by_side_ms"])
    assert pruned["params"] < info["params"]
    final = api.export(work / "p.pt", work / "p.onnx", ExportOptions(arch=str(a)))
    assert final.checks["ort_parity"]["passed"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_ternary_and_hrf_reach_inside_the_stock_encoder(project, batch_first, norm_first, tmp_path):
    """Every Linear of nn.TransformerEncoderLayer (q/k/v from in_proj, out_proj, linear1, linear2) is ternarised;
    HRF finds one FFN per layer; the folded export matches torch in onnxruntime."""
    arch = _arch(project, "kws")
    cfg = {"d_model": 32, "num_layers": 2, "batch_first": batch_first, "norm_first": norm_first}
    module = resolve(arch)(**cfg).eval()
    torch.save(module.state_dict(), tmp_path / "w.pt")
    src = dict(arch=arch, arch_config=cfg, input_shape=["feats=1xT=30x40"])
    api.import_torch(tmp_path / "w.pt", tmp_path / "m.pt", SourceOptions(**src))
    model = load_checkpoint(tmp_path / "m.pt", arch)
    linears = _encoder_linears(model)
    assert len(linears) == 2 * 6  # q, k, v, out_proj, linear1, linear2 per layer
    api.scaffold_ternary(tmp_path / "m.pt", tmp_path / "t.pt", ScaffoldTernaryOptions(arch=arch))
    scaffolded = {n for n, _ in load_checkpoint(tmp_path / "t.pt", arch).scaffolds()}
    assert linears <= scaffolded
    hrf = api.scaffold_hrf(tmp_path / "m.pt", tmp_path / "h.pt", ScaffoldHrfOptions(arch=arch))
    assert hrf.scaffolds == 2
    api.fold(tmp_path / "t.pt", tmp_path / "tf.pt", FoldOptions(arch=arch))
    if norm_first and not batch_first:  # one layout exports (each export takes seconds); the others: the chain
        res = api.export(tmp_path / "tf.pt", tmp_path / "t.onnx", ExportOptions(arch=arch, forms="cast"))
        assert res.checks["ort_parity"]["passed"]


def test_project_file_names_the_architecture(project):
    """With [tool.edgec] in pyproject.toml, commands need no --arch; a checkpoint alone never picks code."""
    work = project / "proj"
    work.mkdir()
    shutil.copy(project / "buffered.py", work / "buffered.py")
    _, weights = _weights(work, "buffered", "pt")
    (work / "pyproject.toml").write_text('[tool.edgec]\narch = "buffered.py:NormalizedMLP"\n'
                                         'input-shape = ["x=1x20"]\narch-config = {hidden = 1024}\n')
    _cli_json("import", "torch", weights.name, "-o", "m.pt", cwd=work)
    _cli_json("fold", "m.pt", "-o", "f.pt", cwd=work)
    assert _cli_json("export", "f.pt", "-o", "f.onnx", cwd=work)["checks"]["ort_parity"]["passed"]
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    proc = run_cli("inspect", work / "m.pt", cwd=elsewhere)
    assert proc.returncode == 2 and "--arch" in proc.stderr
