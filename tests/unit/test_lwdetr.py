"""Zoo lwdetr (LW-DETR, arXiv 2406.03459): tracing, the window-major layout against attention computed the slow way,
Group DETR's query groups, export with ORT parity on both outputs, HRF scaffold + fold, determinism."""
from __future__ import annotations

import pytest
import torch

from edgec.core.graph import Leaf, trace, verify_equivalent
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.models.lwdetr import LWDETR, QueryGroups, ViTBlock, from_windows, to_windows
from edgec.onnx.export import export, ort_session
from edgec.passes.hrf import FoldHRF, HRFExpand, HRFScaffold, find_ffns

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return new_model("lwdetr", seed=0)


def images(batch, size=96, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def block(is_global, windows, dim=16, heads=2, seed=0):
    torch.manual_seed(seed)
    b = ViTBlock(dim, heads, 2.0, windows, is_global, dropout=0.0).eval()
    with torch.no_grad():  # non-trivial norms, so a layout error cannot hide behind identity-like weights
        for p in b.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    return b


def test_default_config_contract(model):
    spec = model.spec
    assert spec.task == "detection" and spec.outputs == ("logits", "boxes")
    assert [t.name for t in spec.inputs] == ["image"]
    assert spec.inputs[0].shape() == (2, 3, 96, 96) and spec.inputs[0].shape(alt=True) == (3, 3, 96, 96)
    assert spec.extra == {"image_size": 96, "num_classes": 5, "queries": 20, "groups": 3, "box_format": "cxcywh",
                          "image_range": "[0, 1]"}
    assert 250_000 <= model.param_count() <= 600_000
    logits, boxes = model.run((images(2),))
    assert logits.shape == (2, 20, 5) and boxes.shape == (2, 20, 4)
    assert bool(((boxes > 0) & (boxes < 1)).all())


def test_traces_and_equals_eager_in_both_modes():
    torch.manual_seed(0)
    eager = LWDETR(**{**LWDETR.default_config(), "dropout": 0.0})
    gm = trace(eager)
    leaves = {type(m) for m in gm.modules() if isinstance(m, Leaf)}
    assert QueryGroups in leaves  # the train/eval switch stays one node
    x = images(2)
    for train in (False, True):
        eager.train(train)
        gm.train(train)
        want, got = eager(x), gm(x)
        assert len(got) == 2
        for w, g in zip(want, got):
            assert w.shape == g.shape
            assert torch.equal(w, g)


@pytest.mark.parametrize("windows,h,w", [(2, 3, 3), (3, 2, 2), (2, 4, 2)])
def test_window_major_window_attention_equals_windowed_attention_the_slow_way(windows, h, w):
    """Window blocks on the one-time window-major reshape == attention run window by window on the raster map."""
    blk = block(False, windows)
    B, C = 2, 16
    H, W = windows * h, windows * w
    x = torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = from_windows(blk(to_windows(x, windows)), windows, H, W).permute(0, 2, 3, 1)  # back to (B, H, W, C)
        slow = torch.empty_like(x)
        for b in range(B):
            for i in range(windows):
                for j in range(windows):
                    rows, cols = slice(i * h, (i + 1) * h), slice(j * w, (j + 1) * w)
                    tokens = x[b, rows, cols].reshape(1, h * w, C)  # raster order inside the window
                    slow[b, rows, cols] = blk(tokens).reshape(h, w, C)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    # and the windows really are local: a plain global block on the raster map differs
    with torch.no_grad():
        full = blk(x.reshape(B, H * W, C)).reshape(B, H, W, C)
    assert (full - slow).abs().max() > 1e-3


@pytest.mark.parametrize("windows", [2, 3])
def test_global_attention_in_window_major_order_equals_raster_order(windows):
    blk = block(True, windows)
    B, C, h, w = 2, 16, 2, 3
    H, W = windows * h, windows * w
    x = torch.randn(B, H, W, C, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = from_windows(blk(to_windows(x, windows)), windows, H, W).permute(0, 2, 3, 1)
        blk.is_global = False  # the same weights as a plain block over the raster sequence
        plain = blk(x.reshape(B, H * W, C)).reshape(B, H, W, C)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_window_layout_roundtrip_and_order():
    x = torch.arange(2 * 4 * 6 * 1, dtype=torch.float32).reshape(2, 4, 6, 1)
    win = to_windows(x, 2)  # (2*4, 2*3, 1)
    assert win.shape == (8, 6, 1)
    assert win[0, :, 0].tolist() == [0, 1, 2, 6, 7, 8]  # image 0, window (0, 0), raster inside the window
    assert win[1, :, 0].tolist() == [3, 4, 5, 9, 10, 11]  # window (0, 1)
    assert win[4, 0, 0].item() == 24  # image 1 starts at row 4
    assert torch.equal(from_windows(win, 2, 4, 6).permute(0, 2, 3, 1), x)


def test_group_detr_train_gives_all_groups_eval_group_zero_and_groups_are_independent(model):
    gm = model.clone().gm
    q, g = 20, 3
    x = images(2)
    gm.train()
    logits, boxes = gm(x)
    assert logits.shape == (2, g * q, 5) and boxes.shape == (2, g * q, 4)
    gm.eval()
    with torch.no_grad():
        ev_logits, ev_boxes = gm(x)
    assert ev_logits.shape == (2, q, 5)
    # group 0 in training mode is exactly the inference model (dropout is 0 by default)
    torch.testing.assert_close(logits[:, :q].detach(), ev_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(boxes[:, :q].detach(), ev_boxes, rtol=1e-5, atol=1e-6)
    # perturbing group 1's queries (content and reference boxes) leaves groups 0 and 2 unchanged
    gm.train()
    with torch.no_grad():
        gm.queries.content[q:2 * q] += torch.randn(q, gm.queries.content.shape[1]) * 0.5
        gm.queries.refpoints[q:2 * q] += 0.7
        logits2, boxes2 = gm(x)
    for keep in (slice(0, q), slice(2 * q, 3 * q)):
        torch.testing.assert_close(logits2[:, keep], logits[:, keep].detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(boxes2[:, keep], boxes[:, keep].detach(), rtol=1e-5, atol=1e-6)
    assert (boxes2[:, q:2 * q] - boxes[:, q:2 * q].detach()).abs().max() > 1e-3


def test_training_step_backpropagates_to_every_part(model):
    gm = model.clone().gm.train()
    logits, boxes = gm(images(2))
    (logits.sigmoid().mean() + boxes.mean()).backward()
    for name in ("patch_embed.weight", "pos_embed", "blocks.0.ffn.linear1.weight", "projector.0.0.cv1.conv.weight",
                 "queries.content", "queries.refpoints", "decoder.0.cross_attn.sampling_offsets.weight",
                 "decoder.2.cross_attn.value_proj.weight", "class_head.weight", "box_heads.0.layers.2.weight",
                 "query_pos.0.layers.0.weight"):
        p = dict(gm.named_parameters())[name]
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_two_scales_and_config_errors():
    torch.manual_seed(0)
    m = LWDETR(**{**LWDETR.default_config(), "scales": [2.0, 0.5], "embed_dim": 32, "dim": 32, "depth": 2,
                  "global_blocks": [1], "out_indices": [0, 1], "decoder_layers": 1, "num_queries": 5})
    assert m.decoder[0].cross_attn.levels == [(24, 24), (6, 6)]
    gm = trace(m).eval()
    logits, boxes = gm(images(1))
    assert logits.shape == (1, 5, 5) and boxes.shape == (1, 5, 4)
    for bad, msg in [({"windows": 5}, "multiple of windows"), ({"scales": [3.0]}, "0.5, 1.0 or 2.0"),
                     ({"out_indices": [4]}, "must name encoder blocks"), ({"groups": 0}, "groups: must be")]:
        with pytest.raises(ValueError, match=msg):
            LWDETR(**{**LWDETR.default_config(), **bad})


SMALL = {"depth": 2, "global_blocks": [1], "out_indices": [0, 1], "decoder_layers": 1, "scales": [1.0, 0.5],
         "num_queries": 20}


def test_export_ort_parity_on_both_outputs_at_two_batch_sizes():
    """A shallower model with two feature levels (two grid_sample calls per layer) exports faster than the default
    (which `edgec export` checks the same way); parity per output at batch 1 and 4 besides the exporter's own."""
    model = new_model("lwdetr", SMALL, seed=0)
    data, record = export(model)
    parity = record["checks"]["ort_parity"]
    assert parity["passed"] and parity["rel_error"] < 1e-4
    assert parity["parity"]["traced_shape"]["shape"] == [[2, 3, 96, 96]]
    session = ort_session(data)
    assert [o.name for o in session.get_outputs()] == ["logits", "boxes"]
    ops = {n.op_type for n in __import__("onnx").load_from_string(data).graph.node}
    assert "GridSample" in ops
    for batch in (1, 4):
        x = images(batch, seed=batch)
        want = model.run((x,))
        got = session.run(None, {"image": x.numpy()})
        assert [g.shape for g in got] == [(batch, 20, 5), (batch, 20, 4)]
        for w, g in zip(want, got):  # each output on its own scale
            err = (w - torch.from_numpy(g)).abs().max().item()
            assert err <= 1e-4 * max(1.0, w.abs().max().item()), err


def test_hrf_scaffold_and_fold_exact(model):
    ffns = find_ffns(model)
    names = [f.names[0] for f in ffns]
    # the encoder and decoder FFNs, and the box heads' d -> d -> d part (Linear -> ReLU -> Linear, also an FFN)
    assert sorted(names) == sorted([f"blocks.{i}.ffn.linear1" for i in range(4)]
                                   + [f"decoder.{i}.ffn.linear1" for i in range(3)]
                                   + [f"box_heads.{i}.layers.0" for i in range(3)])
    res = HRFScaffold()(model)
    assert len(res.model.scaffolds()) == 10
    assert all(s["deliberate"] for s in res.skipped)  # heads (box, query position) are not FFNs
    scaf = res.model.clone()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as fine-tuning would move them
        for m in scaf.gm.modules():
            if isinstance(m, HRFExpand):
                for p in m.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
    folded = FoldHRF()(scaf)
    assert folded.checks["equivalence"]["passed"]
    assert folded.model.scaffolds() == []
    assert verify_equivalent(scaf, folded.model, 1e-5)["passed"]
    assert {n: tuple(p.shape) for n, p in folded.model.gm.named_parameters()} == \
        {n: tuple(p.shape) for n, p in model.gm.named_parameters()}


def test_construction_is_deterministic_per_seed(model):
    assert new_model("lwdetr", seed=0).digest() == model.digest()
    assert new_model("lwdetr", seed=1).digest() != model.digest()


def test_checkpoint_roundtrip_keeps_spec_and_group_switch(model, tmp_path):
    path = tmp_path / "l.pt"
    digest = save_checkpoint(model, path)
    loaded = load_checkpoint(path)
    assert loaded.digest() == digest
    assert loaded.spec.task == "detection" and loaded.spec.outputs == ("logits", "boxes")
    assert loaded.spec.extra["queries"] == 20 and loaded.spec.extra["groups"] == 3
    x = images(1)
    for w, g in zip(model.run((x,)), loaded.run((x,))):
        assert torch.equal(w, g)
    loaded.gm.train()
    assert loaded.gm(x)[0].shape == (1, 60, 5)
