"""Text generation with a key/value cache, from a checkpoint (torch ``forward_cached``) or a KV-cache ONNX file
(onnxruntime), with one token-selection rule for both.

Steps: read the prompt (``--prompt`` through a ``tokenizers`` file, or ``--prompt-ids``); open the runner
(``.onnx``: an onnxruntime session over the layout of ``edgec.onnx.generation``; otherwise the checkpoint's
decoder rebuilt with its cached forward); prefill the prompt with an empty past; then one token per decode step,
feeding the present back as the past, until ``max_new_tokens``, the end-of-text token (the tokenizer's, when it
has one) or the model's context length.

Token selection, on the float64 logits of the last position: greedy = argmax (lowest id on ties). Sampling
(``temperature`` given and > 0): logits / T, then top-k (the k largest; ties at the k-th kept), then top-p (the
smallest set of most probable tokens whose probability reaches p; Holtzman et al., 2020, "The Curious Case of
Neural Text Degeneration"), softmax, and one uniform draw from numpy's PCG64 seeded with ``seed`` inverted
through the cumulative distribution: the same seed gives the same tokens for the same logits.

Timing: prefill tokens/s = prompt tokens / prefill seconds; decode tokens/s = decode steps / their seconds (each
step's forward plus its token selection), after one untimed prefill and decode step (warm-up); ``threads`` sets
onnxruntime's intra-op threads or torch's.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgec.core.errors import EdgecError
from edgec.core.options import GenerateOptions
from edgec.core.result import Result
from edgec.data.text import eos_token
from edgec.models.checkpoint import load_checkpoint
from edgec.onnx.export import read_provenance
from edgec.onnx.generation import OrtDecoder, cache_geometry, decoder_module, empty_past, positions


@dataclass(frozen=True)
class GenerateResult(Result):
    """``edgec generate``: the tokens, the text and the speed."""

    SCHEMA = "edgec.generate/1"

    input: str
    runtime: str  # "torch" | "onnxruntime"
    prompt_ids: list
    generated_ids: list
    text: str | None  # the generated tokens decoded (None without a tokenizer)
    stopped: str  # "max_new_tokens" | "eos" | "context"
    eos_id: int | None
    sampling: dict  # {"mode": "greedy"|"sample", "temperature", "top_k", "top_p", "seed"}
    threads: int
    prefill: dict  # {"tokens", "seconds", "tokens_per_s"}
    decode: dict  # {"tokens", "seconds", "tokens_per_s"}


# --------------------------------------------------------------------------------------------- tokens


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer  # only a text prompt needs the Rust library

    try:
        return Tokenizer.from_str(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgecError(f"{path}: unreadable tokenizer ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    except Exception as exc:  # the library raises a bare Exception for malformed JSON
        raise EdgecError(f"{path}: not a tokenizers file ({exc})".splitlines()[0]) from None


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise EdgecError(f"--prompt-ids expects comma-separated token ids, e.g. 1,2,3; got {text!r:.60}") from None
    if not ids or any(i < 0 for i in ids):
        raise EdgecError(f"--prompt-ids expects one or more non-negative token ids, got {text!r:.60}")
    return ids


def select(logits: np.ndarray, rng: np.random.Generator | None, temperature: float | None, top_k: int | None,
           top_p: float | None) -> int:
    """The next token from one row of logits (module docstring); ``rng`` None = greedy."""
    z = np.asarray(logits, np.float64)
    if rng is None:
        return int(np.argmax(z))
    z = z / float(temperature)
    if top_k:
        kth = np.sort(z)[-min(int(top_k), z.size)]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[:int(np.searchsorted(cum, top_p) + 1)]
        mask = np.zeros_like(p, dtype=bool)
        mask[keep] = True
        p = np.where(mask, p, 0.0)
        p /= p.sum()
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), p.size - 1))


# --------------------------------------------------------------------------------------------- runners


class TorchRunner:
    runtime = "torch"

    def __init__(self, path, options: GenerateOptions):
        model = load_checkpoint(path, options)
        self.module = decoder_module(model)
        geometry = cache_geometry(self.module)
        self.geometry, self.vocab = geometry, geometry["vocab"]
        self.context = model.config.get("max_position_embeddings")

    def empty_past(self, batch: int):
        return empty_past(self.geometry, batch)

    def step(self, ids, mask, pos, past):
        with torch.no_grad():
            logits, present = self.module(torch.as_tensor(ids), torch.as_tensor(mask), torch.as_tensor(pos), past)
        return logits.numpy(), present


class OrtRunner:
    runtime = "onnxruntime"

    def __init__(self, path, options: GenerateOptions):
        import onnx

        data = Path(path).read_bytes()
        self.decoder = OrtDecoder(data, int(options.threads))
        self.vocab = self.decoder.vocab
        try:
            prov = read_provenance(onnx.load_from_string(data, load_external_data=False), str(path)) or {}
        except Exception:  # no readable provenance: no context length known
            prov = {}
        self.context = (prov.get("config") or {}).get("max_position_embeddings")

    def empty_past(self, batch: int):
        return self.decoder.empty_past(batch)

    def step(self, ids, mask, pos, past):
        return self.decoder.step(ids, mask, pos, past)


def open_runner(path: str | Path, options: GenerateOptions):
    path = Path(path)
    if not path.is_file():
        raise EdgecError(f"no such file: {path}")
    return OrtRunner(path, options) if path.suffix.lower() == ".onnx" else TorchRunner(path, options)


# --------------------------------------------------------------------------------------------- the loop


def _rate(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 6),
            "tokens_per_s": round(tokens / seconds, 2) if tokens and seconds > 0 else None}


def generate(runner, prompt: list[int], max_new_tokens: int, eos_id: int | None = None, *,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, warmup: int = 1) -> dict:
    """{"generated_ids", "stopped", "prefill", "decode"} for one prompt at batch 1 (module docstring);
    ``warmup`` untimed prefill + one decode step first (a session's first runs allocate and pick kernels)."""
    vocab = runner.vocab
    if vocab is not None and max(prompt) >= vocab:
        raise EdgecError(f"prompt token id {max(prompt)} is out of range: the model's vocabulary has {vocab} tokens")
    context = runner.context
    if context and len(prompt) >= context:
        raise EdgecError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
    rng = np.random.Generator(np.random.PCG64(seed)) if temperature else None
    ids = np.asarray([prompt], np.int64)
    mask = np.ones_like(ids)
    pos = positions(torch.as_tensor(mask)).numpy()
    for _ in range(warmup):
        _, cache = runner.step(ids, mask, pos, runner.empty_past(1))
        runner.step(ids[:, -1:], np.ones((1, ids.shape[1] + 1), np.int64), pos[:, -1:] + 1, cache)
    start = time.perf_counter()
    logits, past = runner.step(ids, mask, pos, runner.empty_past(1))
    prefill_s = time.perf_counter() - start
    out, stopped, steps, decode_s = [], "max_new_tokens", 0, 0.0
    start = time.perf_counter()
    token = select(logits[0, -1], rng, temperature, top_k, top_p)
    while True:
        if eos_id is not None and token == eos_id:
            stopped = "eos"
            break
        out.append(token)
        if len(out) >= max_new_tokens:
            break
        if context and len(prompt) + len(out) >= context:
            stopped = "context"
            break
        total = len(prompt) + len(out)
        logits, past = runner.step(np.asarray([[token]], np.int64), np.ones((1, total), np.int64),
                                   np.asarray([[total - 1]], np.int64), past)
        steps += 1
        token = select(logits[0, -1], rng, temperature, top_k, top_p)
    decode_s = time.perf_counter() - start
    return {"generated_ids": out, "stopped": stopped, "prefill": _rate(len(prompt), prefill_s),
            "decode": _rate(steps, decode_s)}


def generate_file(path: str | Path, options: GenerateOptions, progress=None) -> GenerateResult:
    """``edgec generate``: the prompt, the runner, the loop, the text."""
    say = progress or (lambda _m: None)
    options.validate()
    tokenizer = load_tokenizer(options.tokenizer) if options.tokenizer else None
    prompt = parse_ids(options.prompt_ids) if options.prompt_ids else tokenizer.encode(options.prompt).ids
    if not prompt:
        raise EdgecError("the prompt encodes to no tokens")
    eos_id = eos_token(tokenizer)[1] if tokenizer is not None else None
    say("loading the model")
    threads = torch.get_num_threads()
    torch.set_num_threads(int(options.threads))
    try:
        runner = open_runner(path, options)
        say("generating")
        run = generate(runner, prompt, int(options.max_new_tokens), eos_id, temperature=options.temperature,
                       top_k=options.top_k, top_p=options.top_p, seed=int(options.seed))
    finally:
        torch.set_num_threads(threads)
    text = tokenizer.decode(run["generated_ids"]) if tokenizer is not None else None
    sampling = {"mode": "sample" if options.temperature else "greedy", "temperature": options.temperature,
                "top_k": options.top_k, "top_p": options.top_p, "seed": int(options.seed)}
    return GenerateResult(input=str(path), runtime=runner.runtime, prompt_ids=prompt, text=text,
                          eos_id=eos_id, sampling=sampling, threads=int(options.threads), **run)
