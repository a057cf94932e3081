"""Text for causal language models: token-id files and text folders -> packed next-token blocks.

Two sources give a ``causal_lm`` DataBundle:

* a **token file** (.safetensors / .npz / .pt, read weights-only like any tensor file) holding 1-D integer
  streams ``input_ids_train`` and optionally ``input_ids_val`` / ``input_ids_test``, optional scalar integers
  ``bytes_train`` / ``bytes_val`` / ``bytes_test`` (UTF-8 bytes of the text each stream encodes: bits per byte)
  and ``vocab_size``. The keys decide: a file that also holds classification keys (``inputs``, ``targets``,
  ``classes``, ...) is refused.
* a **text folder**: ``train.txt`` (required), ``val.txt``, ``test.txt`` (UTF-8) and ``tokenizer.json`` (the
  Hugging Face ``tokenizers`` format). Documents are separated by two or more blank lines (a single blank line
  is a paragraph break inside a document); each document is encoded without special tokens and the
  tokenizer's end-of-text token (the first special token among ``EOS_TOKENS``, if it has one) goes between
  documents. Bytes are those of the whole file's UTF-8 text. The ids are cached under ``cache_dir`` by a
  digest of the tokenizers version, tokenizer.json and the texts.

Packing: a stream of L tokens gives N = (L - 1) // T non-overlapping windows of T + 1 tokens with stride T
(``w_i = ids[i*T : i*T + T + 1]``), items ``(x, y) = (w_i[:-1], w_i[1:])``, int64 [T]; the tail that does not
fill a window is dropped. Without a val stream, the last ``val_fraction`` of the train stream (contiguous, at
least T + 1 tokens) is held out: random blocks would leak their neighbours' text into training.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from edgec.core.errors import EdgecError
from edgec.core.fileio import atomic_write
from edgec.data.bundle import SPLIT_NAMES, DataBundle, TensorPairDataset, check_plain_tensor
from edgec.data.tensors import KNOWN_KEYS as CLASSIFICATION_KEYS
from edgec.data.tensors import read_tensor_file

DEFAULT_BLOCK_SIZE = 128
MIN_BLOCK_SIZE = 2
STREAM_KEYS = {s: f"input_ids_{s}" for s in SPLIT_NAMES}
BYTES_KEYS = {s: f"bytes_{s}" for s in SPLIT_NAMES}
TOKEN_KEYS = set(STREAM_KEYS.values()) | set(BYTES_KEYS.values()) | {"vocab_size"}
TEXT_FILES = {s: f"{s}.txt" for s in SPLIT_NAMES}
TOKENIZER_JSON = "tokenizer.json"
# End-of-text / separator tokens, by preference: the first one the tokenizer has as a special token separates
# documents.
EOS_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]", "<sep>")
DOC_SEPARATOR = re.compile(r"\r?\n(?:[ \t]*\r?\n){2,}")  # two or more blank lines
CACHE_VERSION = "edgec-data/text-tokens/v1"


def default_cache_dir() -> str:
    """``$EDGEC_CACHE/tokens`` if EDGEC_CACHE is set, else ``./.cache/edgec/tokens``."""
    root = os.environ.get("EDGEC_CACHE")
    if root:
        return os.path.join(root, "tokens")
    return os.path.join(os.getcwd(), ".cache", "edgec", "tokens")


def is_token_data(keys) -> bool:
    """Whether a tensor file's keys make it a token-id file."""
    return any(k in TOKEN_KEYS for k in keys)


def is_text_folder(path: str) -> bool:
    """A folder with train.txt and without labels.csv (that one is an audio folder)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, TEXT_FILES["train"]))
            and not os.path.isfile(os.path.join(path, "labels.csv")))


def max_sequence(spec) -> int | None:
    """The most tokens a model's first input takes along its sequence axis (axis 1): the fixed size, the
    dynamic axis's max, or None when the spec does not say."""
    inputs = getattr(spec, "inputs", None) or []
    if not inputs or len(inputs[0].dims) < 2:
        return None
    dim = inputs[0].dims[1]
    if isinstance(dim, int):
        return dim
    top = getattr(dim, "max", None)
    return int(top) if isinstance(top, int) and top > 0 else None


def resolve_block_size(block_size, max_block_size: int | None = None) -> int:
    """``block_size``, or ``DEFAULT_BLOCK_SIZE`` capped at ``max_block_size``; checked to be an int >= 2 that
    the model takes."""
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE if max_block_size is None else min(DEFAULT_BLOCK_SIZE, int(max_block_size))
        if block_size < MIN_BLOCK_SIZE:
            raise EdgecError(f"the model takes at most {max_block_size} tokens; a causal-LM block needs at least "
                             f"{MIN_BLOCK_SIZE}")
        return block_size
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < MIN_BLOCK_SIZE:
        raise EdgecError(f"block_size must be an integer >= {MIN_BLOCK_SIZE} (got {block_size!r})")
    if max_block_size is not None and block_size > max_block_size:
        raise EdgecError(f"block_size {block_size} is longer than the model's maximum sequence ({max_block_size} "
                         f"tokens); pass --block-size {max_block_size} or less")
    return int(block_size)


def pack_blocks(ids: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)``, each int64 [N, T]: windows ``ids[i*T : i*T + T + 1]`` for i < N = (L - 1) // T, x = the
    window without its last token, y = without its first (N may be 0)."""
    t = int(block_size)
    ids = ids.reshape(-1).to(torch.int64)
    n = max(len(ids) - 1, 0) // t
    x = ids[: n * t].reshape(n, t).contiguous()
    y = ids[1 : n * t + 1].reshape(n, t).contiguous()
    return x, y


# ------------------------------------------------------------------------------------------- checks

def _check_stream(v, where: str) -> torch.Tensor:
    """A 1-D int64 tensor of non-negative ids (at least 2)."""
    if isinstance(v, np.ndarray):
        v = torch.from_numpy(np.ascontiguousarray(v))
    if not isinstance(v, torch.Tensor):
        raise EdgecError(f"{where} must be a 1-D integer tensor, found {type(v).__name__}")
    check_plain_tensor(v, where)
    if v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
        raise EdgecError(f"{where} must hold integer token ids, found dtype {str(v.dtype).replace('torch.', '')}")
    if v.ndim != 1:
        raise EdgecError(f"{where} must be a 1-D stream of token ids, found shape {tuple(v.shape)}")
    if len(v) < 2:
        raise EdgecError(f"{where} is {'empty' if len(v) == 0 else 'a single token'}; a stream needs at least 2 "
                         "tokens (one prediction)")
    a = v.numpy()
    if a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
        raise EdgecError(f"{where} holds ids beyond the int64 range (max {int(a.max())})")
    v = torch.from_numpy(a.astype(np.int64, copy=False)) if a.dtype != np.int64 else v
    low = int(v.min())
    if low < 0:
        raise EdgecError(f"{where} has negative token ids (min {low}, first at position {int((v < 0).nonzero()[0])})")
    return v.contiguous()


def _scalar_int(v, where: str, minimum: int) -> int:
    """A Python int, or a one-element integer tensor/array, >= minimum."""
    if isinstance(v, (np.ndarray, np.generic)):
        v = torch.from_numpy(np.asarray(v))
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
            raise EdgecError(f"{where} must be one integer, found a {str(v.dtype).replace('torch.', '')} tensor of "
                             f"shape {tuple(v.shape)}")
        v = int(v.reshape(()).item())
    if isinstance(v, bool) or not isinstance(v, int):
        raise EdgecError(f"{where} must be one integer, found {type(v).__name__}")
    if v < minimum:
        raise EdgecError(f"{where} must be >= {minimum} (got {v})")
    return v


def _check_vocab(streams: dict, vocab: int | None, where: str) -> None:
    if vocab is None:
        return
    for s, ids in streams.items():
        top = int(ids.max())
        if top >= vocab:
            raise EdgecError(f"{where}: {s} token id {top} is out of range for vocab_size {vocab} (first at position "
                             f"{int((ids >= vocab).nonzero()[0])})")


# ------------------------------------------------------------------------------------------- token files

def _token_streams(path: str, tensors: dict, classes) -> tuple[dict, dict, int | None, list[str]]:
    """``(streams, bytes, vocab_size, ignored keys)`` of a token file's tensors."""
    mixed = sorted(k for k in tensors if k in CLASSIFICATION_KEYS) + (["classes"] if classes is not None else [])
    if mixed:
        raise EdgecError(f"{path}: mixes token-id keys (input_ids_*) with classification keys ({', '.join(mixed)}); "
                         "a data file is one or the other")
    if STREAM_KEYS["train"] not in tensors:
        found = ", ".join(sorted(tensors)) or "nothing"
        raise EdgecError(f"{path}: a token-id file needs 'input_ids_train' (found: {found})")
    streams, nbytes = {}, {}
    for s in SPLIT_NAMES:
        if STREAM_KEYS[s] in tensors:
            streams[s] = _check_stream(tensors[STREAM_KEYS[s]], f"{path}: '{STREAM_KEYS[s]}'")
        if BYTES_KEYS[s] in tensors:
            if s not in streams:
                raise EdgecError(f"{path}: has '{BYTES_KEYS[s]}' but not '{STREAM_KEYS[s]}'")
            nbytes[s] = _scalar_int(tensors[BYTES_KEYS[s]], f"{path}: '{BYTES_KEYS[s]}'", 1)
    vocab = _scalar_int(tensors["vocab_size"], f"{path}: 'vocab_size'", 1) if "vocab_size" in tensors else None
    _check_vocab(streams, vocab, path)
    return streams, nbytes, vocab, sorted(set(tensors) - TOKEN_KEYS)


def load_token_file(path: str, *, block_size: int | None = None, max_block_size: int | None = None,
                    val_fraction: float = 0.2, loaded: tuple | None = None) -> DataBundle:
    """The causal-LM bundle of a token-id file; ``loaded``: what ``read_tensor_file(path)`` returned."""
    tensors, classes, raw = loaded if loaded is not None else read_tensor_file(path)
    block = resolve_block_size(block_size, max_block_size)
    streams, nbytes, vocab, ignored = _token_streams(path, tensors, classes)
    h = hashlib.sha256()
    h.update(b"edgec-data/token-file/v1\0")
    h.update(raw)
    notes = [f"ignored keys: {', '.join(ignored)}"] if ignored else []
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    return _bundle(path, "token file", f"tokens-{suffix}", streams, nbytes, vocab, block, val_fraction, h, notes,
                   {"eos_id": None})


# ------------------------------------------------------------------------------------------- text folders

def _tokenizer(path: str):
    from tokenizers import Tokenizer  # the Rust library: only text folders need it

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return Tokenizer.from_str(text), text.encode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgecError(f"{path}: unreadable ({type(e).__name__}: {e})".splitlines()[0]) from None
    except Exception as e:  # the library raises a bare Exception for malformed JSON or an unknown model
        raise EdgecError(f"{path}: not a readable tokenizers file ({e})".splitlines()[0]) from None


def eos_token(tok) -> tuple[str | None, int | None]:
    """``(token, id)`` of the tokenizer's end-of-text/separator special token (``EOS_TOKENS`` order), or Nones."""
    special = {}
    for tid, added in sorted(tok.get_added_tokens_decoder().items()):
        if added.special:
            special.setdefault(added.content, tid)
    for name in EOS_TOKENS:
        if name in special:
            return name, special[name]
    return None, None


def split_documents(text: str) -> list[str]:
    """The documents of a text file: separated by two or more blank lines; blank ones dropped."""
    return [d for d in DOC_SEPARATOR.split(text) if d.strip()]


def tokenize_text(text: str, tok, eos_id: int | None) -> np.ndarray:
    """int64 ids of a text file's documents, ``eos_id`` between documents (when not None)."""
    docs = split_documents(text)
    enc = tok.encode_batch(docs, add_special_tokens=False) if docs else []
    parts = []
    for i, e in enumerate(enc):
        if i and eos_id is not None:
            parts.append(np.array([eos_id], dtype=np.int64))
        parts.append(np.asarray(e.ids, dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _read_text(path: str) -> tuple[str, bytes]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgecError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise EdgecError(f"{path}: unreadable ({e.strerror or e})") from None
    return text, raw


def _load_cached(path: str, names: list[str]) -> dict | None:
    try:
        with open(path, "rb") as f:
            obj = st_load(f.read())
        if sorted(k for k in obj if k.startswith("input_ids_")) != sorted(STREAM_KEYS[s] for s in names):
            return None
        return obj
    except Exception:
        return None  # absent or unusable: tokenize again


def _tokenize_folder(folder: str, files: dict, tok, tok_raw: bytes, eos_id, cache_dir: str, notes: list) -> tuple:
    """``(streams, bytes, token digest, from_cache)``: the splits' ids from the cache, or tokenized and cached."""
    import tokenizers

    texts = {s: _read_text(p) for s, p in files.items()}
    h = hashlib.sha256()
    h.update(f"{CACHE_VERSION}\0tokenizers {tokenizers.__version__}\0".encode())
    h.update(hashlib.sha256(tok_raw).digest())
    for s, (_, raw) in texts.items():
        h.update(f"\0{s}\0".encode())
        h.update(hashlib.sha256(raw).digest())
    digest = h.hexdigest()
    nbytes = {s: len(text.encode("utf-8")) for s, (text, _) in texts.items()}
    cache_path = os.path.join(cache_dir, f"{digest}.safetensors")
    cached = _load_cached(cache_path, list(files))
    if cached is not None:
        return {s: cached[STREAM_KEYS[s]].to(torch.int64) for s in files}, nbytes, digest, True
    streams = {}
    for s, (text, _) in texts.items():
        ids = tokenize_text(text, tok, eos_id)
        if len(ids) < 2:
            raise EdgecError(f"{files[s]}: holds {'no' if len(ids) == 0 else 'a single'} token; a split needs at "
                             "least 2 tokens (one prediction)")
        streams[s] = torch.from_numpy(ids)
    try:
        atomic_write(cache_path, st_save({STREAM_KEYS[s]: v.to(torch.int32) for s, v in streams.items()}))
    except OSError as e:
        notes.append(f"token cache not written ({cache_dir}: {e.strerror or e})")
    return streams, nbytes, digest, False


def load_text_folder(folder: str, *, block_size: int | None = None, max_block_size: int | None = None,
                     val_fraction: float = 0.2, cache_dir: str | None = None) -> DataBundle:
    """The causal-LM bundle of ``train.txt`` [``val.txt``, ``test.txt``] + ``tokenizer.json`` in ``folder``."""
    if not os.path.isdir(folder):
        raise EdgecError(f"{folder}: no such data folder")
    files = {s: os.path.join(folder, TEXT_FILES[s]) for s in SPLIT_NAMES
             if os.path.isfile(os.path.join(folder, TEXT_FILES[s]))}
    if "train" not in files:
        raise EdgecError(f"{folder}: a text folder needs train.txt (and tokenizer.json)")
    tok_path = os.path.join(folder, TOKENIZER_JSON)
    if not os.path.isfile(tok_path):
        raise EdgecError(f"{tok_path}: not found (a text folder needs the tokenizer that encodes its text)")
    block = resolve_block_size(block_size, max_block_size)
    tok, tok_raw = _tokenizer(tok_path)
    vocab = int(tok.get_vocab_size(with_added_tokens=True))
    eos_name, eos_id = eos_token(tok)
    notes = []
    cache_dir = cache_dir or default_cache_dir()
    streams, nbytes, digest, from_cache = _tokenize_folder(folder, files, tok, tok_raw, eos_id, cache_dir, notes)
    _check_vocab(streams, vocab, tok_path)
    sep = f"{eos_name!r} (id {eos_id})" if eos_name is not None else "none (the tokenizer has no end-of-text token)"
    notes.append(f"tokenizer: {TOKENIZER_JSON}, documents split on 2+ blank lines, separator {sep} "
                 f"({'cache hit' if from_cache else 'tokenized'})")
    h = hashlib.sha256()
    h.update(b"edgec-data/text-folder/v1\0")
    h.update(digest.encode())
    return _bundle(folder, "text folder", "text", streams, nbytes, vocab, block, val_fraction, h, notes,
                   {"eos_id": eos_id, "tokens_digest": digest, "from_cache": from_cache,
                    "cache_path": os.path.join(cache_dir, f"{digest}.safetensors")})


# ------------------------------------------------------------------------------------------- the bundle

def _hold_out_tail(streams: dict, nbytes: dict, block: int, val_fraction: float, where: str, notes: list,
                   meta: dict) -> None:
    """Move the last ``val_fraction`` of the train stream (at least one window) to val, bytes pro rata."""
    ids = streams["train"]
    n = len(ids)
    n_val = max(int(round(n * val_fraction)), block + 1)
    if n - n_val < block + 1:
        raise EdgecError(f"{where}: the train stream ({n} tokens) is too short to hold out val_fraction "
                         f"{val_fraction:g} and keep a block of {block} tokens in each (give a val split, a smaller "
                         "block size or val_fraction 0)")
    streams["train"], streams["val"] = ids[: n - n_val], ids[n - n_val :]
    if "train" in nbytes:
        total = nbytes["train"]
        nbytes["val"] = int(round(total * n_val / n))
        nbytes["train"] = total - nbytes["val"]
        meta["bytes_estimated"] = ["train", "val"]
    notes.append(f"val: the last {n_val} tokens of train ({val_fraction:g}, contiguous)")


def _bundle(source: str, kind: str, fmt: str, streams: dict, nbytes: dict, vocab: int | None, block: int,
            val_fraction: float, h, notes: list, extra: dict) -> DataBundle:
    if not 0.0 <= float(val_fraction) < 1.0:
        raise EdgecError(f"val_fraction must be in [0, 1), got {val_fraction}")
    meta = {"format": fmt}
    if "val" not in streams and val_fraction > 0:
        _hold_out_tail(streams, nbytes, block, float(val_fraction), source, notes, meta)
        h.update(json.dumps({"val_fraction": float(val_fraction)}).encode())
    h.update(json.dumps({"block_size": block}).encode())
    if vocab is None:
        vocab = max(int(v.max()) for v in streams.values()) + 1
        notes.append(f"vocab_size: not given, max id + 1 = {vocab}")
    splits = {}
    for s in SPLIT_NAMES:
        if s not in streams:
            continue
        x, y = pack_blocks(streams[s], block)
        if len(x) == 0:
            raise EdgecError(f"{source}: block_size {block} is larger than the {s} split allows ({len(streams[s])} "
                             f"tokens; a block needs {block + 1}); pass a smaller --block-size")
        splits[s] = TensorPairDataset(x, y)
    meta.update({
        "vocab_size": int(vocab),
        "block_size": block,
        "tokens": {s: len(streams[s]) for s in splits},
        "bytes": {s: int(nbytes[s]) for s in splits if s in nbytes},
        **extra,
        "notes": notes,
    })
    return DataBundle(task="causal_lm", classes=None, num_classes=None, splits=splits, digest=h.hexdigest(),
                      source=source, kind=kind, meta=meta)
