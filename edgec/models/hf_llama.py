"""Import Hugging Face Llama-family decoders (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``)
from ``config.json`` + ``model.safetensors`` (or a sharded index) into the zoo ``llama``, without ``transformers``.

The zoo ``Llama`` uses HF's module names, so tensors map by identity (``model.layers.N.self_attn.q_proj.weight``
...); old checkpoints' ``rotary_emb.inv_freq`` buffers are dropped (a function of the config, as HF does). The
config mapping follows transformers' own config classes, including their defaults for keys a ``config.json``
leaves out (they differ per family: Qwen2 defaults to 32 key/value heads, Mistral to 8 and a 4096 window):

- Llama: ``attention_bias`` -> ``qkv_bias`` and ``o_bias``; ``mlp_bias``; no sliding window.
- Qwen2: q/k/v biases, none on ``o_proj`` or the MLP; the window ``sliding_window`` applies only with
  ``use_sliding_window``, and only on the layers ``layer_types`` (else ``i >= max_window_layers``) marks sliding;
  the zoo model has one window for every layer, so a mix of sliding and full layers is refused.
- Mistral: no biases; ``sliding_window`` (null = none) on every layer.
- All: ``head_dim`` (else ``hidden_size // num_attention_heads``), ``num_key_value_heads`` (null = one per
  query head), ``rope_theta`` (top level or in ``rope_parameters`` / ``rope_scaling``), ``rms_norm_eps``,
  ``tie_word_embeddings`` (then ``lm_head.weight`` may be absent; if present it must equal the embedding).

Refused, one line each: rotary scaling of any type but ``default`` (linear, dynamic, yarn, llama3, longrope...),
a partial rotary factor, an activation other than SiLU, quantized checkpoints, other architectures, missing,
unexpected or wrongly shaped tensors, integer tensors. fp16/bf16 weights load as float32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from edgec.core.errors import EdgecError
from edgec.models.hf_common import (
    LLAMA_ARCHITECTURES,
    LLAMA_MODEL_TYPES,
    architectures,
    check_state,
    load_safetensors,
    read_config_json,
)
from edgec.models.llama import Llama

# transformers' LlamaConfig / Qwen2Config / MistralConfig defaults, for keys a config.json leaves out.
COMMON_DEFAULTS = {
    "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": None,
}
FAMILY_DEFAULTS = {
    "llama": {**COMMON_DEFAULTS, "intermediate_size": 11008, "num_key_value_heads": None,
              "max_position_embeddings": 2048, "attention_bias": False, "mlp_bias": False},
    "qwen2": {**COMMON_DEFAULTS, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "layer_types": None},
    "mistral": {**COMMON_DEFAULTS, "intermediate_size": 14336, "num_key_value_heads": 8,
                "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}
DEFAULT_ROPE_THETA = 10000.0
SILU = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU
INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings")
BOOL_KEYS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
DROPPED_SUFFIX = "rotary_emb.inv_freq"  # a non-persistent buffer that old checkpoints saved
LAYER_TYPES = ("full_attention", "sliding_attention")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def llama_family(hf: dict, path: Path) -> tuple[str, str]:
    """``(family, architecture)`` of a config: by ``architectures``, else by ``model_type``."""
    archs = architectures(hf, path)
    model_type = hf.get("model_type")
    for arch in archs:
        if arch in LLAMA_ARCHITECTURES:
            return LLAMA_ARCHITECTURES[arch], arch
    supported = ", ".join(LLAMA_ARCHITECTURES)
    if archs:
        raise EdgecError(f"{path}: unsupported architecture {', '.join(archs)} (model_type {model_type!r}); "
                         f"supported: {supported}")
    if model_type in LLAMA_MODEL_TYPES:
        arch = next(a for a, fam in LLAMA_ARCHITECTURES.items() if fam == model_type)
        return model_type, arch
    raise EdgecError(f"{path}: unknown architecture (no architectures, model_type {model_type!r}); "
                     f"supported: {supported}")


def rope_theta(hf: dict, path: Path) -> float:
    """The rotary base; refuses any scaled or partial rotary embedding (the zoo model has the plain one)."""
    # transformers 5 writes `rope_parameters`; 4.x wrote `rope_theta` and `rope_scaling` (which wins).
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise EdgecError(f"{path}: rope_scaling / rope_parameters must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise EdgecError(f"{path}: per-layer-type rope_parameters ({', '.join(sorted(params))}) are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in (None, "default"):
        raise EdgecError(f"{path}: rope type {kind!r} is not supported; the zoo llama has plain rotary "
                         "embeddings (rope type 'default')")
    factor = params.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor is not None and factor != 1:
        raise EdgecError(f"{path}: partial_rotary_factor {factor!r} is not supported; only 1.0")
    theta = params.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA))
    if not _number(theta) or theta <= 0:
        raise EdgecError(f"{path}: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def sliding_window(family: str, hf: dict, num_layers: int, path: Path) -> int | None:
    """The attention window as transformers applies it (None: full causal attention)."""
    if family == "llama":
        return None
    window = hf["sliding_window"]
    if family == "qwen2" and not hf["use_sliding_window"]:
        return None
    if window is None:
        return None
    if not _positive_int(window):
        raise EdgecError(f"{path}: sliding_window must be a positive integer or null, got {window!r}")
    if family == "mistral":
        return window
    types = hf["layer_types"]
    if types is None:
        first = hf["max_window_layers"]
        if not isinstance(first, int) or isinstance(first, bool):
            raise EdgecError(f"{path}: max_window_layers must be an integer, got {first!r}")
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(num_layers)]
    if not isinstance(types, list) or len(types) != num_layers or any(t not in LAYER_TYPES for t in types):
        raise EdgecError(f"{path}: layer_types must list {num_layers} entries of {', '.join(LAYER_TYPES)}, "
                         f"got {types!r}")
    if set(types) == {"full_attention"}:
        return None
    if set(types) == {"sliding_attention"}:
        return window
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    raise EdgecError(f"{path}: sliding attention on layers {sliding} only (use_sliding_window with "
                     "max_window_layers/layer_types) is not supported; the zoo llama uses one window for all layers")


def read_llama_config(path: Path) -> tuple[dict, str]:
    """config.json -> ``(zoo llama config, HF architecture)``."""
    raw = read_config_json(path)
    family, arch = llama_family(raw, path)
    quant = raw.get("quantization_config")
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise EdgecError(f"{path}: quantized checkpoints (quantization_config, method {method!r}) are not supported; "
                         "import the full-precision weights")
    hf = {key: raw.get(key, default) for key, default in FAMILY_DEFAULTS[family].items()}
    act = hf["hidden_act"]
    if act not in SILU:
        raise EdgecError(f"{path}: hidden_act {act!r} is not supported; the zoo llama's MLP uses silu")
    if hf["num_key_value_heads"] is None:
        hf["num_key_value_heads"] = hf["num_attention_heads"]
    for key in INT_KEYS:
        if not _positive_int(hf[key]):
            raise EdgecError(f"{path}: {key} must be a positive integer, got {hf[key]!r}")
    for key in BOOL_KEYS:
        if key in hf and not isinstance(hf[key], bool):
            raise EdgecError(f"{path}: {key} must be true or false, got {hf[key]!r}")
    eps = hf["rms_norm_eps"]
    if not _number(eps) or eps < 0:
        raise EdgecError(f"{path}: rms_norm_eps must be a non-negative number, got {eps!r}")
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    if heads % kv_heads:
        raise EdgecError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = hf["head_dim"] if hf["head_dim"] is not None else hf["hidden_size"] // heads
    if not _positive_int(head_dim) or head_dim % 2:
        raise EdgecError(f"{path}: head_dim must be a positive even integer (rotary embeddings), got {head_dim!r}")

    qkv_bias = {"llama": hf.get("attention_bias", False), "qwen2": True, "mistral": False}[family]
    config = {
        "vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
        "intermediate_size": hf["intermediate_size"], "num_hidden_layers": hf["num_hidden_layers"],
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": hf["max_position_embeddings"], "rms_norm_eps": float(eps),
        "rope_theta": rope_theta(raw, path), "tie_word_embeddings": hf["tie_word_embeddings"],
        "qkv_bias": qkv_bias, "o_bias": family == "llama" and hf["attention_bias"],
        "mlp_bias": family == "llama" and hf["mlp_bias"],
        "sliding_window": sliding_window(family, hf, hf["num_hidden_layers"], path),
    }
    return config, arch


def expected_shapes(config: dict) -> dict:
    """Name -> shape of the zoo ``llama`` state dict for ``config`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Llama(**config).state_dict().items()}


def read_hf_llama(folder) -> tuple[dict, dict]:
    """Read a Hugging Face Llama / Qwen2 / Mistral causal-LM folder; return ``(config, state_dict)`` for the zoo
    ``llama``: ``Llama(**config).load_state_dict(state_dict)`` (strict) reproduces transformers' logits.

    Raises ``EdgecError`` with one line naming the file or tensor for every problem.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgecError(f"{folder}: Hugging Face model folder not found")
    config, arch = read_llama_config(folder / "config.json")
    tensors, source = load_safetensors(folder)
    state = {k: v for k, v in tensors.items() if not k.endswith(DROPPED_SUFFIX)}
    expected = expected_shapes(config)
    tied = config["tie_word_embeddings"]
    if tied:
        del expected["lm_head.weight"]  # the embedding matrix, shared
        head, embed = state.pop("lm_head.weight", None), state.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head.to(torch.float32), embed.to(torch.float32)):
            raise EdgecError(f"{source}: tie_word_embeddings is true but lm_head.weight differs from "
                             "model.embed_tokens.weight")
    state = check_state(state, expected, source, f"{arch} with {config['num_hidden_layers']} layers")
    if tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return config, state


def load_hf_llama(folder) -> Llama:
    """Convenience: the zoo ``Llama`` (eval mode) with the weights of a Hugging Face Llama-family folder."""
    config, state = read_hf_llama(folder)
    model = Llama(**config)
    model.load_state_dict(state, strict=True)
    return model.eval()
