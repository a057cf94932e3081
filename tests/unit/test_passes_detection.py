"""Every pass on detection and window-attention models (issue 14 item 4): the output-head rule of the low-bit
scaffolds (keep_first_last keeps the first layer and the head of every output), and channel groups across
window-major reshapes, a C2f projector (split/chunk + concat) and deformable attention (grid_sample), on
stand-in modules written the way users write them and on the zoo's lwdetr and speechformer."""
from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgec.analysis.groups import analyse
from edgec.core.pass_manager import PassManager
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.data.bundle import DataBundle
from edgec.models.checkpoint import load_checkpoint, model_from_module, new_model, save_checkpoint
from edgec.onnx.export import export
from edgec.passes.dlt import DLTScaffold, FoldDLT
from edgec.passes.lowbit_common import select_layers
from edgec.passes.prune_channels import PruneChannels
from edgec.passes.sttn import FoldSTTN, STTNScaffold
from edgec.prune import alcs
from edgec.prune.sensitivity import taylor_scores
from edgec.train.loop import preflight

pytestmark = pytest.mark.usefixtures("one_thread")

LWDETR = {"image_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_blocks": [1], "out_indices": [1],
          "dim": 32, "decoder_layers": 2, "decoder_heads": 2, "decoder_ffn": 64, "num_queries": 10, "groups": 2}
SPEECHFORMER = {"dims": [16, 16, 24, 24], "depths": [1, 1, 1, 1], "num_heads": 2}

class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.k(x).view(B, N, self.heads, -1).transpose(1, 2)
        v = self.v(x).view(B, N, self.heads, -1).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.window = window
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):  # x: [B * windows, tokens per window, C] (window-major)
        if not self.window:  # global: attend across windows without permuting back
            Bw, N, C = x.shape
            h = self.attn(self.norm1(x).reshape(-1, 4 * N, C)).reshape(Bw, N, C)
        else:
            h = self.attn(self.norm1(x))
        x = x + h
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class WindowViT(nn.Module):
    """Patch embed, one window partition (2x2 windows), window/global blocks, back to a map."""

    def __init__(self, dim=16, heads=2, patch=4, size=32):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.grid = size // patch
        self.blocks = nn.ModuleList([Block(dim, heads, w) for w in (True, False)])

    def forward(self, img):
        x = self.patch(img)
        B, C, H, W = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B, 2, H // 2, 2, W // 2, C)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * 4, (H // 2) * (W // 2), C)
        for b in self.blocks:
            x = b(x)
        x = x.reshape(B, 2, 2, H // 2, W // 2, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        return x


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = ConvBN(c, c, 3), ConvBN(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    def __init__(self, cin, cout, n=1, mode="chunk"):
        super().__init__()
        self.c, self.mode = cout // 2, mode
        self.cv1 = ConvBN(cin, 2 * self.c)
        self.m = nn.ModuleList(Bottleneck(self.c) for _ in range(n))
        self.cv2 = ConvBN((2 + n) * self.c, cout)

    def forward(self, x):
        if self.mode == "chunk":
            a, b = self.cv1(x).chunk(2, 1)
        elif self.mode == "split":
            a, b = self.cv1(x).split((self.c, self.c), 1)
        else:
            y = self.cv1(x)
            a, b = y[:, :self.c], y[:, self.c:]
        y = [a, b]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class Projector(nn.Module):
    """Multi-level features (concatenated) -> C2f -> LayerNorm-free output map."""

    def __init__(self, cin=32, cout=16, mode="chunk"):
        super().__init__()
        self.c2f = C2f(cin, cout, n=1, mode=mode)

    def forward(self, f1, f2):
        return self.c2f(torch.cat([f1, f2], 1))


class DeformAttn(nn.Module):
    """Single-level deformable cross-attention written with grid_sample (Deformable DETR style)."""

    def __init__(self, dim=16, heads=2, points=4):
        super().__init__()
        self.h, self.p = heads, points
        self.sampling_offsets = nn.Linear(dim, heads * points * 2)
        self.attention_weights = nn.Linear(dim, heads * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, query, ref, value, H, W):  # query [B, Q, C], ref [B, Q, 2] in [0,1], value [B, H*W, C]
        B, Q, C = query.shape
        v = self.value_proj(value).view(B, H * W, self.h, -1)
        v = v.permute(0, 2, 3, 1).reshape(B * self.h, -1, H, W)
        off = self.sampling_offsets(query).view(B, Q, self.h, self.p, 2)
        w = self.attention_weights(query).view(B, Q, self.h, self.p).softmax(-1)
        loc = ref[:, :, None, None, :] + off / torch.tensor([W, H], dtype=query.dtype)
        grid = (2 * loc - 1).transpose(1, 2).reshape(B * self.h, Q, self.p, 2)
        s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [B*h, d, Q, P]
        w = w.transpose(1, 2).reshape(B * self.h, 1, Q, self.p)
        out = (s * w).sum(-1).view(B, -1, Q).transpose(1, 2)
        return self.output_proj(out)


class TinyDetector(nn.Module):
    """Backbone conv map -> C2f projector -> queries with deformable cross-attention -> (logits, boxes)."""

    def __init__(self, dim=16, queries=5, classes=3, size=32):
        super().__init__()
        self.size = size
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.down = nn.Conv2d(dim, dim, 1)
        self.proj = Projector(2 * dim, dim)
        self.query = nn.Embedding(queries, dim)
        self.ref = nn.Linear(dim, 2)
        self.cross = DeformAttn(dim)
        self.ffn1, self.ffn2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, classes)
        self.box1, self.box2 = nn.Linear(dim, dim), nn.Linear(dim, 4)

    def forward(self, image):
        f = self.stem(image)
        m = self.proj(f, self.down(f))
        B, C, H, W = m.shape
        value = m.flatten(2).transpose(1, 2)
        q = self.query.weight.unsqueeze(0).expand(B, -1, -1)
        ref = self.ref(q).sigmoid()
        q = q + self.cross(q, ref, value, 8, 8)
        q = self.norm(q + self.ffn2(F.relu(self.ffn1(q))))
        return self.class_head(q), self.box2(F.relu(self.box1(q))).sigmoid()


def _build(module: nn.Module, inputs, outputs) -> object:
    spec = InputSpec(tuple(TensorSpec(n, (Dim("batch", 2, 3), *s)) for n, s in inputs), outputs=outputs,
                     task="features")
    return model_from_module(module.eval(), "test:" + type(module).__name__, {}, spec=spec)


@pytest.fixture(scope="module")
def standins():
    torch.manual_seed(0)
    return {
        "vit": _build(WindowViT(), [("img", (3, 32, 32))], ("map",)),
        "c2f_chunk": _build(Projector(mode="chunk"), [("f1", (16, 8, 8)), ("f2", (16, 8, 8))], ("map",)),
        "c2f_split": _build(Projector(mode="split"), [("f1", (16, 8, 8)), ("f2", (16, 8, 8))], ("map",)),
        "c2f_slice": _build(Projector(mode="slice"), [("f1", (16, 8, 8)), ("f2", (16, 8, 8))], ("map",)),
        "det": _build(TinyDetector(), [("image", (3, 32, 32))], ("logits", "boxes")),
    }


@pytest.fixture(scope="module")
def zoo():
    return {"lwdetr": new_model("lwdetr", LWDETR, seed=0), "speechformer": new_model("speechformer", SPEECHFORMER,
                                                                                      seed=0)}


def _params(model) -> int:
    return sum(p.numel() for p in model.gm.parameters())


SEL = {"keep_first_last": True, "include": ["*"], "exclude": [], "first_layer": "input"}

# ------------------------------------------------------------------------------------------- output heads


def test_keep_first_last_keeps_every_output_head(standins, zoo):
    det = select_layers(standins["det"], {**SEL, "last_layer": "heads"}, "t")
    assert det.kept == ["stem", "class_head", "box2"]
    legacy = select_layers(standins["det"], {**SEL, "last_layer": "last-linear"}, "t")
    assert legacy.kept == ["stem", "box2"]  # the old rule: one head quantized
    real = select_layers(zoo["lwdetr"], {**SEL, "last_layer": "heads"}, "t")
    assert real.kept == ["patch_embed", "class_head", "box_heads.1.layers.2"]
    reasons = {s["layer"]: s["reason"] for s in real.skipped}
    assert reasons["class_head"] == "head of model output 0 kept fp32 (--keep-first-last)"
    assert reasons["box_heads.1.layers.2"] == "head of model output 1 kept fp32 (--keep-first-last)"


@pytest.mark.parametrize("arch,config", [("speechformer", SPEECHFORMER), ("resnet", {"base_width": 4}),
                                         ("convtransformer", {"d_model": 16, "num_layers": 1, "ffn_dim": 32,
                                                              "num_heads": 2})])
def test_single_output_models_keep_the_same_layers(arch, config, zoo):
    model = zoo.get(arch) or new_model(arch, config, seed=0)
    heads = select_layers(model, {**SEL, "last_layer": "heads"}, "t")
    old = select_layers(model, {**SEL, "last_layer": "last-linear"}, "t")
    assert heads.kept == old.kept and len(heads.kept) == 2
    assert heads.skipped == old.skipped


def test_an_encoder_with_two_outputs_keeps_both_heads():
    """BERT without a classifier returns (last_hidden_state, pooler_output): the last FFN output projection is
    the head of the first output, the pooler of the second (the old rule kept only the pooler)."""
    bert = new_model("bert", {"hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 32,
                              "num_attention_heads": 2, "num_labels": 0}, seed=0)
    assert select_layers(bert, {**SEL, "last_layer": "heads"}, "t").kept == ["encoder.layer.1.output.dense",
                                                                              "pooler.dense"]
    assert select_layers(bert, {**SEL, "last_layer": "last-linear"}, "t").kept == ["pooler.dense"]


def test_v2_record_replays_with_the_last_linear_rule(zoo, tmp_path):
    """A checkpoint scaffolded before last_layer existed (v2) quantized every head but the last linear layer:
    loading it rebuilds that structure, while a v3 record keeps both heads fp32."""
    new, _ = PassManager([DLTScaffold(group_size=8)])(zoo["lwdetr"])
    assert new.passes[-1]["version"] == 3 and new.passes[-1]["params"]["last_layer"] == "heads"
    assert type(new.gm.get_submodule("box_heads.1.layers.2")) is nn.Linear
    save_checkpoint(new, tmp_path / "v3.pt")
    assert type(load_checkpoint(tmp_path / "v3.pt").gm.get_submodule("box_heads.1.layers.2")) is nn.Linear
    old, _ = PassManager([DLTScaffold(group_size=8, last_layer="last-linear")])(zoo["lwdetr"])
    rec = dict(old.passes[-1])
    rec["version"] = 2
    rec["params"] = {k: v for k, v in rec["params"].items() if k != "last_layer"}
    old.passes[-1] = rec
    save_checkpoint(old, tmp_path / "v2.pt")
    back = load_checkpoint(tmp_path / "v2.pt")
    assert type(back.gm.get_submodule("box_heads.1.layers.2")) is not nn.Linear  # quantized, as it was made
    assert type(back.gm.get_submodule("class_head")) is nn.Linear
    assert len(back.scaffolds()) == len(new.scaffolds()) + 1


@pytest.mark.parametrize("arch", ["lwdetr", "speechformer"])
def test_ternary_folds_are_exact(arch, zoo):
    for scaffold, fold in ((STTNScaffold(), FoldSTTN()), (DLTScaffold(group_size=8), FoldDLT())):
        scaf, _ = PassManager([scaffold])(zoo[arch])
        folded, records = PassManager([fold])(scaf)
        assert records[-1]["checks"]["equivalence"]["rel_error"] <= 1e-5


# ------------------------------------------------------------------------------------------- channel groups

def _groups(model):
    return {g.name: g for g in analyse(model).groups}


def test_window_major_vit_couples_heads_and_blocks_the_residual(standins):
    g = _groups(standins["vit"])
    for b in (0, 1):  # window and global attention: q/k/v rows of a head + proj columns, one unit per head
        heads = g[f"blocks.{b}.attn.q"]
        assert heads.kind == "heads" and heads.prunable and heads.size == 2 and heads.width == 8
        assert heads.producers == [f"blocks.{b}.attn.{p}" for p in "qkv"]
        assert heads.consumers == [f"blocks.{b}.attn.proj"]
        assert g[f"blocks.{b}.fc1"].prunable and g[f"blocks.{b}.fc1"].size == 32
    residual = g["patch"]  # the embedding dim runs through the window partition into every block
    assert residual.kind == "residual" and not residual.prunable
    assert set(residual.producers) >= {"patch", "blocks.0.attn.proj", "blocks.1.fc2"}
    assert any("LayerNorm" in r for r in residual.reasons)


def test_c2f_chunk_and_split_couple_through_the_concat(standins):
    chunk = _groups(standins["c2f_chunk"])["c2f.cv1.conv"]
    # chunk(2): channel i and c+i are one unit (both halves must stay equal), coupled with the bottleneck's
    # residual (second half + m.0.cv2) and both reaching cv2 through the concat
    assert chunk.prunable and chunk.size == 8 and chunk.width == 2
    assert chunk.producers == ["c2f.cv1.conv", "c2f.m.0.cv2.conv"]
    assert chunk.consumers == ["c2f.m.0.cv1.conv", "c2f.cv2.conv"]
    for name in ("c2f_split", "c2f_slice"):  # split sizes / slice bounds are rewritten on pruning
        split = _groups(standins[name])["c2f.cv1.conv"]
        assert split.prunable and split.size == 16 and split.reshapes
        assert split.producers == ["c2f.cv1.conv", "c2f.m.0.cv2.conv"]


def test_deformable_attention_is_blocked_with_reasons(standins, zoo):
    for model, pre in ((standins["det"], "cross."), (zoo["lwdetr"], "decoder.0.cross_attn.")):
        g = _groups(model)
        for name in ("value_proj", "sampling_offsets", "attention_weights"):
            assert not g[pre + name].prunable
            assert any("merges a channel dim with a dynamic dim" in r for r in g[pre + name].reasons)
    ref = _groups(standins["det"])["ref"]
    assert any("reads sampling coordinates" in r for r in ref.reasons)


def test_lwdetr_groups(zoo):
    g = _groups(zoo["lwdetr"])
    for b in (0, 1):
        assert g[f"blocks.{b}.attn.q_proj"].kind == "heads" and g[f"blocks.{b}.attn.q_proj"].prunable
        assert g[f"blocks.{b}.ffn.linear1"].prunable
    for d in (0, 1):
        assert g[f"decoder.{d}.self_attn.q_proj"].prunable and g[f"decoder.{d}.ffn.linear1"].prunable
        assert not g[f"decoder.{d}.cross_attn.sampling_offsets"].prunable
    assert not g["class_head"].prunable and not g["box_heads.1.layers.2"].prunable


class _SizeUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc1(x)
        C = h.shape[-1]
        return self.fc3(self.fc2(h) * C)


def test_a_channel_size_used_in_arithmetic_blocks_the_group():
    g = _groups(_build(_SizeUse(), [("x", (5, 8))], ("y",)))
    assert not g["fc1"].prunable and "computes with the size of a channel dim" in g["fc1"].reasons[0]
    assert g["fc2"].prunable


# ------------------------------------------------------------------------------------------- pruning

@pytest.mark.parametrize("name", ["vit", "c2f_chunk", "c2f_split", "c2f_slice", "det"])
def test_standins_prune_at_several_densities(name, standins):
    model = standins[name]
    ref = model.run(model.spec.sample(seed=1))
    for fraction in (0.75, 0.5, 0.25):
        res = PruneChannels.from_fraction(model, fraction)(model)
        assert res.checks["mask_equivalence"]["passed"], res.checks
        out = res.model.run(res.model.spec.sample(seed=1, alt=True))
        assert [t.shape[1:] for t in out] == [t.shape[1:] for t in ref]
        assert _params(res.model) < _params(model)
    width = res.model.gm.get_submodule("c2f.cv1.conv").out_channels if name.startswith("c2f") else None
    if name == "c2f_split":  # the split sizes follow the kept channels of each part
        node = next(n for n in res.model.gm.graph.nodes if n.target == "split")
        assert sum(node.args[1]) == width and len(set(node.args[1])) == 2  # the halves kept different counts
    if name == "c2f_slice":  # y[:, :c] / y[:, c:] share the new boundary
        bounds = [n.args[1][1] for n in res.model.gm.graph.nodes if n.target is operator.getitem
                  and isinstance(n.args[1], tuple) and len(n.args[1]) == 2]
        assert bounds[0].stop == bounds[1].start and 0 <= bounds[0].stop < width  # 0.25: part a emptied


@pytest.mark.parametrize("arch", ["lwdetr", "speechformer"])
def test_zoo_prunes_to_a_smaller_graph_then_exports_int2_with_parity(arch, zoo):
    """Pruned at two densities (mask-equivalent, smaller, same output shapes), then ternarised, folded and
    exported with INT2 weights: onnxruntime matches torch (one export covers pruning and the INT2 path)."""
    model = zoo[arch]
    dense = model.run(model.spec.sample(seed=2))
    for fraction in (0.75, 0.5):
        res = PruneChannels.from_fraction(model, fraction)(model)
        assert res.checks["mask_equivalence"]["passed"], res.checks
        assert _params(res.model) < _params(model)
        assert [t.shape for t in res.model.run(res.model.spec.sample(seed=2))] == [t.shape for t in dense]
    folded, records = PassManager([STTNScaffold(), FoldSTTN()])(res.model)
    assert records[-1]["checks"]["equivalence"]["rel_error"] <= 1e-5
    # forms "dq": the "cast" form fails on lwdetr (a DequantizeLinear does not survive ORT optimisation)
    _, rec = export(folded, weights="int2", forms="dq")
    assert rec["params"]["weights"] == "int2" and rec["checks"]["ort_parity"]["passed"]


# ------------------------------------------------------------------------------------------- ADMM on detection

def _detection_bundle(n: int = 6, size: int = 32) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        y = torch.full((3, 5), -1.0)
        y[:2, 0] = torch.randint(0, 5, (2,), generator=g).float()
        y[:2, 1:3] = torch.rand(2, 2, generator=g) * 0.5 + 0.25
        y[:2, 3:] = torch.rand(2, 2, generator=g) * 0.3 + 0.1
        items.append((torch.rand(3, size, size, generator=g), y))
    return DataBundle("detection", ["a", "b", "c", "d", "e"], 5, {"train": items, "val": items[:2]}, "0" * 64,
                      meta={"max_objects": 3, "image_size": size})


def test_admm_step_and_taylor_scores_train_on_the_detection_loss(zoo):
    """ADMM's W-step and the Taylor importance take C's set-prediction loss over (logits, boxes), with every
    query group in train mode: the loss is finite, the weights move, and every prunable group gets scores."""
    model = zoo["lwdetr"]
    data = _detection_bundle()
    analysis = analyse(model)
    groups = analysis.prunable
    scores = taylor_scores(model, data, analysis, groups, batches=1, batch_size=2)
    assert set(scores) == {g.name for g in groups} and all(np.isfinite(v).all() for v in scores.values())
    student = model.clone()
    gm = student.gm
    modules = dict(gm.named_modules())
    params = {n: modules[n].weight for n in ("blocks.0.ffn.linear1", "decoder.0.ffn.linear1")}
    z = {n: p.detach().clone() for n, p in params.items()}
    u = {n: torch.zeros_like(p) for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    queries = preflight(student, data, data.split("val"), torch.device("cpu"), "model")
    assert queries == LWDETR["num_queries"]
    loss, _, count = alcs._w_step(gm, params, z, u, data.split("train"), "detection", opt,
                                  torch.Generator().manual_seed(0), 3, 1e-3, 1.0, 0, queries=queries)
    assert count == 6 and np.isfinite(loss) and loss > 0
    assert any(not torch.equal(before[n], params[n].detach()) for n in params)
