"""Zoo speechformer: statistical windows from durations, windowed attention equal to the slow per-position
computation, fx trace and dynamic-length ONNX export equal to eager, HRF in every FFN, ternary/binary folds
and an INT2 export with onnxruntime parity, deterministic construction."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.graph import max_error, trace
from edgec.core.pass_manager import PassManager
from edgec.layers.binary import BinaryLayer, binary_aux_loss
from edgec.layers.hrf import HRFExpand
from edgec.layers.lowbit import LowBitLinear
from edgec.models import build, full_config
from edgec.models.blocks import MultiHeadSelfAttention
from edgec.models.checkpoint import new_model
from edgec.models.speechformer import SpeechFormer, WindowedSelfAttention, window_statistics
from edgec.onnx.export import export
from edgec.onnx.session import create_session
from edgec.passes.binary import BinaryScaffold, FoldBinary
from edgec.passes.dlt import DLTScaffold, FoldDLT
from edgec.passes.hrf import FoldHRF, HRFScaffold, find_ffns
from edgec.passes.sttn import FoldSTTN, STTNScaffold

pytestmark = pytest.mark.usefixtures("one_thread")

# a small config with the default's structure (four stages, windows 5/9/9, merges 5/5/4); one layer per stage
SMALL = {"dims": [16, 24, 32, 40], "depths": [1, 1, 1, 1], "num_heads": 2}
N_STAGES = 4


@pytest.fixture(scope="module")
def small():
    return new_model("speechformer", SMALL, seed=0)


def test_statistics_from_durations():
    model = build("speechformer", full_config("speechformer"))
    # 10 ms hop: 50/250/1000 ms tokens and 50/400/2000 ms windows -> merges 5, 5, 4; windows 5, 8->9, 8->9
    assert model.merge_scales == (5, 5, 4) and model.windows == (5, 9, 9, None)
    # 20 ms hop (wav2vec-style features): frames 2, 12, 50 and 2, 20, 100 -> merges 2, 6, 4; windows 3, 11, 9
    assert window_statistics(20, [50, 250, 1000], [50, 400, 2000]) == ([2, 6, 4], [3, 11, 9])
    with pytest.raises(ValueError, match="below one token"):
        window_statistics(10, [50, 20, 1000], [50, 400, 2000])
    with pytest.raises(ValueError, match="one window per merge"):
        window_statistics(10, [50, 250], [50, 400, 2000])
    with pytest.raises(ValueError, match="len\\(dims\\)"):
        SpeechFormer(dims=[16, 16], depths=[1, 1])
    with pytest.raises(ValueError, match="odd"):
        WindowedSelfAttention(16, 2, 0.0, 4)


def slow_window_attention(attn: MultiHeadSelfAttention, x: torch.Tensor, window: int | None) -> torch.Tensor:
    """Per position and head: softmax over the keys j with |i - j| <= window // 2 that exist, in float64."""
    b, t, d = x.shape
    h, dh = attn.num_heads, attn.head_dim
    lin = {n: (getattr(attn, n).weight.double(), getattr(attn, n).bias.double()) for n in
           ("q_proj", "k_proj", "v_proj", "out_proj")}
    xd = x.double()
    q, k, v = (F.linear(xd, *lin[n]).view(b, t, h, dh) for n in ("q_proj", "k_proj", "v_proj"))
    out = torch.zeros(b, t, h, dh, dtype=torch.float64)
    r = t if window is None else window // 2
    for i in range(t):
        lo, hi = max(0, i - r), min(t, i + r + 1)
        for head in range(h):
            s = (k[:, lo:hi, head] @ q[:, i, head].unsqueeze(-1)).squeeze(-1) / math.sqrt(dh)  # (b, keys)
            out[:, i, head] = (torch.softmax(s, -1).unsqueeze(-1) * v[:, lo:hi, head]).sum(1)
    return F.linear(out.reshape(b, t, d), *lin["out_proj"])


@pytest.mark.parametrize("window", [1, 5, 9, 31, None])
def test_window_attention_equals_slow_per_position(window):
    torch.manual_seed(0)
    attn = WindowedSelfAttention(16, 2, 0.1, window).eval()
    for t in (13, 1, 4):
        x = torch.randn(2, t, 16)
        with torch.no_grad():
            got = attn(x)
            torch.testing.assert_close(got.double(), slow_window_attention(attn, x, window), rtol=0, atol=1e-5)
            traced = trace(attn)(x)
        assert torch.equal(traced, got)
    if window == 5:  # a restricted window really differs from full attention
        full = MultiHeadSelfAttention(16, 2, 0.1).eval()
        full.load_state_dict(attn.state_dict())
        x = torch.randn(1, 13, 16)
        with torch.no_grad():
            assert float((full(x) - attn(x)).abs().max()) > 1e-3


def test_trace_equals_eager_at_lengths_not_divisible_by_the_merges():
    model = build("speechformer", full_config("speechformer")).eval()
    gm = trace(model)
    g = torch.Generator().manual_seed(1)
    # 200 = 5*5*4*2; 137 divides by none of 5, 25, 100; 1 and 7 leave a single token after the first merges
    for shape in ((2, 200, 40), (3, 137, 40), (1, 1, 40), (2, 7, 40)):
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            want = model(x)
            got = gm(x)
        assert want.shape == (shape[0], 4) and torch.isfinite(want).all()
        assert torch.equal(want, got), shape
    n = sum(p.numel() for p in model.parameters())
    assert 150_000 <= n <= 400_000, n
    spec = model.input_spec()
    assert spec.task == "classification" and spec.outputs == ("logits",)
    assert spec.inputs[0].dims[1].min == 1
    reg = build("speechformer", full_config("speechformer", {"num_classes": 1}))
    assert reg.input_spec().task == "regression"


def test_export_dynamic_time_matches_torch(small):
    data, record = export(small)
    assert record["checks"]["ort_parity"]["passed"]
    sess = create_session(data)
    assert isinstance(sess.get_inputs()[0].shape[1], str)  # the time axis is symbolic
    g = torch.Generator().manual_seed(2)
    for shape in ((2, 200, 40), (1, 137, 40), (1, 3, 40)):
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            want = small.gm(x).numpy()
        (got,) = sess.run(None, {"features": x.numpy()})
        assert got.shape == want.shape and float(np.abs(got - want).max()) < 1e-4, shape


def _perturb(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.gm.named_parameters():
            if "_hrf." in name or ".linear1." in name:
                p.add_(torch.randn(p.shape, generator=g) * scale * float(p.std()))


def test_hrf_in_every_ffn_and_fold_exact(small):
    ffns = find_ffns(small)
    assert len(ffns) == N_STAGES  # one FFN per layer; the head is a single Linear, not an FFN
    scaf = HRFScaffold()(small).model
    hrfs = dict(scaf.scaffolds())
    assert sorted(hrfs) == [f"stages.{s}.0.ffn.linear1_hrf" for s in range(N_STAGES)]
    assert all(isinstance(m, HRFExpand) and m.out_features == 4 * m.in_features for m in hrfs.values())
    for node in scaf.gm.graph.nodes:  # H feeds exactly the FFN's first Linear
        if node.op == "call_module" and node.target in hrfs:
            (user,) = node.users
            assert user.target == node.target.removesuffix("_hrf")
    _perturb(scaf)
    inputs = small.spec.sample(0)
    assert max_error(small.run(inputs), scaf.run(inputs))["rel_error"] > 1e-3
    fold = FoldHRF()(scaf)
    eq = fold.checks["equivalence"]
    assert eq["passed"] and eq["rel_error"] <= 1e-5, eq
    folded = fold.model
    assert folded.scaffolds() == [] and folded.gm.code == small.gm.code
    assert folded.param_count() == small.param_count()
    alt = small.spec.sample(1, alt=True)
    assert max_error(scaf.run(alt), folded.run(alt))["rel_error"] <= 1e-5


def _train(model, steps=3):
    gm = model.gm.train()
    opt = torch.optim.SGD([p for _, m in model.scaffolds() for p in m.parameters()], lr=0.2)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        out = gm(*model.spec.sample(seed=100 + i))
        loss = F.cross_entropy(out, torch.randint(0, out.shape[-1], out.shape[:1], generator=g))
        if any(isinstance(m, BinaryLayer) for m in gm.modules()):
            loss = loss + binary_aux_loss(gm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()


LINEARS = [f"stages.{s}.0.{p}" for s in range(N_STAGES) for p in
           ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj", "ffn.linear1", "ffn.linear2")]
MERGES = [f"merges.{m}.proj" for m in range(N_STAGES - 1)]


@pytest.mark.parametrize("method", ["sttn", "dlt", "binary"])
def test_lowbit_scaffold_fold_exact_first_and_head_fp32(method, small):
    scaffold_cls, fold_cls = {"sttn": (STTNScaffold, FoldSTTN), "dlt": (DLTScaffold, FoldDLT),
                              "binary": (BinaryScaffold, FoldBinary)}[method]
    params = {"group_size": 8} if method == "dlt" else {}
    scaf, (rec,) = PassManager([scaffold_cls(**params)])(small)
    names = sorted(n for n, _ in scaf.scaffolds())
    assert names == sorted(LINEARS + MERGES)  # the embedding (first layer) and the classifier stay fp32
    assert type(scaf.gm.get_submodule("embed")) is nn.Linear and type(scaf.gm.get_submodule("classifier")) is nn.Linear
    _train(scaf)
    folded, (frec,) = PassManager([fold_cls()])(scaf)
    eq = frec["checks"]["equivalence"]
    assert eq["passed"] and eq["rel_error"] <= 1e-5, eq
    assert sorted(n for n, m in folded.gm.named_modules() if isinstance(m, LowBitLinear)) == names
    for seed, alt in ((3, False), (4, True)):
        inputs = small.spec.sample(seed, alt=alt)
        assert max_error(scaf.run(inputs), folded.run(inputs))["rel_error"] <= 1e-5


def test_int2_export_of_mixed_lowbit_matches_torch(small):
    """DLT on attention, STTN on the FFN input projections, binary on the FFN outputs and merges: one INT2 file;
    onnxruntime equals the folded torch model at two lengths (dynamic time)."""
    passes = [DLTScaffold(group_size=8, include=["*.attn.*"]), STTNScaffold(include=["*.ffn.linear1"]),
              BinaryScaffold(include=["*.ffn.linear2", "merges.*"])]
    scaf, _ = PassManager(passes)(small)
    _train(scaf, steps=2)
    folded, records = PassManager([FoldDLT(), FoldSTTN(), FoldBinary()])(scaf)
    assert all(r["checks"]["equivalence"]["rel_error"] <= 1e-5 for r in records)
    assert sorted({m.bits for m in folded.gm.modules() if isinstance(m, LowBitLinear)}) == [1, 2]
    data, record = export(folded, weights="int2", forms="cast")
    assert record["params"]["weights"] == "int2" and record["checks"]["ort_parity"]["passed"]
    sess = create_session(data)
    g = torch.Generator().manual_seed(5)
    for shape in ((1, 163, 40), (2, 48, 40)):
        x = torch.randn(shape, generator=g)
        with torch.no_grad():
            want = folded.gm(x).numpy()
        (got,) = sess.run(None, {"features": x.numpy()})
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-4 * max(1.0, float(np.abs(want).max())), shape


def test_deterministic_construction():
    a, b = new_model("speechformer", SMALL, seed=7), new_model("speechformer", SMALL, seed=7)
    assert a.digest() == b.digest()
    assert new_model("speechformer", SMALL, seed=8).digest() != a.digest()
    torch.manual_seed(7)
    sa = SpeechFormer(**full_config("speechformer", SMALL)).state_dict()
    torch.manual_seed(7)
    sb = build("speechformer", full_config("speechformer", SMALL)).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_prune_groups_heads_and_ffn_per_layer_and_pruned_is_mask_equivalent(small, monkeypatch):
    """Windowed attention prunes by whole heads (the band mask carries no channels); each FFN by hidden units;
    each stage's residual stream is coupled and stays dense (post-LN LayerNorms)."""
    import edgec.core.pass_manager
    from edgec.analysis.groups import analyse, zero_channels
    from edgec.passes.prune_channels import PruneChannels

    monkeypatch.setitem(edgec.core.pass_manager.PASSES, "prune.channels", "edgec.passes.prune_channels:PruneChannels")
    analysis = analyse(small)
    heads, ffn = {}, {}
    for g in analysis.prunable:
        (heads if g.kind == "heads" else ffn)[g.name] = (g.kind, g.size)
    assert heads == {f"stages.{s}.0.attn.q_proj": ("heads", 2) for s in range(N_STAGES)}
    assert ffn == {f"stages.{s}.0.ffn.linear1": ("hidden", 2 * d) for s, d in enumerate(SMALL["dims"])}
    found = {g.name: g for g in analysis.groups}
    for name in ("embed", *MERGES):
        assert not found[name].prunable and "LayerNorm" in found[name].reasons[0], found[name].reasons
    assert "model output" in found["classifier"].reasons[0]
    keep = {f"stages.{s}.0.attn.q_proj": [1] for s in range(N_STAGES)}
    keep.update({f"stages.{s}.0.ffn.linear1": list(range(0, 2 * d, 3)) for s, d in enumerate(SMALL["dims"])})
    pruned, (rec,) = PassManager([PruneChannels(keep=keep)])(small)
    assert rec["checks"]["mask_equivalence"]["passed"], rec["checks"]
    assert pruned.param_count() < 0.8 * small.param_count()
    masked = zero_channels(small, keep)
    for alt in (False, True):
        x = small.spec.sample(seed=6, alt=alt)
        assert max_error(masked.run(x), pruned.run(x))["rel_error"] <= 1e-5
        assert max_error(small.run(x), masked.run(x))["max_abs_error"] > 1e-4
    assert pruned.gm.get_submodule("stages.0.0.attn.q_proj").out_features == SMALL["dims"][0] // 2
