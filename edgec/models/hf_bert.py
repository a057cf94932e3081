"""Import Hugging Face BERT checkpoints (``config.json`` + ``model.safetensors``) into the zoo ``bert``.

Reads the files directly (no ``transformers`` import; file reading shared with the Llama importer in
``hf_common``) and only safetensors, since ``pytorch_model.bin`` is a pickle. The zoo ``Bert`` mirrors HF's
module names, so the key mapping is near-identity. Mapping rules and the decisions about heads, pooler and
defaults: see docs/architecture.md#data-and-imports.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edgec.core.errors import EdgecError
from edgec.models.bert import ACTIVATIONS, Bert
from edgec.models.hf_common import architectures, check_state, listing, load_safetensors, read_config_json

# transformers.BertConfig defaults, used for keys a config.json leaves out.
HF_DEFAULTS = {
    "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "pad_token_id": 0, "classifier_dropout": None,
}
INT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size")
FLOAT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps")
DROPPED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
PRETRAINING_HEADS = "cls."
SEQ_CLS_ARCH = "BertForSequenceClassification"


def read_hf_config(path: Path) -> dict:
    """config.json -> zoo ``bert`` config (without num_labels / add_pooler, which come from the tensors)."""
    hf = read_config_json(path)
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise EdgecError(f"{path}: model_type is {model_type!r}, expected 'bert'")
    act = hf.get("hidden_act", HF_DEFAULTS["hidden_act"])
    if act not in ACTIVATIONS:
        raise EdgecError(f"{path}: hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    pos = hf.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise EdgecError(f"{path}: position_embedding_type {pos!r} is not supported; only 'absolute'")
    # A decoder BERT attends causally (and may cross-attend); the zoo model is a bidirectional encoder.
    for key in ("is_decoder", "add_cross_attention"):
        if hf.get(key):
            raise EdgecError(f"{path}: {key} is true; only bidirectional BERT encoders are supported")

    config = {key: hf.get(key, default) for key, default in HF_DEFAULTS.items()}
    config["hidden_act"] = act
    for key in INT_KEYS:
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise EdgecError(f"{path}: {key} must be a positive integer, got {value!r}")
    for key in FLOAT_KEYS:
        value = config[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise EdgecError(f"{path}: {key} must be a non-negative number, got {value!r}")
        config[key] = float(value)
    if config["classifier_dropout"] is not None:
        config["classifier_dropout"] = float(config["classifier_dropout"])
    pad = config["pad_token_id"]
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)):
        raise EdgecError(f"{path}: pad_token_id must be an integer or null, got {pad!r}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise EdgecError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
                         f"num_attention_heads {config['num_attention_heads']}")
    config["_architectures"] = architectures(hf, path)
    return config


def map_hf_keys(tensors: dict, source: str) -> tuple[dict, bool]:
    """HF names -> zoo names; returns (state_dict, has_classifier). Raises on names it cannot place."""
    state, has_classifier = {}, False
    unexpected = []
    for name, tensor in tensors.items():
        key = name[len("bert."):] if name.startswith("bert.") else name
        if key.endswith(".gamma"):  # TF-era names, renamed by HF's loader too
            key = key[: -len(".gamma")] + ".weight"
        elif key.endswith(".beta"):
            key = key[: -len(".beta")] + ".bias"
        if key in DROPPED_BUFFERS or key.startswith(PRETRAINING_HEADS):
            continue
        if key.startswith("classifier."):
            if name != key:  # "bert.classifier.*" is not a layout HF writes
                unexpected.append(name)
                continue
            has_classifier = True
        elif not key.startswith(("embeddings.", "encoder.", "pooler.")):
            unexpected.append(name)
            continue
        if key in state:
            raise EdgecError(f"{source}: tensor {name!r} maps to {key!r}, which another tensor already gave")
        state[key] = tensor
    if unexpected:
        raise EdgecError(f"{source}: unexpected tensor names for BERT: {listing(unexpected)}")
    return state, has_classifier


def read_hf_bert(folder) -> tuple[dict, dict]:
    """Read a Hugging Face BERT folder; return ``(config, state_dict)`` for the zoo ``bert``.

    ``Bert(**config).load_state_dict(state_dict)`` (strict) then reproduces transformers' ``BertModel``
    (or ``BertForSequenceClassification``) outputs. Raises ``EdgecError`` with one line naming the file or
    tensor for every problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgecError(f"{folder}: Hugging Face model folder not found")
    config = read_hf_config(folder / "config.json")
    archs = config.pop("_architectures")
    tensors, source = load_safetensors(folder)
    state, has_classifier = map_hf_keys(tensors, str(source))

    if has_classifier:
        if archs and SEQ_CLS_ARCH not in archs:
            # Token classification / multiple choice also use "classifier.*" but a different head.
            raise EdgecError(f"{folder / 'config.json'}: architectures {archs} has a 'classifier' head "
                             f"that is not {SEQ_CLS_ARCH}; only sequence classification is supported")
        weight = state.get("classifier.weight")
        if weight is None or weight.dim() != 2:
            raise EdgecError(f"{source}: classifier.weight missing or not 2-D")
        config["num_labels"] = int(weight.shape[0])
    else:
        config["num_labels"] = 0
    config["add_pooler"] = any(k.startswith("pooler.") for k in state)
    if has_classifier and not config["add_pooler"]:
        raise EdgecError(f"{source}: missing tensors pooler.dense.weight, pooler.dense.bias "
                         "(a sequence classifier reads the pooled output)")

    # Build on the meta device: just the expected names and shapes, no memory or init time.
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Bert(**config).state_dict().items()}
    state = check_state(state, expected, source, f"BERT with {config['num_hidden_layers']} layers")
    return config, state


def load_hf_bert(folder):
    """Convenience: the zoo ``Bert`` (eval mode) with the weights of a Hugging Face BERT folder."""
    config, state = read_hf_bert(folder)
    model = Bert(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()
