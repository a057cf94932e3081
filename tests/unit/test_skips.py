"""Nothing silent: scaffolds, folds and prune report what they skipped, with the reason; ``strict`` refuses.

Plain torch modules traced with ``edgec.core.graph.trace``; the API is fed the Model through a patched
``load`` so that no checkpoint of a user class has to be resolved.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import edgec.app.api as api
from edgec.analysis.groups import analyse
from edgec.app.render import console, fold_view, prune_table, scaffold_table
from edgec.core.errors import EdgecError
from edgec.core.graph import Model, trace
from edgec.core.options import FoldOptions, PruneOptions, ScaffoldHrfOptions, ScaffoldTernaryOptions
from edgec.core.pass_manager import PassManager, PreconditionError
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.passes.bnfold import FoldBatchNorm
from edgec.passes.hrf import HRFScaffold
from edgec.passes.sttn import STTNScaffold
from edgec.prune.run import skipped_groups

TOKENS = InputSpec((TensorSpec("idx", (Dim("batch", 2, 3), Dim("time", 5, 7)), dtype="int64", high=50),))
FRAMES = InputSpec((TensorSpec("x", (Dim("batch", 2, 3), Dim("time", 5, 7), 8)),))


class Tagger(nn.Module):
    """Embedding → LSTM → four Linears (the middle two quantizable) → a matmul with a bare parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.proj = nn.Linear(16, 16)
        self.mid = nn.Linear(16, 16)
        self.out = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.head = nn.Linear(16, 4)

    def forward(self, idx):
        x, _ = self.lstm(self.emb(idx))
        x = self.out(torch.relu(self.mid(torch.relu(self.proj(x))))) @ self.w
        return self.head(x).mean(1)


def model_of(module: nn.Module, spec: InputSpec, arch: str = "test:user") -> Model:
    torch.manual_seed(0)
    return Model(trace(module.eval()), arch, {}, spec)


@pytest.fixture
def api_model(monkeypatch):
    """``api.load`` returns the given Model (a fresh clone per call)."""

    def use(model: Model):
        monkeypatch.setattr(api, "load", lambda *a, **k: model.clone())

    return use


def by_layer(skipped: list[dict]) -> dict[str, str]:
    return {s["layer"]: s["reason"] for s in skipped}


def test_ternary_reports_embedding_lstm_first_last_and_functional_weights():
    torch.manual_seed(0)
    model = model_of(Tagger(), TOKENS)
    out, records = PassManager([STTNScaffold()])(model)
    rec = records[0]
    # proj reads the LSTM's output, not the model input: the first layer is the embedding (fp32), so proj
    # is quantized and only the head is kept by --keep-first-last
    assert sorted(n for n, _ in out.scaffolds()) == ["mid", "out", "proj"]
    skipped = by_layer(rec["skipped"])
    assert list(skipped) == ["emb", "lstm", "w", "head"]  # graph order
    assert skipped["emb"].startswith("nn.Embedding lookup table")
    assert skipped["lstm"].startswith("recurrent layer nn.LSTM")
    first = rec["checks"]["selection"]["first_layer"]
    assert first["layer"] == "proj" and not first["kept"] and first["reason"].startswith("emb (nn.Embedding) runs")
    assert skipped["head"] == "last linear layer kept fp32 (--keep-first-last)"
    assert "functional op" in skipped["w"]
    assert rec["summary"].endswith("; 3 changed, 4 skipped")
    # the record: skipped right after summary, and it is in the artifact's provenance
    keys = list(rec)
    assert keys[keys.index("summary") + 1] == "skipped"
    assert out.provenance[-1]["skipped"] == rec["skipped"]


def test_include_exclude_and_tied_reasons():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = (nn.Linear(8, 8) for _ in range(4))
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x)))).mean(1)

    model = model_of(Tied(), FRAMES)
    res = STTNScaffold(keep_first_last=False, exclude=["d"])(model)
    assert [n for n, _ in res.model.scaffolds()] == ["c"]
    skipped = by_layer(res.skipped)
    assert skipped["a"] == "weight shared with b (tied parameters); kept fp32"
    assert skipped["b"] == "weight shared with a (tied parameters); kept fp32"
    assert skipped["d"] == "excluded by --exclude 'd'"
    res = STTNScaffold(keep_first_last=False, include=["d"])(model)
    assert by_layer(res.skipped)["c"] == "not matched by --include ['d']"


def test_nothing_to_scaffold_names_the_skips():
    class OnlyOpaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, idx):
            return self.head(self.emb(idx)).mean(1)

    with pytest.raises(PreconditionError, match=r"nothing to scaffold .*skipped: emb: nn.Embedding lookup table.*"
                                                r"head: last linear layer kept fp32"):
        STTNScaffold()(model_of(OnlyOpaque(), TOKENS))


def test_api_scaffold_strict_exits_2_and_writes_nothing(api_model, tmp_path):
    api_model(model_of(Tagger(), TOKENS))
    out = tmp_path / "t.pt"
    res = api.scaffold_ternary(tmp_path / "in.pt", out, ScaffoldTernaryOptions())
    assert [s["layer"] for s in res.skipped] == ["emb", "lstm", "w", "head"]
    assert res.to_dict()["skipped"] == res.skipped and out.exists()
    # the checkpoint on disk records the skips (a plain-container file)
    stored = torch.load(out, weights_only=True)["provenance"][-1]
    assert stored["pass"] == "scaffold.sttn" and stored["skipped"] == res.skipped
    strict_out = tmp_path / "strict.pt"
    with pytest.raises(EdgecError) as err:
        api.scaffold_ternary(tmp_path / "in.pt", strict_out, ScaffoldTernaryOptions(strict=True))
    assert err.value.exit_code == 2
    msg = str(err.value)
    # the head is kept fp32 by --keep-first-last (deliberate): only the 3 the pass cannot handle count
    assert msg.startswith("scaffold.sttn could not handle 3 layer(s) and --strict is set: emb: nn.Embedding")
    assert "nothing written" in msg and "head" not in msg
    assert [s["deliberate"] for s in res.skipped] == [False, False, False, True]
    assert not strict_out.exists()
    # excluding them acknowledges them: --strict then passes
    ok = api.scaffold_ternary(tmp_path / "in.pt", strict_out,
                              ScaffoldTernaryOptions(strict=True, exclude=["emb", "lstm", "w"]))
    assert len(ok.skipped) == 4 and all(s["deliberate"] for s in ok.skipped) and strict_out.exists()
    with console.capture() as cap:
        console.print(scaffold_table(res.to_dict()))
    text = cap.get()
    assert "skipped: 4 layer(s) left unchanged" in text and "3 changed, 4 skipped" in text


class Heads(nn.Module):
    """No FFN: a shared Linear called twice before an activation, and a Linear → ReLU → Linear head that maps
    16 → 32 → 3, plus a stock encoder layer that fx leaves opaque."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.fc = nn.Linear(8, 32)
        self.cls = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.shared(x)) + torch.relu(self.shared(x))
        x = self.enc(x)
        return self.cls(torch.relu(self.fc(x))).mean(1)


def test_hrf_without_ffn_says_why(api_model, tmp_path):
    model = model_of(Heads(), FRAMES)
    with pytest.raises(PreconditionError) as err:
        HRFScaffold()(model)
    msg = str(err.value)
    assert msg.startswith("no FFN found (Linear → activation → Linear) in test:user: rejected shared: Linear "
                          "module called 2 times (shared)")
    assert "enc: TransformerEncoderLayer is one opaque module; HRF cannot see the FFN(s) inside it" in msg
    assert "fc: Linear → activation → cls maps 8 → 32 → 3, not back to the input width 8" in msg
    api_model(model)
    with pytest.raises(EdgecError, match="no FFN found"):
        api.scaffold_hrf(tmp_path / "in.pt", tmp_path / "o.pt", ScaffoldHrfOptions())
    assert not (tmp_path / "o.pt").exists()


def test_hrf_reports_rejected_candidates_next_to_ffns(api_model, tmp_path):
    class FFNAndHead(Heads):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            x = x + self.w2(torch.relu(self.w1(x)))
            return super().forward(x)

    api_model(model_of(FFNAndHead(), FRAMES))
    res = api.scaffold_hrf(tmp_path / "in.pt", tmp_path / "o.pt", ScaffoldHrfOptions(exclude=["nothing"]))
    assert res.scaffolds == 1 and list(by_layer(res.skipped)) == ["shared", "enc", "fc"]
    assert res.summary.endswith("; 1 changed, 3 skipped")
    with pytest.raises(EdgecError, match=r"^scaffold.hrf could not handle 2 layer\(s\) and --strict is set: shared: "):
        api.scaffold_hrf(tmp_path / "in.pt", tmp_path / "s.pt", ScaffoldHrfOptions(strict=True))
    assert not (tmp_path / "s.pt").exists()


class BNs(nn.Module):
    """BatchNorm on a ReLU output (not foldable), after a conv whose output is also used elsewhere (not
    foldable), and after a conv that feeds only it (folded)."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm1d(8)
        self.conv_a, self.bn_a = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)
        self.conv_b, self.bn_b = nn.Conv1d(8, 8, 3, padding=1), nn.BatchNorm1d(8)

    def forward(self, x):
        x = self.bn_in(torch.relu(x.transpose(1, 2)))
        a = self.conv_a(x)
        x = self.bn_a(a) + a
        return self.bn_b(self.conv_b(x)).mean(-1)


def test_fold_reports_unfoldable_batchnorms(api_model, tmp_path):
    model = model_of(BNs(), FRAMES)
    res = FoldBatchNorm()(model)
    assert res.modified and [n for n, m in res.model.gm.named_modules() if isinstance(m, nn.BatchNorm1d)] == [
        "bn_in", "bn_a"]
    skipped = by_layer(res.skipped)
    assert skipped == {
        "bn_in": "BatchNorm not folded: its input is 'relu' (relu), not a Conv/Linear output",
        "bn_a": "BatchNorm not folded: the output of 'conv_a' also feeds add; folding would change that use"}
    assert res.summary.endswith("1 changed, 2 skipped")

    api_model(model)
    fres = api.fold(tmp_path / "in.pt", tmp_path / "f.pt", FoldOptions())
    assert fres.folded and by_layer(fres.skipped) == skipped
    assert torch.load(tmp_path / "f.pt", weights_only=True)["provenance"][-1]["skipped"] == fres.skipped
    with console.capture() as cap:
        console.print(fold_view(fres.to_dict()))
    assert "skipped: 2 layer(s) left unchanged" in cap.get() and "bn_in" in cap.get()
    with pytest.raises(EdgecError, match=r"^fold could not handle 2 layer\(s\) and --strict is set: bn_in: ") as err:
        api.fold(tmp_path / "in.pt", tmp_path / "strict.pt", FoldOptions(strict=True))
    assert err.value.exit_code == 2 and not (tmp_path / "strict.pt").exists()


def test_fold_noop_with_skips_is_recorded():
    class Lone(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(8, track_running_stats=False)

        def forward(self, x):
            return self.bn(x.transpose(1, 2)).mean(-1)

    out, records = PassManager([FoldBatchNorm()])(model_of(Lone(), FRAMES))
    assert not records[0]["modified"] and records[0]["skipped"] == [
        {"layer": "bn", "reason": "BatchNorm not folded: no running statistics (track_running_stats=False): it "
                                  "normalises with batch statistics", "deliberate": False}]
    assert out.provenance == [records[0]]  # a no-op that skipped something is part of the history


class MLP(nn.Module):
    """fc0's hidden units are prunable; fc1's are pinned by a LayerNorm; fc2's by the model output."""

    def __init__(self):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(torch.relu(self.fc0(x))))).mean(1)


def _fake_table(curves: dict):
    """What ``skipped_groups`` reads of a LatencyModel: channel curves (densities, ms) per unit."""
    def unit_ms(unit, density, pattern="channel"):
        xs, ys = curves[unit]["channel"]
        return ys[xs.index(density)]

    return SimpleNamespace(curves=curves, unit_ms=unit_ms)


def test_prune_skipped_groups_and_render():
    model = model_of(MLP(), FRAMES)
    analysis = analyse(model)
    assert [(g.name, g.prunable) for g in analysis.groups] == [("fc0", True), ("fc1", False), ("fc2", False)]
    groups = [analysis.group("fc0")]
    pays = _fake_table({"fc0": {"channel": ([0.5, 1.0], [0.6, 1.0])}})
    flat = _fake_table({"fc0": {"channel": ([0.5, 1.0], [1.0, 1.0])}})
    skipped = skipped_groups(analysis, groups, pays)
    assert [s["layer"] for s in skipped] == ["fc1"]  # fc2: only the model output pins it, not a skip
    assert skipped[0]["reason"].startswith("not prunable: LayerNorm")
    assert by_layer(skipped_groups(analysis, groups, flat))["fc0"] == (
        "the latency table measures no saving (1 ms dense, 1 ms at density 0.5); kept dense")
    assert "fc0" not in by_layer(skipped_groups(analysis, groups, flat, min_density=0.75))  # nothing measured
    assert by_layer(skipped_groups(analysis, [], pays))["fc0"] == "the latency table has no entry for this group"
    res = {"output": "o.pt", "mode": "one-shot", "pattern": "channel", "pattern_chosen": "channel", "budget_ms": 1.0, "local_budget_ms": 1.0, "budget_from": "ms",
           "dense_ms": 2.0, "estimated_ms": 1.0, "model_error": 0.0, "measured_ms": 1.0, "speedup": 2.0,
           "params_before": 10, "params_after": 5, "before": {"params": 10}, "params": 5, "flop_reduction": 2.0,
           "retries": 0, "densities": {"fc0": 0.5, "fc1": 1.0}, "notes": [], "skipped": skipped}
    with console.capture() as cap:
        console.print(prune_table(res))
    assert "1 changed, 1 skipped" in cap.get() and "skipped: 1 group(s) left unchanged" in cap.get()


def test_prune_strict_refuses_before_pruning():
    from edgec.prune.run import prune_model

    fast = {"warmup": 1, "repeats": 3, "min_seconds": 0.0}
    opts = PruneOptions(latency_ratio=0.9, strict=True, densities=[0.5, 1.0], measure_options=fast,
                        profile_options=dict(fast, rounds=1, dense_repeats=3, dense_min_seconds=0.0))
    said = []
    # fc0 may be kept dense because the table measures no saving there: deliberate, so not counted
    with pytest.raises(EdgecError, match=r"^prune could not handle 1 layer\(s\) and --strict is set: ") as err:
        prune_model(model_of(MLP(), FRAMES), opts, progress=said.append)
    assert "fc1: not prunable: LayerNorm" in str(err.value) and err.value.exit_code == 2
    assert any("channel group(s) stay dense" in m for m in said)
    assert not any(m.startswith("attempt") for m in said)  # refused before any pruning attempt
