"""BERT encoder (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers for
Language Understanding", NAACL), written for torch.fx and laid out like Hugging Face's ``BertModel``.

The module names match HF's (``embeddings.word_embeddings``, ``encoder.layer.N.attention.self.query``,
``encoder.layer.N.intermediate.dense`` ...) so ``edgec.models.hf_bert`` imports a checkpoint with a
near-identity key mapping. Attention is written by hand (no ``nn.MultiheadAttention``, no SDPA, no
control flow on tensor values) so ``torch.fx.symbolic_trace`` sees every op, and every FFN is the plain
``Linear -> activation module -> Linear`` chain that the HRF and pruning passes look for.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.spec import InputSpec, TensorSpec, token_dims

# HF "gelu" is the exact erf GELU; "gelu_new" (a Python tanh formula) and "gelu_pytorch_tanh" are the
# tanh approximation, which equals nn.GELU(approximate="tanh") to float rounding.
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "relu": lambda: nn.ReLU(),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, hidden_size, max_position_embeddings, type_vocab_size, layer_norm_eps,
                 hidden_dropout_prob, pad_token_id):
        super().__init__()
        # padding_idx only changes training (no gradient into the pad row), as in HF.
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, input_ids):
        # arange, not a slice of a position buffer: fx hands buffers to forward as real tensors, which cannot
        # be sliced by a traced size. Same values as HF's position_ids[:, :seq].
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device)
        # token_type_ids are all zeros (single-segment input), HF's default when none are given.
        token_type_ids = torch.zeros_like(input_ids)
        # Same summation order as HF (word + type, then + position) so float rounding matches too.
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class BertSelfAttention(nn.Module):
    def __init__(self, hidden_size, num_attention_heads, attention_probs_dropout_prob):
        super().__init__()
        self.head_dim = hidden_size // num_attention_heads
        self.scaling = self.head_dim ** -0.5
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(attention_probs_dropout_prob)

    def forward(self, hidden_states, mask_bias):
        b, s = hidden_states.size(0), hidden_states.size(1)
        # -1 heads (not a stored count) so a pass that prunes whole heads from query/key/value still runs.
        q = self.query(hidden_states).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.key(hidden_states).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.value(hidden_states).reshape(b, s, -1, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + mask_bias
        probs = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, v).transpose(1, 2)
        return context.reshape(b, s, -1)


class BertSelfOutput(nn.Module):
    def __init__(self, hidden_size, layer_norm_eps, hidden_dropout_prob):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    def __init__(self, hidden_size, num_attention_heads, layer_norm_eps, hidden_dropout_prob,
                 attention_probs_dropout_prob):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_attention_heads, attention_probs_dropout_prob)
        self.output = BertSelfOutput(hidden_size, layer_norm_eps, hidden_dropout_prob)

    def forward(self, hidden_states, mask_bias):
        return self.output(self.self(hidden_states, mask_bias), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, hidden_size, intermediate_size, hidden_act):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        # A module (not F.gelu) so the FFN is three call_module nodes: Linear -> act -> Linear.
        self.intermediate_act_fn = ACTIVATIONS[hidden_act]()

    def forward(self, hidden_states):
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    def __init__(self, hidden_size, intermediate_size, layer_norm_eps, hidden_dropout_prob):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    def __init__(self, hidden_size, num_attention_heads, intermediate_size, hidden_act, layer_norm_eps,
                 hidden_dropout_prob, attention_probs_dropout_prob):
        super().__init__()
        self.attention = BertAttention(hidden_size, num_attention_heads, layer_norm_eps, hidden_dropout_prob,
                                       attention_probs_dropout_prob)
        self.intermediate = BertIntermediate(hidden_size, intermediate_size, hidden_act)
        self.output = BertOutput(hidden_size, intermediate_size, layer_norm_eps, hidden_dropout_prob)

    def forward(self, hidden_states, mask_bias):
        attention_output = self.attention(hidden_states, mask_bias)
        return self.output(self.intermediate(attention_output), attention_output)


class BertEncoder(nn.Module):
    def __init__(self, num_hidden_layers, **layer_kwargs):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(**layer_kwargs) for _ in range(num_hidden_layers)])

    def forward(self, hidden_states, mask_bias):
        for layer in self.layer:  # a Python loop over modules: fx unrolls it
            hidden_states = layer(hidden_states, mask_bias)
        return hidden_states


class BertPooler(nn.Module):
    def __init__(self, hidden_size):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states):
        # BERT pools by taking the [CLS] (first) token's hidden state.
        return self.activation(self.dense(hidden_states[:, 0]))


class Bert(nn.Module):
    """BERT encoder (Devlin et al., 2019) with an optional sequence-classification head.

    ``num_labels == 0``: outputs ``(last_hidden_state, pooler_output)`` (just ``last_hidden_state`` when
    ``add_pooler`` is False, as for HF's ``BertModel(add_pooling_layer=False)``). ``num_labels > 0``: outputs
    ``logits`` = classifier(dropout(pooler_output)), like HF's ``BertForSequenceClassification``.
    Inputs are ``input_ids`` and ``attention_mask`` (1 = attend, 0 = padding); token types are all zero.
    Config keys use HF's ``BertConfig`` names.
    """

    summary = "BERT encoder (Devlin et al. 2019), HF BertModel layout; features or sequence classification"

    def __init__(self, vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=512, hidden_act="gelu", max_position_embeddings=128, type_vocab_size=2,
                 layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
                 classifier_dropout=None, pad_token_id=0, num_labels=2, add_pooler=True):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise EdgecError(f"bert: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}")
        if hidden_act not in ACTIVATIONS:
            raise EdgecError(f"bert: unsupported hidden_act '{hidden_act}'; supported: {', '.join(ACTIVATIONS)}")
        if num_labels > 0 and not add_pooler:
            raise EdgecError("bert: a classification head (num_labels > 0) needs the pooler (add_pooler=True)")
        if pad_token_id is not None and not 0 <= pad_token_id < vocab_size:
            pad_token_id = None  # HF tolerates odd pad ids in configs; padding_idx only affects training
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.num_labels = num_labels
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
                                         layer_norm_eps, hidden_dropout_prob, pad_token_id)
        self.encoder = BertEncoder(num_hidden_layers, hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                                   intermediate_size=intermediate_size, hidden_act=hidden_act,
                                   layer_norm_eps=layer_norm_eps, hidden_dropout_prob=hidden_dropout_prob,
                                   attention_probs_dropout_prob=attention_probs_dropout_prob)
        self.pooler = BertPooler(hidden_size) if add_pooler else None
        if num_labels > 0:
            self.dropout = nn.Dropout(hidden_dropout_prob if classifier_dropout is None else classifier_dropout)
            self.classifier = nn.Linear(hidden_size, num_labels)
        self._init_weights()

    def _init_weights(self, std: float = 0.02):
        # HF BERT's initialisation (N(0, 0.02) weights, zero biases, unit LayerNorm), so a
        # freshly built zoo model has activations at the scale of a real checkpoint.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
                elif m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def default_config() -> dict:
        return {
            "vocab_size": 1000, "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
            "intermediate_size": 512, "hidden_act": "gelu", "max_position_embeddings": 128,
            "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "classifier_dropout": None, "pad_token_id": 0,
            "num_labels": 2, "add_pooler": True,
        }

    def input_spec(self) -> InputSpec:
        batch, seq = token_dims(self.max_position_embeddings)
        inputs = (
            TensorSpec("input_ids", (batch, seq), dtype="int64", high=self.vocab_size),
            TensorSpec("attention_mask", (batch, seq), dtype="int64", ones=True),
        )
        if self.num_labels > 0:
            # HF treats num_labels == 1 as regression (MSE on the single logit).
            task = "regression" if self.num_labels == 1 else "classification"
            return InputSpec(inputs, outputs=("logits",), task=task, extra={"num_labels": self.num_labels})
        outputs = ("last_hidden_state", "pooler_output") if self.pooler is not None else ("last_hidden_state",)
        return InputSpec(inputs, outputs=outputs, task="features")

    def forward(self, input_ids, attention_mask):
        # HF's extended mask: 0 where attended, float32 min where padded, broadcast over heads and queries.
        # finfo.min (not -inf) keeps a fully padded row finite (uniform softmax) instead of NaN.
        mask = attention_mask[:, None, None, :].to(torch.float32)
        mask_bias = (1.0 - mask) * torch.finfo(torch.float32).min
        hidden = self.encoder(self.embeddings(input_ids), mask_bias)
        if self.num_labels > 0:
            return self.classifier(self.dropout(self.pooler(hidden)))
        if self.pooler is None:
            return (hidden,)
        return hidden, self.pooler(hidden)
