"""LLaMA-family decoder (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language Models"), written
for torch.fx and laid out like Hugging Face's ``LlamaForCausalLM``.

The parts: RMSNorm (Zhang & Sennrich, 2019) before attention and before the MLP, rotary position embeddings
(Su et al., 2021, "RoFormer", HF's rotate-half layout), grouped-query attention (Ainslie et al., 2023: ``n_kv``
key/value heads shared by ``n_heads / n_kv`` query heads each), a SwiGLU MLP (Shazeer, 2020:
``down(silu(gate(x)) * up(x))``) and an optionally tied output head. Qwen2 (q/k/v biases) and Mistral (a
sliding attention window) share the layout and are options of the same class.

Module names match HF's (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``, ``model.layers.N.mlp.
gate_proj``, ``model.norm``, ``lm_head``) so an HF checkpoint imports with an identity key mapping.

Two forwards share every module and formula:
- ``forward(input_ids) -> logits`` is what torch.fx traces, trains and prunes: a causal mask built from the
  sequence length, positions ``0..S-1``, no cache, no control flow on tensor values.
- ``forward_cached(input_ids, attention_mask, position_ids, past) -> (logits, present)`` serves generation:
  ``past`` holds per layer the keys and values of earlier tokens (``[B, n_kv, P, head_dim]``, after rotary),
  ``attention_mask`` covers all ``P + S`` positions (0 = padding), and ``present`` returns them extended by the
  new tokens. A query at absolute position ``P + i`` attends keys ``j <= P + i`` that are not padding (and within
  the sliding window when one is set), so prefill-then-decode gives the full-sequence logits.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.core.spec import InputSpec, TensorSpec, token_dims

MASKED = torch.finfo(torch.float32).min


class RMSNorm(nn.Module):
    """``y = w · x / sqrt(mean(x²) + eps)`` over the last dim, computed in float32 as HF does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_tables(positions, inv_freq):
    """cos and sin of ``positions ⊗ inv_freq``, duplicated to the full head dim (HF's layout)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def causal_bias(q_pos, k_pos, window: int | None):
    """0 where query position ``q_pos[i]`` may attend key position ``k_pos[j]``, ``MASKED`` elsewhere."""
    blocked = k_pos[None, :] > q_pos[:, None]
    if window is not None:
        blocked = blocked | (k_pos[None, :] <= q_pos[:, None] - window)
    return blocked.to(torch.float32) * MASKED


class LlamaAttention(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias):
        super().__init__()
        self.head_dim = head_dim
        self.n_rep = num_heads // num_kv_heads
        self.scaling = head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_bias)

    def project(self, x, cos, sin):
        """Queries, keys and values ``[B, heads, S, head_dim]``, rotary applied to queries and keys."""
        b, s = x.size(0), x.size(1)
        # -1 heads (not a stored count) so a pass that narrows the projections still runs.
        q = self.q_proj(x).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attend(self, q, k, v, bias):
        """``o_proj(softmax(q kᵀ / sqrt(d) + bias) v)``, each key/value head shared by ``n_rep`` query heads."""
        b, s = q.size(0), q.size(2)
        if self.n_rep > 1:
            k = torch.repeat_interleave(k, self.n_rep, dim=1)
            v = torch.repeat_interleave(v, self.n_rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + bias
        probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
        context = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(context)

    def forward(self, x, cos, sin, bias):
        q, k, v = self.project(x, cos, sin)
        return self.attend(q, k, v, bias)


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size, bias):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, rms_norm_eps,
                 qkv_bias, o_bias, mlp_bias):
        super().__init__()
        self.self_attn = LlamaAttention(hidden_size, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias)
        self.mlp = LlamaMLP(hidden_size, intermediate_size, mlp_bias)
        self.input_layernorm = RMSNorm(hidden_size, rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, rms_norm_eps)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, bias, past_k, past_v):
        q, k, v = self.self_attn.project(self.input_layernorm(x), cos, sin)
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        x = x + self.self_attn.attend(q, k, v, bias)
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class LlamaModel(nn.Module):
    def __init__(self, vocab_size, hidden_size, num_layers, layer_args, rms_norm_eps):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(hidden_size, **layer_args, rms_norm_eps=rms_norm_eps)
                                    for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size, rms_norm_eps)


class Llama(nn.Module):
    """A LLaMA-family causal LM: ``forward(input_ids [B, S]) -> logits [B, S, vocab]``."""

    summary = "LLaMA-family decoder LM (RMSNorm, rotary, grouped-query attention, SwiGLU); HF Llama/Qwen2/Mistral layout"

    def __init__(self, vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=None, max_position_embeddings=256,
                 rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, qkv_bias=False,
                 o_bias=False, mlp_bias=False, sliding_window=None):
        super().__init__()
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({num_key_value_heads})")
        head_dim = head_dim or hidden_size // num_attention_heads
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_layers = num_hidden_layers
        self.num_kv_heads = num_key_value_heads
        self.head_dim = head_dim
        self.sliding_window = sliding_window
        self.tie_word_embeddings = tie_word_embeddings
        layer_args = {"num_heads": num_attention_heads, "num_kv_heads": num_key_value_heads, "head_dim": head_dim,
                      "intermediate_size": intermediate_size, "qkv_bias": qkv_bias, "o_bias": o_bias,
                      "mlp_bias": mlp_bias}
        self.model = LlamaModel(vocab_size, hidden_size, num_hidden_layers, layer_args, rms_norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
        # A function of the config (HF does not save it); the traced graph keeps it as a buffer.
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._init_weights()
        if tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, std: float = 0.02):
        # HF's initializer_range: N(0, 0.02) weights, zero biases, unit norms.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    @staticmethod
    def default_config() -> dict:
        return {
            "vocab_size": 512, "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": None, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "qkv_bias": False,
            "o_bias": False, "mlp_bias": False, "sliding_window": None,
        }

    def input_spec(self) -> InputSpec:
        batch, seq = token_dims(self.max_position_embeddings)
        inputs = (TensorSpec("input_ids", (batch, seq), dtype="int64", high=self.vocab_size),)
        return InputSpec(inputs, outputs=("logits",), task="causal_lm", extra={"vocab_size": self.vocab_size})

    def forward(self, input_ids):
        positions = torch.arange(input_ids.size(1), device=input_ids.device)
        cos, sin = rotary_tables(positions, self.inv_freq)
        bias = causal_bias(positions, positions, self.sliding_window)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, bias)
        return self.lm_head(self.model.norm(x))

    def empty_cache(self, batch: int = 1, dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer an empty ``(key, value)`` pair ``[batch, n_kv, 0, head_dim]``: the past before a prefill."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)) for _ in range(self.num_layers)]

    def forward_cached(self, input_ids, attention_mask, position_ids, past):
        """Logits of the new tokens and the extended cache; see the module docstring for the layout."""
        s = input_ids.size(1)
        total = attention_mask.size(1)
        k_pos = torch.arange(total, device=input_ids.device)
        q_pos = k_pos[total - s:]
        bias = causal_bias(q_pos, k_pos, self.sliding_window)[None, None]
        bias = bias + (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * MASKED
        # Both terms are MASKED at a padded key in the future: clamp so the sum stays finite.
        bias = bias.clamp(min=MASKED)
        cos, sin = rotary_tables(position_ids, self.inv_freq)
        cos, sin = cos[:, None], sin[:, None]
        x = self.model.embed_tokens(input_ids)
        present = []
        for layer, (past_k, past_v) in zip(self.model.layers, past):
            x, k, v = layer.forward_cached(x, cos, sin, bias, past_k, past_v)
            present.append((k, v))
        return self.lm_head(self.model.norm(x)), present
