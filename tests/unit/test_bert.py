"""Zoo ``bert``: fx tracing, dynamic ONNX export, and the Hugging Face importer (parity with transformers)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.models import build, full_config, resolve
from edgec.models.bert import Bert
from edgec.models.hf_bert import load_hf_bert, read_hf_bert

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, type_vocab_size=2)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def max_abs(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(as_tuple(a), as_tuple(b)))


def padded(inputs):
    """Same inputs with the tail of the first sequence padded out (exercises the attention mask)."""
    ids, mask = inputs
    mask = mask.clone()
    mask[0, mask.shape[1] // 2:] = 0
    return ids, mask


def randomise_(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (also LayerNorm), so a swapped or mis-mapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def export_onnx(gm, spec, path):
    dynamic = tuple({ax: torch.export.Dim(d.name, min=d.min, max=d.max) for ax, d in dims.items()}
                    for dims in spec.dynamic_dims())
    program = torch.onnx.export(gm, spec.sample(seed=0), dynamo=True, opset_version=20, dynamic_shapes=dynamic,
                                input_names=[t.name for t in spec.inputs], output_names=list(spec.outputs),
                                external_data=False, verbose=False)
    program.save(str(path))
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- zoo model


def test_zoo_convention():
    cls = resolve("bert")
    assert cls is Bert and isinstance(Bert.summary, str) and Bert.summary
    config = full_config("bert")
    json.dumps(config)  # plain data
    assert config["hidden_size"] == 128 and config["num_hidden_layers"] == 2 and config["num_labels"] == 2
    model = build("bert", config)
    spec = model.input_spec()
    assert [t.name for t in spec.inputs] == ["input_ids", "attention_mask"]
    assert spec.outputs == ("logits",) and spec.task == "classification"
    ids, mask = spec.sample(seed=0)
    assert ids.shape == (2, 32) and ids.dtype == torch.int64 and int(ids.max()) < 1000 and bool((mask == 1).all())
    assert spec.sample(seed=0, alt=True)[0].shape == (3, 19)
    feats = Bert(**dict(config, num_labels=0)).input_spec()
    assert feats.outputs == ("last_hidden_state", "pooler_output") and feats.task == "features"
    with pytest.raises(EdgecError, match="hidden_act"):
        Bert(**dict(config, hidden_act="swish"))
    with pytest.raises(EdgecError, match="multiple"):
        Bert(**dict(config, num_attention_heads=3))


def test_ffn_is_linear_act_linear_in_fx_graph():
    gm = torch.fx.symbolic_trace(Bert(**Bert.default_config()).eval())
    modules = dict(gm.named_modules())
    for i in range(2):
        prefix = f"encoder.layer.{i}"
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == f"{prefix}.intermediate.dense")
        (act,) = node.users
        assert act.op == "call_module" and isinstance(modules[act.target], torch.nn.GELU)
        assert modules[act.target].approximate == "none"  # HF "gelu" is the exact erf form
        (down,) = act.users
        assert down.target == f"{prefix}.output.dense" and isinstance(modules[down.target], torch.nn.Linear)


@pytest.mark.parametrize("num_labels", [2, 0])
def test_trace_export_ort_two_shapes(tmp_path, num_labels):
    torch.manual_seed(0)
    model = Bert(**dict(Bert.default_config(), num_labels=num_labels)).eval()
    randomise_(model)
    spec = model.input_spec()
    gm = torch.fx.symbolic_trace(model).eval()
    session = export_onnx(gm, spec, tmp_path / "bert.onnx")
    cases = [spec.sample(seed=1), spec.sample(seed=2, alt=True), spec.sample(seed=3, batch=1),
             spec.sample(seed=4, alt=True, batch=1)]
    cases += [padded(c) for c in cases]
    for inputs in cases:
        with torch.no_grad():
            eager, traced = model(*inputs), gm(*inputs)
        assert max_abs(eager, traced) == 0.0
        got = session.run(None, {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()})
        assert len(got) == len(spec.outputs)
        for ref, out in zip(as_tuple(eager), got):
            assert ref.shape == out.shape
            assert float(np.abs(ref.numpy() - out).max()) < 1e-4


# ---------------------------------------------------------------- importer without transformers


def write_folder(path, state: dict, config: dict | None = None, prefix: str = "", **overrides):
    """An HF-layout folder from a zoo state dict (what save_pretrained writes, without transformers)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    hf = {"model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu", "layer_norm_eps": 1e-12,
          **(config or TINY), **overrides}
    (path / "config.json").write_text(json.dumps(hf))
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def tiny_features(seed=0):
    model = Bert(**dict(TINY, num_labels=0)).eval()
    randomise_(model, seed)
    return model


def test_roundtrip_hf_layout_prefixed_legacy_names_and_fp16(tmp_path):
    model = tiny_features()
    state = model.state_dict()
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in state.items()}
    legacy["embeddings.position_ids"] = torch.arange(40)[None]  # buffer written by old transformers
    legacy["cls.predictions.bias"] = torch.zeros(97)  # pre-training head: dropped
    config, sd = read_hf_bert(write_folder(tmp_path / "m", legacy, prefix="bert."))
    assert config["num_labels"] == 0 and config["add_pooler"] and set(sd) == set(state)
    assert set(config) == set(Bert.default_config()) and json.dumps(config)  # a checkpoint-ready zoo config
    loaded = Bert(**config).eval()
    loaded.load_state_dict(sd)
    inputs = padded(loaded.input_spec().sample(seed=0))
    with torch.no_grad():
        assert max_abs(model(*inputs), loaded(*inputs)) == 0.0

    half = {k: v.half() for k, v in state.items()}
    _, sd16 = read_hf_bert(write_folder(tmp_path / "h", half))
    assert all(v.dtype == torch.float32 for v in sd16.values())


def test_no_pooler_checkpoint(tmp_path):
    state = {k: v for k, v in tiny_features().state_dict().items() if not k.startswith("pooler.")}
    model = load_hf_bert(write_folder(tmp_path, state))
    assert model.pooler is None and model.input_spec().outputs == ("last_hidden_state",)
    gm = torch.fx.symbolic_trace(model)
    out = gm(*model.input_spec().sample(seed=0))
    assert len(out) == 1 and out[0].shape == (2, 32, 32)


def expect_error(folder, match):
    with pytest.raises(EdgecError, match=match) as info:
        read_hf_bert(folder)
    assert "\n" not in str(info.value)


def test_importer_errors(tmp_path):
    state = tiny_features().state_dict()
    expect_error(tmp_path / "nope", "folder not found")

    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "config.json not found")

    bad = write_folder(tmp_path / "badjson", state)
    (bad / "config.json").write_text("{not json")
    expect_error(bad, r"config.json: invalid JSON")

    nosafe = write_folder(tmp_path / "pickle", state)
    (nosafe / "model.safetensors").unlink()
    (nosafe / "pytorch_model.bin").write_bytes(b"\x80\x04")
    expect_error(nosafe, r"model.safetensors: not found; found pytorch_model.bin, but pytorch_model.bin pickles are not read")

    corrupt = write_folder(tmp_path / "corrupt", state)
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    expect_error(corrupt, "model.safetensors: cannot read safetensors")

    expect_error(write_folder(tmp_path / "roberta", state, model_type="roberta"), "model_type is 'roberta', expected 'bert'")
    expect_error(write_folder(tmp_path / "act", state, hidden_act="silu"), "hidden_act 'silu' is not supported")
    expect_error(write_folder(tmp_path / "pos", state, position_embedding_type="relative_key"),
                 "position_embedding_type 'relative_key'")
    expect_error(write_folder(tmp_path / "dec", state, is_decoder=True), "is_decoder")

    missing = dict(state)
    del missing["encoder.layer.1.output.dense.bias"]
    expect_error(write_folder(tmp_path / "missing", missing), r"missing tensors: encoder.layer.1.output.dense.bias")

    extra = dict(state, **{"encoder.layer.2.output.dense.bias": torch.zeros(32)})
    expect_error(write_folder(tmp_path / "extra", extra), r"unexpected tensor names .*encoder.layer.2.output.dense.bias")
    expect_error(write_folder(tmp_path / "qa", dict(state, **{"qa_outputs.weight": torch.zeros(2, 32)})),
                 "unexpected tensor names for BERT: qa_outputs.weight")

    expect_error(write_folder(tmp_path / "shape", state, intermediate_size=64),
                 r"'encoder.layer.0.intermediate.dense.bias' has shape \[48\], config.json implies \[64\]")

    token = dict(state, **{"classifier.weight": torch.zeros(5, 32), "classifier.bias": torch.zeros(5)})
    expect_error(write_folder(tmp_path / "tok", token, architectures=["BertForTokenClassification"]),
                 "not BertForSequenceClassification")


# ---------------------------------------------------------------- parity with transformers


HF_KW = dict(vocab_size=211, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=48)


def hf_inputs(seed=0, batch=3, seq=21):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, HF_KW["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1:2, seq - 7:] = 0  # right padding (rows that exist)
    mask[2:3, 4:] = 0
    return ids, mask


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_parity_with_transformers_bertmodel(tmp_path, hidden_act):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertModel(transformers.BertConfig(**HF_KW, hidden_act=hidden_act)).eval()
    randomise_(hf, seed=1)
    hf.save_pretrained(tmp_path)  # safetensors by default
    config, state = read_hf_bert(tmp_path)
    assert config["num_labels"] == 0 and config["hidden_act"] == hidden_act
    model = Bert(**config).eval()
    model.load_state_dict(state, strict=True)
    gm = torch.fx.symbolic_trace(model).eval()
    # padded batch, full position table, and batch 1 without padding (HF then skips its mask entirely)
    cases = [hf_inputs(0, 3, 21), hf_inputs(1, 3, 48), (hf_inputs(2, 1, 5)[0], torch.ones(1, 5, dtype=torch.int64))]
    for ids, mask in cases:
        with torch.no_grad():
            ref = hf(input_ids=ids, attention_mask=mask)
            ref = (ref.last_hidden_state, ref.pooler_output)
            assert max_abs(ref, model(ids, mask)) < 1e-5
            assert max_abs(ref, gm(ids, mask)) < 1e-5


def test_parity_with_transformers_sequence_classification(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(**HF_KW, num_labels=3)).eval()
    randomise_(hf, seed=2)
    hf.save_pretrained(tmp_path)
    config, state = read_hf_bert(tmp_path)
    assert config["num_labels"] == 3 and config["add_pooler"]
    model = load_hf_bert(tmp_path)
    assert model.input_spec().outputs == ("logits",)
    gm = torch.fx.symbolic_trace(model).eval()
    ids, mask = hf_inputs(seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert ref.shape == (3, 3)
        assert max_abs(ref, model(ids, mask)) < 1e-5
        assert max_abs(ref, gm(ids, mask)) < 1e-5


def test_parity_with_transformers_no_pooler_and_pretraining_heads(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**HF_KW)
    hf = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    randomise_(hf, seed=3)
    hf.save_pretrained(tmp_path / "nopool")
    model = load_hf_bert(tmp_path / "nopool")
    assert model.pooler is None
    ids, mask = hf_inputs(seed=6)
    with torch.no_grad():
        (out,) = model(ids, mask)
        assert max_abs(hf(input_ids=ids, attention_mask=mask).last_hidden_state, out) < 1e-5

    # BertForPreTraining: "bert." prefix plus MLM/NSP heads, which are dropped (the encoder is what is kept).
    pre = transformers.BertForPreTraining(cfg).eval()
    randomise_(pre, seed=4)
    pre.save_pretrained(tmp_path / "pre")
    config, _ = read_hf_bert(tmp_path / "pre")
    assert config["num_labels"] == 0
    model = load_hf_bert(tmp_path / "pre")
    with torch.no_grad():
        ref = pre.bert(input_ids=ids, attention_mask=mask)
        assert max_abs((ref.last_hidden_state, ref.pooler_output), model(ids, mask)) < 1e-5
