"""Zoo architectures (convtransformer, conformer, hafformer, resnet): build, fx-trace, export, ORT parity.

Each model is built and exported once per module (dynamo export takes a few seconds); the ONNX parity check
here is a small local helper, independent of the project's exporter pass.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from edgec.core.spec import Dim, InputSpec
from edgec.models import build, full_config

ort = pytest.importorskip("onnxruntime")

ARCHS = ["convtransformer", "conformer", "hafformer", "resnet"]
SPEECH = ["convtransformer", "conformer", "hafformer"]
# Edge-sized: speech models 50k-400k parameters by default; ResNet-18 at width 16 is ~0.7M.
PARAM_BOUNDS = {"convtransformer": (50_000, 400_000), "conformer": (50_000, 400_000),
                "hafformer": (50_000, 400_000), "resnet": (200_000, 2_000_000)}
TOL = 1e-4


def make_model(arch: str, overrides: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build(arch, full_config(arch, overrides))
    # Non-trivial BatchNorm statistics, so eval-mode parity actually exercises the normalisation.
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.1)
    return model.eval()


def export_onnx(gm: torch.nn.Module, spec: InputSpec) -> bytes:
    """Dynamo export with every spec Dim dynamic; returns the serialized model (opset 20)."""
    dynamic = tuple({i: torch.export.Dim(d.name, min=d.min, max=d.max) for i, d in dims.items()}
                    for dims in spec.dynamic_dims())
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # "torchvision is not installed" notices
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                gm, spec.sample(0), dynamo=True, dynamic_shapes=dynamic, opset_version=20,
                input_names=[t.name for t in spec.inputs], output_names=list(spec.outputs), verbose=False,
            )
    finally:
        onnx_logger.setLevel(level)
    return program.model_proto.SerializeToString()


def ort_max_error(session, model: nn.Module, spec: InputSpec, inputs: tuple) -> float:
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs)}
    (got,) = session.run(None, feeds)
    with torch.no_grad():
        want = model(*inputs).numpy()
    assert got.shape == want.shape
    return float(np.abs(got - want).max())


@pytest.fixture(scope="module", params=ARCHS)
def zoo(request):
    arch = request.param
    model = make_model(arch)
    gm = torch.fx.symbolic_trace(model)
    spec = model.input_spec()
    session = ort.InferenceSession(export_onnx(gm, spec), providers=["CPUExecutionProvider"])
    return arch, model, gm, spec, session


def test_trace_matches_eager_and_spec(zoo):
    arch, model, gm, spec, _ = zoo
    assert isinstance(gm, torch.fx.GraphModule)
    num_classes = full_config(arch)["num_classes"]
    for alt in (False, True):
        inputs = spec.sample(0, alt=alt)
        with torch.no_grad():
            want, got = model(*inputs), gm(*inputs)
        assert want.shape == (inputs[0].shape[0], num_classes)
        assert torch.equal(want, got)
        assert torch.isfinite(want).all()
    assert spec.outputs == ("logits",) and spec.task == "classification"
    # Two samples have different dynamic sizes: they prove the export below is really dynamic.
    assert spec.sample(0)[0].shape != spec.sample(0, alt=True)[0].shape


def test_onnx_parity_at_two_shapes_and_batch_one(zoo):
    arch, model, _, spec, session = zoo
    for inputs in (spec.sample(0), spec.sample(1, alt=True), spec.sample(2, batch=1)):
        assert ort_max_error(session, model, spec, inputs) < TOL, (arch, inputs[0].shape)
    # Symbolic axes, not baked sizes, in the graph's declared input shape.
    declared = session.get_inputs()[0].shape
    for i in spec.dynamic_dims()[0]:
        assert isinstance(declared[i], str), (arch, declared)


# Shapes at the ends of each declared range (and odd sizes for pooling/striding).
EDGE_SHAPES = {
    "convtransformer": [(1, 16, 40), (2, 2048, 40)],
    "conformer": [(1, 16, 40), (1, 1001, 40)],
    "hafformer": [(1, 1, 40), (2, 5, 40), (1, 2047, 40)],
    "resnet": [(1, 1, 4, 4), (2, 1, 28, 17)],
}


def test_onnx_parity_at_range_edges(zoo):
    arch, model, _, spec, session = zoo
    g = torch.Generator().manual_seed(3)
    for shape in EDGE_SHAPES[arch]:
        assert ort_max_error(session, model, spec, (torch.randn(shape, generator=g),)) < TOL, (arch, shape)


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_and_determinism(arch):
    a, b = make_model(arch, seed=5), make_model(arch, seed=5)
    n = sum(p.numel() for p in a.parameters())
    lo, hi = PARAM_BOUNDS[arch]
    assert lo <= n <= hi, (arch, n)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cls = type(a)
    assert isinstance(cls.summary, str) and cls.summary
    assert cls(**full_config(arch)).state_dict().keys() == sa.keys()


@pytest.mark.parametrize("arch", SPEECH)
def test_ffn_and_attention_structure(arch):
    """FFNs are linear1 -> activation -> dropout -> linear2; attention has q/k/v/out projections."""
    gm = torch.fx.symbolic_trace(make_model(arch))
    modules = dict(gm.named_modules())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    linear1 = [t for t in nodes if t.endswith(".linear1")]
    if arch == "hafformer":
        assert not linear1
        gegl = [t for t in modules if t.endswith(".geglu")]
        assert gegl and all(isinstance(getattr(modules[t], w), nn.Linear) for t in gegl for w in ("w_g", "w_v", "w_o"))
        return
    assert linear1
    for t in linear1:
        (act,) = list(nodes[t].users)
        assert act.op == "call_module" and isinstance(modules[act.target], (nn.GELU, nn.SiLU, nn.ReLU))
        (drop,) = list(act.users)
        assert isinstance(modules[drop.target], nn.Dropout)
        (lin2,) = list(drop.users)
        assert lin2.target == t.replace("linear1", "linear2")
        assert isinstance(modules[nodes[t].args[0].target], nn.LayerNorm)  # pre-LN: linear1 reads a LayerNorm
    for t in [t for t in modules if t.endswith(".attn")]:
        assert all(isinstance(getattr(modules[t], p), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
    if arch == "conformer":
        assert sum(t.endswith((".ffn1.linear1", ".ffn2.linear1")) for t in linear1) == 2 * full_config(arch)["num_layers"]


def test_conformer_depthwise_conv_feeds_only_batchnorm():
    gm = torch.fx.symbolic_trace(make_model("conformer"))
    modules = dict(gm.named_modules())
    depthwise = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv1d)
                 and modules[n.target].groups == modules[n.target].in_channels > 1]
    assert len(depthwise) == full_config("conformer")["num_layers"]
    for n in depthwise:
        (user,) = list(n.users)
        assert user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm1d)
        (after,) = list(user.users)
        assert isinstance(modules[after.target], nn.SiLU)


def test_resnet_conv_bn_pairs():
    gm = torch.fx.symbolic_trace(make_model("resnet"))
    modules = dict(gm.named_modules())
    convs = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d)]
    assert len(convs) == 1 + 2 * 8 + 3  # stem, 8 BasicBlocks, 3 downsample shortcuts
    for n in convs:
        assert modules[n.target].bias is None
        (user,) = list(n.users)
        assert isinstance(modules[user.target], nn.BatchNorm2d)


@pytest.mark.parametrize(("arch", "overrides"), [
    ("convtransformer", {"d_model": 32, "num_layers": 1, "num_heads": 2, "ffn_dim": 64, "pos_encoding": "learned",
                         "num_strided": 2, "activation": "relu", "n_mels": 24, "num_classes": 3}),
    ("conformer", {"d_model": 48, "num_layers": 1, "num_heads": 3, "ffn_dim": 96, "conv_kernel": 7, "n_mels": 80}),
    ("hafformer", {"dims": [32, 48], "depths": [1, 2], "pool_sizes": [3], "kernel_sizes": [3, 9], "ffn_mult": 1.5}),
    ("resnet", {"base_width": 8, "blocks_per_stage": [1, 1, 1, 1], "in_channels": 3, "image_size": 32}),
])
def test_config_overrides_trace(arch, overrides):
    model = make_model(arch, overrides)
    gm = torch.fx.symbolic_trace(model)
    spec = model.input_spec()
    for alt in (False, True):
        inputs = spec.sample(0, alt=alt)
        with torch.no_grad():
            out = model(*inputs)
            assert torch.equal(out, gm(*inputs))
        assert out.shape == (inputs[0].shape[0], full_config(arch, overrides)["num_classes"])


def test_speech_input_spec():
    for arch in SPEECH:
        spec = make_model(arch).input_spec()
        (t,) = spec.inputs
        assert t.name == "features" and t.dtype == "float32" and t.dims[2] == 40
        batch, time = t.dims[0], t.dims[1]
        assert isinstance(batch, Dim) and (batch.example, batch.alt, batch.min) == (2, 3, 1)
        assert isinstance(time, Dim) and time.example == 200 and time.max >= 2048
