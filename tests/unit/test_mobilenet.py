"""The MobileNetV2-style zoo CNN (edgec.models.mobilenet) through every pass: capture, export parity, channel
groups, BatchNorm folding, scaffolds and one-shot latency pruning."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import edgec
from edgec.analysis.groups import analyse, describe_groups
from edgec.core.errors import EdgecError
from edgec.core.pass_manager import PassManager
from edgec.models import build, full_config
from edgec.models.checkpoint import build_from_config, new_model
from edgec.models.mobilenet import InvertedResidual, MobileNet
from edgec.onnx.export import export
from edgec.passes.bnfold import FoldBatchNorm

# Two stages (one block, then two): a stem-coupled residual group, a stage residual group, three expand groups.
SMALL = {"stage_channels": [16, 32], "blocks_per_stage": [1, 2], "strides": [1, 2], "last_channels": 64}
# As tests/unit/test_python_api.py: latency measured for real on a shared CPU, a short protocol, a wide margin.
FAST_PRUNE = {"latency_ratio": 0.7, "margin": 0.25, "max_retries": 3, "densities": [1.0, 0.5, 0.25],
              "profile_options": {"repeats": 8, "min_seconds": 0.02, "rounds": 1, "dense_repeats": 15,
                                  "dense_min_seconds": 0.1},
              "measure_options": {"warmup": 3, "repeats": 20, "min_seconds": 0.1}}


def randomise_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so folding and parity exercise them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.gm.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture(scope="module")
def small():
    """The passes' tests run on SMALL (same block kinds, half the graph: faster exports and folds); the default
    config's export parity is tests/e2e/test_export.py's (parametrized over the zoo)."""
    return randomise_bn(new_model("mobilenet", SMALL, seed=0))


def test_default_config_rebuilds_the_same_model():
    cfg = MobileNet.default_config()
    assert full_config("mobilenet") == cfg and cfg["n_mels"] == 40 and cfg["num_classes"] == 4
    torch.manual_seed(0)
    a = MobileNet(**cfg)
    torch.manual_seed(0)
    b = build("mobilenet", full_config("mobilenet"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert new_model("mobilenet", seed=3).digest() == new_model("mobilenet", cfg, seed=3).digest()
    n = sum(p.numel() for p in a.parameters())
    assert 100_000 <= n <= 300_000, n
    # every conv is bias-free and feeds a BatchNorm; the 7 blocks: 16 | 24 24 | 48 48 | 96 96
    convs = [m for m in a.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in a.modules()) == len(convs) == 23
    blocks = [m for m in a.modules() if isinstance(m, InvertedResidual)]
    assert [b.use_residual for b in blocks] == [True, False, True, False, True, False, True]
    assert [b.project[0].out_channels for b in blocks] == [16, 24, 24, 48, 48, 96, 96]
    assert isinstance(MobileNet.summary, str) and "Sandler" in MobileNet.summary


@pytest.mark.parametrize(("overrides", "match"), [
    ({"strides": [1, 3, 2, 1]}, "strides must be 1 or 2"),
    ({"blocks_per_stage": [1, 2]}, "one entry per stage"),
    ({"expand_ratio": 0.5}, "expand_ratio must be >= 1"),
    ({"activation": "mish"}, "unknown activation 'mish'"),
    ({"stage_channels": [16, 0, 48, 96]}, "must be >= 1"),
])
def test_bad_config_is_one_edgec_error(overrides, match):
    with pytest.raises(EdgecError, match=match) as exc:
        build("mobilenet", full_config("mobilenet", overrides))
    assert "\n" not in str(exc.value)


def test_capture_and_export_parity(small):
    assert small.capture["method"] == "fx" and isinstance(small.gm, torch.fx.GraphModule)
    module = build("mobilenet", full_config("mobilenet", SMALL))
    module.load_state_dict(small.gm.state_dict())
    for alt in (False, True):
        (x,) = small.spec.sample(0, alt=alt)
        with torch.no_grad():
            assert torch.equal(small.run((x,))[0], module(x))
        assert small.run((x,))[0].shape == (x.shape[0], 4)
    data, record = export(small)
    assert record["checks"]["ort_parity"]["passed"]
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0].shape
    assert isinstance(declared[0], str) and isinstance(declared[1], str) and declared[2] == 40
    g = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 40), (2, 5, 40), (3, 137, 40), (1, 2048, 40)]:  # the spec's time range, odd sizes
        x = torch.randn(shape, generator=g)
        (got,) = session.run(None, {"features": x.numpy()})
        assert np.abs(got - small.run((x,))[0].numpy()).max() < 1e-4, shape


def _table(analysis):
    return [(g.name, g.kind, g.size, g.prunable) for g in analysis.groups]


def test_channel_groups():
    analysis = analyse(new_model("mobilenet", seed=0))
    print(describe_groups(analysis))
    expand = [f"blocks.{i}.expand.0" for i in range(7)]
    assert _table(analysis) == [
        ("stem.0", "residual", 16, True),  # stem + block 0's projection (x + block(x))
        (expand[0], "conv", 64, True), (expand[1], "conv", 64, True),
        ("blocks.1.project.0", "residual", 24, True),
        (expand[2], "conv", 96, True), (expand[3], "conv", 96, True),
        ("blocks.3.project.0", "residual", 48, True),
        (expand[4], "conv", 192, True), (expand[5], "conv", 192, True),
        ("blocks.5.project.0", "residual", 96, True),
        (expand[6], "conv", 384, True),
        ("head.0", "conv", 256, True),
        ("classifier", "hidden", 4, False),  # the logits: the model's output
    ]
    for i, name in enumerate(expand):  # hidden channels: expand -> BN -> depthwise -> BN -> project
        g = analysis.group(name)
        assert g.producers == [name] and g.consumers == [f"blocks.{i}.project.0"]
        assert g.per_channel == [f"blocks.{i}.expand.1", f"blocks.{i}.depthwise.0", f"blocks.{i}.depthwise.1"]
        assert g.zero_exact
    stage = analysis.group("blocks.1.project.0")  # a residual pair: both projections, read by the next expands
    assert stage.producers == ["blocks.1.project.0", "blocks.2.project.0"]
    assert stage.consumers == ["blocks.2.expand.0", "blocks.3.expand.0"]
    assert analysis.group("classifier").reasons[0].startswith("reaches the model output")

    # expand_ratio 1 (the paper's first block): no expand conv, the depthwise conv follows the stem's channels
    ratio1 = analyse(new_model("mobilenet", {**SMALL, "expand_ratio": 1}, seed=0))
    assert [(g.name, g.kind, g.size) for g in ratio1.prunable] == [
        ("stem.0", "residual", 16), ("blocks.1.project.0", "residual", 32), ("head.0", "conv", 64)]
    assert "blocks.0.depthwise.0" in ratio1.group("stem.0").per_channel


def test_batchnorm_fold_exact(small):
    before = small.digest()
    folded, records = PassManager([FoldBatchNorm()])(small)
    assert small.digest() == before, "the pass mutated its input"
    assert records[0]["modified"] and "folded 11 BatchNorm" in records[0]["summary"]
    check = records[0]["checks"]["equivalence"]
    assert check["passed"] and check["rel_error"] <= 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.gm.modules())
    assert sum(isinstance(m, nn.ReLU6) for m in folded.gm.modules()) == 8  # stem, 2 per block, head
    assert folded.param_count() < small.param_count()
    x = small.spec.sample(7, alt=True)
    torch.testing.assert_close(folded.run(x)[0], small.run(x)[0], rtol=0, atol=1e-5)


def test_scaffolds_fold_exactly(small):
    for scaffold, kind in ((edgec.scaffold_ternary, "sttn"), (edgec.scaffold_binary, "binary")):
        scaffolded, report = scaffold(small)
        # the 10 convs after the stem, depthwise ones included; the stem and the classifier stay fp32
        assert report.scaffolds == 10 and {s["layer"] for s in report.skipped} == {"stem.0", "classifier"}
        assert "(3 grouped/depthwise)" in report.summary
        folded, report = edgec.fold(scaffolded)
        check = report.checks[f"fold.{kind}"]["equivalence"]
        assert check["passed"] and check["max_abs_error"] == 0.0
        assert report.checks["fold.batchnorm"]["equivalence"]["passed"] and not folded.scaffolds()
    with pytest.raises(EdgecError, match="no FFN found"):  # HRF expands FFNs; a CNN has none
        edgec.scaffold_hrf(small)


def test_one_shot_prune_to_latency(small, tmp_path):
    model = small
    digest = model.digest()
    pruned, result = edgec.prune_to_latency(model, **FAST_PRUNE)
    assert model.digest() == digest
    assert result.mode == "one-shot" and result.measured_ms <= result.local_budget_ms
    assert pruned.param_count() < model.param_count()
    before, after = analyse(model), analyse(pruned)
    sizes = {g.name: g.size for g in before.groups}
    # same groups, none larger, some cut; the kept expand widths are what the pruned convs hold
    assert [g.name for g in after.groups] == [g.name for g in before.groups]
    assert all(g.size <= sizes[g.name] for g in after.groups)
    assert any(g.size < sizes[g.name] for g in after.groups)
    for g in after.groups[:-1]:
        assert all(pruned.gm.get_submodule(p).out_channels == g.size for p in g.producers), g.name
    # the config alone rebuilds the pruned architecture
    rebuilt = build_from_config("mobilenet", pruned.config)
    shapes = {k: v.shape for k, v in pruned.gm.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.gm.state_dict().items()} == shapes

    out = tmp_path / "pruned.onnx"
    exported = edgec.export(pruned, out)
    assert exported.checks["ort_parity"]["passed"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 61, 40, generator=torch.Generator().manual_seed(2))
    (got,) = session.run(None, {"features": x.numpy()})
    assert np.abs(got - pruned.run((x,))[0].numpy()).max() < 1e-4
