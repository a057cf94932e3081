"""Ternary/binary scaffolds on decoder LMs: the zoo llama and a nanoGPT-style user model (tied head).

Selection (every Linear of the decoder blocks; embeddings and the head fp32 by default, the head selectable,
a tied head refused with its reason), exact DLT/STTN/binary folds after training steps, replay of a
checkpoint (including a v1 record made with the old first-layer rule), and an INT2 export whose onnxruntime
output matches the folded torch model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgec.core.pass_manager import PassManager
from edgec.layers.binary import BinaryLayer, binary_aux_loss
from edgec.layers.latent import LatentLayer
from edgec.layers.lowbit import LowBitLayer, LowBitLinear
from edgec.layers.ternary import DLTLayer, STTNLayer
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.models.source import resolve
from edgec.onnx.export import export
from edgec.onnx.session import create_session
from edgec.passes.binary import BinaryScaffold, FoldBinary
from edgec.passes.dlt import DLTScaffold, FoldDLT
from edgec.passes.sttn import FoldSTTN, STTNScaffold
from edgec.train import distill as DS

NANOGPT = f"{Path(__file__).resolve().parents[1] / 'user_models' / 'nanogpt.py'}:GPT"
LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32}
GPT = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}
METHODS = {"dlt": (DLTScaffold, FoldDLT, DLTLayer, {"group_size": 16}),
           "sttn": (STTNScaffold, FoldSTTN, STTNLayer, {}),
           "binary": (BinaryScaffold, FoldBinary, BinaryLayer, {})}
LLAMA_BLOCK = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
GPT_BLOCK = [f"transformer.h.{i}.{p}" for i in range(2) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models():
    return {"llama": new_model("llama", LLAMA, seed=0),
            "llama_tied": new_model("llama", {**LLAMA, "tie_word_embeddings": True}, seed=0),
            "nanogpt": new_model(NANOGPT, GPT, input_shape=["idx=2x16:int64"], seed=0)}


def _skips(res) -> dict:
    return {s["layer"]: (s["reason"], s["deliberate"]) for s in res.skipped}


@pytest.mark.parametrize("method", list(METHODS))
def test_selection_every_block_linear_embeddings_and_head_fp32(method, models):
    scaffold_cls = METHODS[method][0]
    res = scaffold_cls()(models["llama"])
    sel = res.checks["selection"]
    assert sel["layers"] == LLAMA_BLOCK and sel["full_precision"] == ["lm_head"]
    # the first Linear reads the embedding's output, not the model input: quantized, and said so
    assert sel["first_layer"]["layer"] == "model.layers.0.self_attn.q_proj" and not sel["first_layer"]["kept"]
    assert "model.embed_tokens (nn.Embedding) runs before it" in sel["first_layer"]["reason"]
    skips = _skips(res)
    assert list(skips) == ["model.embed_tokens", "lm_head"]  # nothing silent, graph order
    assert skips["model.embed_tokens"][0].startswith("nn.Embedding lookup table")
    assert skips["lm_head"] == ("last linear layer kept fp32 (--keep-first-last)", True)
    # the head is selectable: --no-keep-first-last quantizes it too (the embedding has no low-bit form)
    every = scaffold_cls(keep_first_last=False)(models["llama"])
    assert every.checks["selection"]["layers"] == LLAMA_BLOCK + ["lm_head"]
    assert list(_skips(every)) == ["model.embed_tokens"]


def test_tied_head_is_refused_with_its_reason(models):
    for name, head, table in (("llama_tied", "lm_head", "model.embed_tokens"), ("nanogpt", "lm_head", "transformer.wte")):
        res = DLTScaffold(keep_first_last=False)(models[name])
        reason, deliberate = _skips(res)[head]
        assert reason.startswith(f"weight tied to the embedding table {table} (tied word embeddings)")
        assert not deliberate  # the pass cannot do it: --strict refuses
        assert head not in res.checks["selection"]["layers"]
    res = STTNScaffold()(models["nanogpt"])
    assert res.checks["selection"]["layers"] == GPT_BLOCK
    assert list(_skips(res)) == ["transformer.wte", "transformer.wpe", "lm_head"]


def _train(model, steps: int = 3) -> None:
    """A few SGD steps of next-token loss on random tokens, so latents, scales and shifts move."""
    gm = model.gm.train()
    opt = torch.optim.SGD([p for _, m in model.scaffolds() for p in m.parameters()], lr=0.2)
    for i in range(steps):
        (ids,) = model.spec.sample(seed=10 + i)
        out = gm(ids)
        logits = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if any(isinstance(m, BinaryLayer) for m in gm.modules()):
            loss = loss + binary_aux_loss(gm)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()


@pytest.mark.parametrize("arch", ["llama", "nanogpt"])
@pytest.mark.parametrize("method", list(METHODS))
def test_fold_is_exact_after_training(method, arch, models, tmp_path):
    scaffold_cls, fold_cls, layer_cls, params = METHODS[method]
    scaf, _ = PassManager([scaffold_cls(**params)])(models[arch])
    _train(scaf)
    # a checkpoint round trip replays the scaffold (first_layer recorded) and keeps the trained weights
    save_checkpoint(scaf, tmp_path / "s.pt")
    back = load_checkpoint(tmp_path / "s.pt", NANOGPT if arch == "nanogpt" else None)
    assert [n for n, _ in back.scaffolds()] == [n for n, _ in scaf.scaffolds()]
    assert all(isinstance(m, layer_cls) for _, m in back.scaffolds())
    folded, records = PassManager([fold_cls()])(back)
    check = records[0]["checks"]["equivalence"]
    assert check["passed"] and check["rel_error"] <= 1e-5
    assert not folded.scaffolds() and not any(isinstance(m, LatentLayer) for m in folded.gm.modules())
    low = [n for n, m in folded.gm.named_modules() if isinstance(m, LowBitLayer)]
    assert low == (LLAMA_BLOCK if arch == "llama" else GPT_BLOCK)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = scaf.gm.eval()(ids), folded.gm(ids)
    a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    assert torch.allclose(a, b, rtol=0, atol=1e-5 * float(a.abs().max()))


def test_v1_record_replays_with_the_first_linear_rule(models, tmp_path):
    """A checkpoint scaffolded before first_layer existed (v1, no such parameter) kept the first Linear fp32:
    loading it must rebuild that structure, not today's default."""
    old, _ = PassManager([DLTScaffold(first_layer="first-linear")])(models["llama"])
    assert type(old.gm.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    rec = dict(old.passes[-1])
    rec["version"] = 1
    rec["params"] = {k: v for k, v in rec["params"].items() if k != "first_layer"}
    old.passes[-1] = rec
    save_checkpoint(old, tmp_path / "v1.pt")
    back = load_checkpoint(tmp_path / "v1.pt")
    assert type(back.gm.get_submodule("model.layers.0.self_attn.q_proj")) is torch.nn.Linear
    assert len(back.scaffolds()) == len(LLAMA_BLOCK) - 1


@pytest.mark.parametrize("arch", ["llama", "nanogpt"])
def test_mixed_scaffolds_fold_and_export_int2_with_ort_parity(arch, models):
    """DLT on attention, STTN on the MLP input projections, binary on the MLP output: one INT2 export holds
    all three low-bit forms; onnxruntime matches the folded torch model on a fresh input."""
    if arch == "llama":
        groups = (["*self_attn*"], ["*gate_proj", "*up_proj"], ["*down_proj"])
    else:
        groups = (["*attn*"], ["*mlp.c_fc"], ["*mlp.c_proj"])
    passes = [DLTScaffold(group_size=16, include=groups[0]), STTNScaffold(include=groups[1]),
              BinaryScaffold(include=groups[2])]
    scaf, _ = PassManager(passes)(models[arch])
    _train(scaf, steps=2)
    folded, records = PassManager([FoldDLT(), FoldSTTN(), FoldBinary()])(scaf)
    assert all(r["checks"]["equivalence"]["rel_error"] <= 1e-5 for r in records)
    bits = sorted({m.bits for m in folded.gm.modules() if isinstance(m, LowBitLinear)})
    assert bits == [1, 2]
    data, record = export(folded, weights="int2", forms="cast")
    assert record["params"]["weights"] == "int2" and record["checks"]["ort_parity"]["passed"]
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = folded.gm(ids)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    sess = create_session(data)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    assert got.shape == want.shape
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())


# ------------------------------------------------------------------------------------------- OFF on decoders

@pytest.mark.parametrize("arch", ["llama", "nanogpt"])
def test_off_blocks_are_the_residual_stream_after_each_decoder_layer(arch, models):
    """The OFF layers found by default are the decoder layers (``model.layers.N`` / ``transformer.h.N``), also
    after scaffolding, and each feature equals that layer's output in the eager module (forward hooks)."""
    model = models[arch]
    blocks = ["model.layers.0", "model.layers.1"] if arch == "llama" else ["transformer.h.0", "transformer.h.1"]
    scaf = DLTScaffold(group_size=16)(model).model
    assert DS.block_names(model.gm) == blocks and DS.resolve_layers(scaf.gm, None) == blocks
    eager = resolve(model.arch if arch == "llama" else NANOGPT)(**model.config).eval()
    assert not eager.load_state_dict(model.gm.state_dict(), strict=False).missing_keys
    seen = {}
    for name in blocks:
        eager.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eager(ids)
        _, feats = DS.feature_extractor(model.gm, blocks)(ids)
    for name, f in zip(blocks, feats):
        assert f.shape == (2, 9, 32) and torch.allclose(f, seen[name], atol=1e-6), name


def test_off_cosine_is_per_token_on_sequence_features():
    """[B, T, D] features: 1 − cos over D at every token, averaged over B·T; a per-token rescaling (an outlier
    token's magnitude) costs nothing, a direction change at one token costs exactly its share."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 5, 8, generator=g)
    s = torch.randn(2, 5, 8, generator=g)
    want = (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1)).mean()
    assert torch.allclose(DS.off_distance(s, t), want, atol=1e-6)
    scale = torch.rand(2, 5, 1, generator=g) * 100 + 0.01
    assert float(DS.off_distance(t * scale, t)) < 1e-6
    flipped = t.clone()
    flipped[1, 3] = -flipped[1, 3]  # opposite direction at one of the 10 tokens: 1 − cos = 2 there
    assert float(DS.off_distance(flipped, t)) == pytest.approx(2 / 10, abs=1e-6)
    total, per = DS.off_loss({"a": flipped, "b": t}, {"a": t, "b": t})
    assert float(total) == pytest.approx(0.1, abs=1e-6) and set(per) == {"a", "b"}
