"""`edgec import hf` for Llama-family decoders (Llama, Qwen2, Mistral), read without transformers: logits parity
with transformers (random tiny models saved with save_pretrained), export parity, and one-line refusals."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import run_cli

from edgec.app.cli import main
from edgec.core.errors import EdgecError
from edgec.models.checkpoint import load_checkpoint
from edgec.models.hf_llama import load_hf_llama, read_hf_llama
from edgec.models.llama import Llama

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2, max_position_embeddings=64)
# name: (config class, model class, config keys, save_pretrained keys, zoo config keys the import must give)
CASES = {
    "llama_gqa_bias": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_attention_heads=6, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                            rope_theta=5000.0, rms_norm_eps=1e-5), {},
                       dict(num_key_value_heads=2, head_dim=8, qkv_bias=True, o_bias=True, mlp_bias=True,
                            rope_theta=5000.0, rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False)),
    "llama_tied_head_dim": ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16, tie_word_embeddings=True),
                            {}, dict(head_dim=16, tie_word_embeddings=True, qkv_bias=False, o_bias=False)),
    "qwen2_sharded_window": ("Qwen2Config", "Qwen2ForCausalLM",
                             dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                  sliding_window=5, max_window_layers=0),
                             dict(max_shard_size="60KB"),
                             dict(num_key_value_heads=2, qkv_bias=True, o_bias=False, mlp_bias=False, sliding_window=5)),
    "mistral_mqa_window": ("MistralConfig", "MistralForCausalLM",
                           dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=7), {},
                           dict(num_key_value_heads=1, qkv_bias=False, sliding_window=7)),
}


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norms too), so a swapped or mis-mapped tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def rel_error(ref, out) -> float:
    ref, out = torch.as_tensor(ref), torch.as_tensor(out)
    assert ref.shape == out.shape
    return float((ref - out).abs().max() / ref.abs().max())


def random_ids(seed=0, batch=3, seq=29):  # longer than both sliding windows
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """name -> (folder written by save_pretrained, the transformers model in eval mode)."""
    out = {}
    for i, (name, (config_cls, model_cls, kw, save_kw, _)) in enumerate(CASES.items()):
        config = getattr(transformers, config_cls)(**TINY, **kw)
        model = getattr(transformers, model_cls)(config).eval()
        randomise_(model, seed=i + 1)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, **save_kw)  # safetensors
        out[name] = folder, model
    return out


def cli(monkeypatch, capsys, *args):
    """`edgec ARGS` in this process through the console entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edgec", *map(str, args)])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("name", list(CASES))
def test_import_cli_logits_match_transformers(name, hf_folders, tmp_path, monkeypatch, capsys):
    folder, hf = hf_folders[name]
    if name.startswith("qwen2"):
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    if name == "llama_tied_head_dim":
        from safetensors import safe_open

        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # tied: embedding only
    code, out, err = cli(monkeypatch, capsys, "import", "hf", folder, "-o", tmp_path / "m.pt", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["arch"] == "llama"
    expected = CASES[name][4]
    assert {k: res["config"][k] for k in expected} == expected

    model = load_checkpoint(tmp_path / "m.pt")
    assert model.provenance[0]["pass"] == "import.hf" and model.provenance[0]["params"]["arch"] == "llama"
    for seed, (batch, seq) in enumerate([(3, 29), (1, 1), (2, 64)]):
        ids = random_ids(seed, batch, seq)
        with torch.no_grad():
            got = model.gm(ids)
        assert rel_error(hf_logits(hf, ids), got) <= 1e-4, (name, batch, seq)

    if expected.get("sliding_window"):  # the window is what HF applies: dropping it changes the logits
        config, state = read_hf_llama(folder)
        full = Llama(**dict(config, sliding_window=None)).eval()
        full.load_state_dict(state)
        ids = random_ids()
        with torch.no_grad():
            assert rel_error(hf_logits(hf, ids), full(ids)) > 1e-3


def test_import_is_deterministic_and_exports_matching_onnx(hf_folders, tmp_path, monkeypatch, capsys):
    import onnxruntime as ort

    folder, hf = hf_folders["qwen2_sharded_window"]
    for out in ("a.pt", "b.pt"):
        assert cli(monkeypatch, capsys, "import", "hf", folder, "-o", tmp_path / out, "--json")[0] == 0
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()

    code, out, err = cli(monkeypatch, capsys, "export", tmp_path / "a.pt", "-o", tmp_path / "m.onnx", "--json")
    assert code == 0, err
    assert json.loads(out)["checks"]["ort_parity"]["passed"]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    for seed, (batch, seq) in enumerate([(2, 29), (1, 7)]):
        ids = random_ids(seed + 10, batch, seq)
        (got,) = session.run(None, {"input_ids": ids.numpy()})
        assert rel_error(hf_logits(hf, ids), torch.from_numpy(np.asarray(got))) <= 1e-4


def test_half_precision_and_transformers4_config(hf_folders, tmp_path):
    folder, hf = hf_folders["llama_gqa_bias"]
    half = transformers.LlamaForCausalLM(hf.config).eval()
    half.load_state_dict(hf.state_dict())
    half.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config, state = read_hf_llama(tmp_path / "bf16")
    assert all(t.dtype == torch.float32 for t in state.values())
    ids = random_ids(3)
    ref = hf_logits(half.float(), ids)  # the bf16-rounded weights, computed in float32
    with torch.no_grad():
        assert rel_error(ref, load_hf_llama(tmp_path / "bf16")(ids)) <= 1e-4

    # transformers 4.x layout: rope_theta at the top level, rope_scaling null, no head_dim/num_key_value_heads
    old = tmp_path / "v4"
    shutil.copytree(folder, old)
    cfg = json.loads((old / "config.json").read_text())
    for key in ("rope_parameters", "head_dim"):
        cfg.pop(key)
    cfg.update(rope_theta=5000.0, rope_scaling=None)
    (old / "config.json").write_text(json.dumps(cfg))
    assert read_hf_llama(old)[0] == read_hf_llama(folder)[0]
    cfg.pop("num_key_value_heads")  # Llama's default: one key/value head per query head
    (old / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgecError, match=r"'model.layers.0.self_attn.k_proj.bias' has shape \[16\], config.json "
                                         r"implies \[48\]"):
        read_hf_llama(old)


# ---------------------------------------------------------------- refusals


def variant(src, dst, config=None, drop=()):
    """A copy of ``src`` with config.json keys changed and tensors dropped."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    if drop:
        tensors = load_file(str(dst / "model.safetensors"))
        save_file({k: v for k, v in tensors.items() if k not in drop}, str(dst / "model.safetensors"))
    return dst


def one_error_line(code, out, err, match):
    assert code == 2, err
    assert "Traceback" not in err, err
    # stderr that is not a terminal also gets plain progress lines ("importing DIR [0 s]"); one error line
    errors = [line for line in err.strip().splitlines() if not line.startswith("importing ")]
    assert len(errors) == 1 and errors[0].startswith("error: "), err
    assert match in errors[0], errors[0]
    assert json.loads(out)["exit_code"] == 2


def test_bad_folders_exit_2_with_one_line(hf_folders, tmp_path, monkeypatch, capsys):
    src = hf_folders["llama_gqa_bias"][0]
    out = tmp_path / "never.pt"

    gpt2 = variant(src, tmp_path / "gpt2", {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    proc = run_cli("import", "hf", gpt2, "-o", out, "--json")  # a real process: real exit code and stderr
    one_error_line(proc.returncode, proc.stdout, proc.stderr, "unknown architecture GPT2LMHeadModel")

    missing = variant(src, tmp_path / "missing", drop=["model.layers.1.mlp.down_proj.weight"])
    one_error_line(*cli(monkeypatch, capsys, "import", "hf", missing, "-o", out, "--json"),
                   "missing tensors: model.layers.1.mlp.down_proj.weight")

    shape = variant(src, tmp_path / "shape", {"intermediate_size": 80})
    one_error_line(*cli(monkeypatch, capsys, "import", "hf", shape, "-o", out, "--json"),
                   "tensor 'model.layers.0.mlp.down_proj.weight' has shape [48, 72], config.json implies [48, 80]")
    assert not out.exists()


def expect_error(folder, match):
    with pytest.raises(EdgecError, match=match) as info:
        read_hf_llama(folder)
    assert "\n" not in str(info.value)


def test_refusals_name_the_problem(hf_folders, tmp_path):
    src = hf_folders["llama_gqa_bias"][0]
    n = iter(range(100))

    def bad(**kw):
        return variant(src, tmp_path / f"v{next(n)}", **kw)

    expect_error(bad(config={"architectures": ["LlamaForSequenceClassification"]}),
                 "unsupported architecture LlamaForSequenceClassification")
    expect_error(bad(config={"architectures": None, "model_type": "phi3"}), "unknown architecture")
    # no architectures: model_type picks the family (Mistral has no attention biases)
    expect_error(bad(config={"architectures": None, "model_type": "mistral"}),
                 "unexpected tensor names for MistralForCausalLM with 2 layers: model.layers.0.mlp.down_proj.bias")
    expect_error(bad(config={"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}),
                 "rope type 'llama3' is not supported")
    expect_error(bad(config={"rope_scaling": {"type": "linear", "factor": 2.0}}), "rope type 'linear'")
    expect_error(bad(config={"hidden_act": "gelu"}), "hidden_act 'gelu' is not supported")
    expect_error(bad(config={"quantization_config": {"quant_method": "gptq"}}), "quantized checkpoints")
    expect_error(bad(config={"num_key_value_heads": 4}), "num_attention_heads 6 is not a multiple of "
                                                         "num_key_value_heads 4")
    expect_error(bad(config={"vocab_size": "101"}), "vocab_size must be a positive integer")
    extra = bad()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(extra / "model.safetensors"))
    save_file(dict(tensors, **{"model.layers.2.mlp.up_proj.weight": torch.zeros(72, 48)}),
              str(extra / "model.safetensors"))
    expect_error(extra, "unexpected tensor names for LlamaForCausalLM with 2 layers: model.layers.2.mlp.up_proj")
    broken = bad()
    (broken / "config.json").write_text("{not json")
    expect_error(broken, "config.json: invalid JSON")

    qwen = hf_folders["qwen2_sharded_window"][0]
    mixed = variant(qwen, tmp_path / "mixed", {"layer_types": ["full_attention", "sliding_attention"]})
    expect_error(mixed, r"sliding attention on layers \[1\] only")
    off = variant(qwen, tmp_path / "off", {"use_sliding_window": False})
    assert read_hf_llama(off)[0]["sliding_window"] is None  # Qwen2 ignores the window unless enabled

    tied = hf_folders["llama_tied_head_dim"][0]
    config, state = read_hf_llama(tied)
    from safetensors.torch import save_file

    both = variant(tied, tmp_path / "both")
    save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"] + 1}, str(both / "model.safetensors"))
    expect_error(both, "lm_head.weight differs from model.embed_tokens.weight")
