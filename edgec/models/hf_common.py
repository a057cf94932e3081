"""Reading Hugging Face model folders without ``transformers``: ``config.json``, ``model.safetensors`` (or a
sharded ``model.safetensors.index.json``), the family an ``edgec import hf`` folder belongs to, and the strict
name/shape/dtype check of a mapped state dict. Shared by the BERT (``hf_bert``) and Llama-family
(``hf_llama``) importers; every problem is one ``EdgecError`` line naming the file or tensor.

Only safetensors are read: ``pytorch_model.bin`` is a pickle.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from edgec.core.errors import EdgecError

# `architectures` entry -> zoo family that imports it; `model_type` is the fallback when no entry is known.
LLAMA_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")
BERT_ARCHITECTURES = ("BertModel", "BertForSequenceClassification", "BertForPreTraining", "BertForMaskedLM")


def read_config_json(path: Path) -> dict:
    """The JSON object in ``path`` (a ``config.json``)."""
    if not path.is_file():
        raise EdgecError(f"{path}: config.json not found (expected a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EdgecError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise EdgecError(f"{path}: expected a JSON object, got {type(hf).__name__}")
    return hf


def architectures(hf: dict, path: Path) -> list[str]:
    """``config.json``'s ``architectures`` list (empty when absent or null)."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise EdgecError(f"{path}: architectures must be a list of class names, got {archs!r}")
    return archs


def hf_family(folder) -> str:
    """``"bert"`` or ``"llama"``: which importer reads the Hugging Face folder (by ``architectures``, then
    ``model_type``). Anything else is refused, naming what the folder declares."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgecError(f"{folder}: Hugging Face model folder not found")
    path = folder / "config.json"
    hf = read_config_json(path)
    archs = architectures(hf, path)
    model_type = hf.get("model_type")
    if any(a in LLAMA_ARCHITECTURES for a in archs):
        return "llama"
    if model_type == "bert" or any(a.startswith("Bert") for a in archs):
        return "bert"
    if model_type in LLAMA_MODEL_TYPES:
        return "llama"  # hf_llama names the unsupported head (e.g. LlamaForSequenceClassification)
    supported = ", ".join([*BERT_ARCHITECTURES, *LLAMA_ARCHITECTURES])
    raise EdgecError(f"{path}: unknown architecture {', '.join(archs) or '(none)'} (model_type {model_type!r}); "
                     f"supported: {supported}")


def load_safetensors(folder: Path) -> tuple[dict, Path]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json; returns
    ``(tensors, source)`` with ``source`` the file to name in errors (the single file or the index)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise EdgecError(f"{index}: invalid safetensors index ({type(exc).__name__}: {exc})") from None
        for f in files:
            if not f.is_file():
                raise EdgecError(f"{index}: lists shard {f.name}, which is missing")
    else:
        pickles = [p.name for p in (folder / "pytorch_model.bin", folder / "pytorch_model.bin.index.json") if p.exists()]
        hint = (f"; found {pickles[0]}, but pytorch_model.bin pickles are not read for safety "
                "(convert it to safetensors)") if pickles else ""
        raise EdgecError(f"{single}: not found{hint}")
    tensors = {}
    for f in files:
        try:
            part = load_file(str(f), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise EdgecError(f"{f}: cannot read safetensors file: {exc}") from None
        twice = set(part) & set(tensors)
        if twice:
            raise EdgecError(f"{f}: tensors also in another shard: {listing(twice)}")
        tensors.update(part)
    return tensors, files[0] if len(files) == 1 else index


def listing(names, limit: int = 5) -> str:
    """Sorted, comma-separated, at most ``limit`` names then ``(+N more)``."""
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state(state: dict, expected: dict, source, what: str) -> dict:
    """``state`` against ``expected`` (name -> shape): refuses missing and unexpected names (``what`` says for
    which model) and wrong shapes; returns the tensors as float32 (fp16/bf16 allowed, integers refused)."""
    missing = set(expected) - set(state)
    if missing:
        raise EdgecError(f"{source}: missing tensors: {listing(missing)}")
    extra = set(state) - set(expected)
    if extra:
        raise EdgecError(f"{source}: unexpected tensor names for {what}: {listing(extra)}")
    out = {}
    for key in sorted(expected):
        got = tuple(state[key].shape)
        if got != tuple(expected[key]):
            raise EdgecError(f"{source}: tensor {key!r} has shape {list(got)}, config.json implies "
                             f"{list(expected[key])}")
        if not state[key].is_floating_point():
            raise EdgecError(f"{source}: tensor {key!r} has dtype {state[key].dtype}, expected floating point")
        out[key] = state[key].to(torch.float32)
    return out
