"""The zoo llama: cached decoding equals the full forward, grouped-query attention and the sliding window are the
formulas they claim, the model traces and its config round-trips; gates know the causal-LM metrics."""
import math

import pytest
import torch

from edgec.app import gates
from edgec.core.errors import EdgecError
from edgec.models.checkpoint import new_model
from edgec.models.llama import Llama, causal_bias, rotary_tables


def _incremental(model, ids, chunks):
    """Logits of ``ids`` fed in pieces of the given lengths through forward_cached."""
    b = ids.size(0)
    past, mask, outs, start = model.empty_cache(b), torch.ones(b, 0, dtype=torch.int64), [], 0
    for n in chunks:
        chunk = ids[:, start:start + n]
        mask = torch.cat([mask, torch.ones(b, n, dtype=torch.int64)], 1)
        pos = torch.arange(start, start + n)[None].expand(b, n)
        logits, past = model.forward_cached(chunk, mask, pos, past)
        outs.append(logits)
        start += n
    return torch.cat(outs, 1), past


@pytest.mark.parametrize("config", [{}, {"tie_word_embeddings": True, "qkv_bias": True, "o_bias": True},
                                    {"num_key_value_heads": 1, "mlp_bias": True}, {"sliding_window": 4}])
def test_cached_decoding_equals_full_forward(config):
    torch.manual_seed(0)
    model = Llama(**config).eval()
    ids = torch.randint(0, model.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(ids)
        inc, past = _incremental(model, ids, [4, 1, 1, 5])
    assert torch.allclose(inc, full, atol=1e-5, rtol=1e-5)
    assert past[0][0].shape == (2, model.num_kv_heads, 11, model.head_dim)


def test_left_padding_does_not_change_the_real_tokens():
    torch.manual_seed(1)
    model = Llama().eval()
    ids = torch.randint(0, model.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.int64), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        alone = model(ids)
        logits, _ = model.forward_cached(padded, mask, pos, model.empty_cache(1))
    assert torch.allclose(logits[:, 3:], alone, atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_is_hf_repeat_kv():
    """Query head h reads key/value head h // n_rep (HF's expand + reshape of the kv heads)."""
    torch.manual_seed(2)
    model = Llama(num_attention_heads=4, num_key_value_heads=2).eval()
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 5, 64)
    cos, sin = rotary_tables(torch.arange(5), model.inv_freq)
    bias = causal_bias(torch.arange(5), torch.arange(5), None)
    q, k, v = attn.project(x, cos, sin)
    out = []
    for h in range(4):
        s = q[:, h] @ k[:, h // 2].transpose(-1, -2) / math.sqrt(attn.head_dim) + bias
        out.append(torch.softmax(s, -1) @ v[:, h // 2])
    want = attn.o_proj(torch.stack(out, 1).transpose(1, 2).reshape(1, 5, -1))
    assert torch.allclose(attn.attend(q, k, v, bias), want, atol=1e-6)


def test_sliding_window_and_causal_mask():
    blocked = causal_bias(torch.arange(5), torch.arange(5), 2) < 0
    # query i sees keys i-1 and i only
    assert blocked.tolist() == [[j > i or j <= i - 2 for j in range(5)] for i in range(5)]


def test_zoo_llama_traces_and_keeps_hf_names():
    model = new_model("llama", {"num_hidden_layers": 1}, seed=0)
    names = set(model.gm.state_dict())
    assert {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.input_layernorm.weight", "model.norm.weight", "lm_head.weight"} <= names
    assert model.spec.task == "causal_lm"
    ids = torch.randint(0, 512, (2, 9))
    eager = Llama(num_hidden_layers=1)
    eager.load_state_dict(model.gm.state_dict(), strict=False)
    with torch.no_grad():
        assert torch.allclose(model.gm(ids), eager.eval()(ids), atol=1e-6)


def test_bad_head_counts_are_one_line_errors():
    with pytest.raises(EdgecError, match="multiple of num_key_value_heads"):
        new_model("llama", {"num_attention_heads": 4, "num_key_value_heads": 3})


def test_gates_know_causal_lm_metrics():
    g = gates.parse(min_metric=["accuracy=0.2"], max_metric_drop=0.05)
    gates.check_task(g, "causal_lm", "export")  # next-token accuracy is measured for LMs
    assert g.drop_metrics("causal_lm") == ["accuracy"]
    assert gates.parse(max_metric_drop=0.05).drop_metrics("causal_lm") == ["accuracy"]
    with pytest.raises(EdgecError, match="perplexity is lower-is-better"):
        gates.parse(min_metric=["perplexity=20"])
    with pytest.raises(EdgecError, match="is a classification metric but the model's task is causal_lm"):
        gates.check_task(gates.parse(min_metric=["uar=0.5"]), "causal_lm", "export")
