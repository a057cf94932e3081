"""TernaryLLM on a LLaMA-family decoder: quality, size and generation speed of fp32 vs DLT vs DLT + OFF vs
post-training quantization, all measured in one run on this machine.

    python benchmarks/llm.py [--workdir .cache/bench-llm] [--pretrain-epochs 2] [--qat-tokens 600000]
                             [--json PATH] [--skip-quality] [--skip-speed] [--quick]

Needs ``make text`` first (fixtures/text: the Python 3.11 documentation as an English corpus, a byte-level BPE
tokenizer trained on its train split, token ids per split).

Part 1, quality (a model small enough to pretrain here). No pretrained Llama-family weights can be downloaded,
so the benchmark produces its own: the zoo ``llama`` at ``QUALITY_CONFIG`` is pretrained from scratch on the
corpus's train split (``--pretrain-epochs`` epochs of packed 128-token blocks, AdamW lr ``PRETRAIN_LR``, batch
32, warm-up 5 %, cosine; cached under ``--workdir``; the budget and its wall time are printed). From it:

* **fp32**: the pretrained model.
* **PTQ TWN**: DLT scaffold with no training, folded: per group of 128 weights, codes
  ``sign(W)·1[|W| > 0.7·mean|W|]`` and scale ``mean|W|`` over the kept codes (Li et al. 2016's TWN rounding).
* **DLT**: the DLT scaffold (learnable per-group scale and shift), fine-tuned with the next-token loss.
* **DLT + OFF**: the same scaffold and budget, fine-tuned with the task loss + logits KD (w = 0.5) + OFF
  (1 − cos on every decoder block output, λ = 1) from the fp32 model (TernaryLLM's recipe).
* **ORT 4-bit / ORT 2-bit**: onnxruntime's ``MatMulNBitsQuantizer`` (block 32, symmetric) on the fp32 export.

Every QAT variant gets the same fine-tune budget: one pass over the first ``--qat-tokens`` training tokens
(lr ``QAT_LR``, batch 32, seed 0). Embeddings and the output head stay fp32 in every variant (the ORT
quantizer also quantizes the head's MatMul; its row says so). Reported: held-out (test split) perplexity and
bits per byte, ONNX file size, the decoder-block weights' bytes as a fraction of fp32, and generation speed
(below) of the KV-cache export.

Part 2, speed at a realistic size. Decoding at batch 1 is memory-bound only once the weights outgrow the
caches, which the small quality model does not. A randomly initialised ``SPEED_CONFIG`` model (~30 M
parameters; speed does not depend on the weights' values) is exported fp32, as edgec ternary (DLT fold, INT2
weights in the MatMulNBits form with int8 activations), and through ORT's 4-bit and 2-bit quantizers.

Speed protocol (both parts): the KV-cache ONNX export (one graph for prefill and decode); ``decode tok/s`` =
1000 / median ms of one decode step (batch 1, one new token, 128 cached positions); ``prefill tok/s`` = 128 /
median seconds of a 128-token prefill with an empty cache; onnxruntime, 1 and 2 intra-op threads; median over
repeated runs (``edgec.onnx.session.measure_onnx``), variants measured back to back in one process.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "fixtures" / "text"
BLOCK = 128
BATCH = 32
PRETRAIN_LR = 3e-3
QAT_LR = 1e-3
GROUP = 128
QUALITY_CONFIG = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 256}
SPEED_CONFIG = {"vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8,
                "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512}
CONTEXT = 128


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ helpers

def passes(model, *names_params):
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(n)(**p) for n, p in names_params])(model)[0]


def folded(model):
    from edgec.app.api import fold_passes

    return passes(model, *[(n, {}) for n in fold_passes()])


def ort_nbits(data: bytes, bits: int) -> bytes:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    q = MatMulNBitsQuantizer(onnx.load_from_string(data), bits=bits, block_size=32, is_symmetric=True)
    q.process()
    return q.model.model.SerializeToString()


def block_weight_bytes(data: bytes, vocab: int) -> int:
    """Bytes of the decoder blocks' weight tensors in any storage form (fp32, INT2 codes + scales + shifts,
    ORT's 4/2-bit blocks + scales): every float or packed initializer of rank >= 1 except the embedding and
    the head (the tensors with a ``vocab``-sized axis, in every form), the norm weights and the rotary table.
    The exporters rename weights (``val_68``, ``val_68_Q4``), so tensors are told apart by shape, not name; the
    configs here keep ``vocab`` distinct from every other width."""
    import onnx

    proto = onnx.load_from_string(data)
    total = 0
    for init in proto.graph.initializer:
        if (init.data_type == onnx.TensorProto.INT64 or not init.dims or vocab in init.dims
                or "norm" in init.name or "inv_freq" in init.name):
            continue
        total += onnx.numpy_helper.to_array(init).nbytes
    return total


def kv_feeds(data: bytes, vocab: int, context: int = CONTEXT) -> tuple[dict, dict]:
    """(prefill feed: ``context`` tokens and an empty cache, decode feed: one token after ``context``)."""
    import numpy as np
    import onnx

    proto = onnx.load_from_string(data)
    past = [i for i in proto.graph.input if i.name.startswith("past_key_values.")]
    kv_shape = [d.dim_value for d in past[0].type.tensor_type.shape.dim]
    n_kv, head_dim = kv_shape[1], kv_shape[3]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (1, context), dtype=np.int64)

    def feed(new, past_len):
        f = {"input_ids": new, "attention_mask": np.ones((1, past_len + new.shape[1]), np.int64),
             "position_ids": np.arange(past_len, past_len + new.shape[1], dtype=np.int64)[None]}
        for i in past:
            f[i.name] = rng.standard_normal((1, n_kv, past_len, head_dim)).astype(np.float32)
        return f

    return feed(ids, 0), feed(ids[:, :1], context)


def speed(data: bytes, vocab: int, threads: int) -> dict:
    from edgec.onnx.session import measure_onnx

    prefill, decode = kv_feeds(data, vocab)
    p = measure_onnx(data, prefill, threads=threads)["median_ms"]
    d = measure_onnx(data, decode, threads=threads)["median_ms"]
    return {"prefill_tok_s": CONTEXT / (p / 1000), "decode_tok_s": 1000 / d, "prefill_ms": p, "decode_ms": d}


def tokens_subset(bundle, tokens: int):
    """The bundle with its train split cut to the first ``tokens`` training tokens (whole blocks)."""
    import dataclasses

    from torch.utils.data import Subset

    train = bundle.split("train")
    n = max(1, min(len(train), tokens // bundle.meta["block_size"]))
    return dataclasses.replace(bundle, splits={**bundle.splits, "train": Subset(train, range(n))})


def perplexity(target, bundle) -> dict:
    from edgec.evaluation import evaluate_model

    m = evaluate_model(target, bundle, split="test", latency=False)["metrics"]
    return {"perplexity": float(m["perplexity"]), "bpb": m.get("bits_per_byte")}


# ------------------------------------------------------------------------------------------------ part 1

def pretrained(args, bundle):
    from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
    from edgec.train import finetune

    path = Path(args.workdir) / f"fp32-e{args.pretrain_epochs}.pt"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        say(f"pretrained model from {path}")
        return load_checkpoint(path), json.loads(meta_path.read_text())
    config = {**QUALITY_CONFIG, "vocab_size": bundle.meta["vocab_size"]}
    model = new_model("llama", config, seed=0)
    train_tokens = len(bundle.split("train")) * bundle.meta["block_size"]
    say(f"pretraining llama ({model.param_count():,} params) for {args.pretrain_epochs} epoch(s) of "
        f"{train_tokens:,} tokens")
    t = time.perf_counter()
    model, report = finetune(model, bundle, epochs=args.pretrain_epochs, lr=PRETRAIN_LR, batch_size=BATCH,
                             warmup=0.05, seed=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, path)
    meta = {"config": config, "params": model.param_count(), "epochs": args.pretrain_epochs, "lr": PRETRAIN_LR,
            "batch": BATCH, "block": bundle.meta["block_size"], "tokens_seen": args.pretrain_epochs * train_tokens,
            "seconds": round(time.perf_counter() - t, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return model, meta


def quality_rows(args, bundle) -> tuple[list[dict], dict]:
    from edgec.onnx.generation import export_kv
    from edgec.train import finetune

    fp, meta = pretrained(args, bundle)
    qat = tokens_subset(bundle, args.qat_tokens)
    dlt = ("scaffold.dlt", {"group_size": GROUP})
    rows = []

    def add(name, kv, note=""):
        say(f"  measuring {name}")
        vocab = bundle.meta["vocab_size"]
        row = {"variant": name, **perplexity(kv, bundle), "file_bytes": len(kv),
               "block_bytes": block_weight_bytes(kv, vocab), "note": note}
        (Path(args.workdir) / f"quality-{len(rows)}.onnx").write_bytes(kv)
        for threads in (1, 2):
            row[f"t{threads}"] = speed(kv, bundle.meta["vocab_size"], threads)
        rows.append(row)

    fp_kv = export_kv(fp, weights="fp32")[0]
    add("fp32", fp_kv)
    add("PTQ TWN rounding (DLT init, no training)", kv_int2(folded(passes(fp, dlt))))
    t = time.perf_counter()
    student, _ = finetune(passes(fp, dlt), qat, epochs=1, lr=QAT_LR, batch_size=BATCH, seed=0, distill="none")
    meta["qat_seconds_dlt"] = round(time.perf_counter() - t, 1)
    add("DLT (QAT, task loss)", kv_int2(folded(student)))
    t = time.perf_counter()
    student, _ = finetune(passes(fp, dlt), qat, epochs=1, lr=QAT_LR, batch_size=BATCH, seed=0, distill="off",
                          teacher=fp, kd_weight=0.5, off_weight=1.0)
    meta["qat_seconds_dlt_off"] = round(time.perf_counter() - t, 1)
    add("DLT + OFF + logits KD (QAT)", kv_int2(folded(student)))
    for bits in (4, 2):
        add(f"ORT MatMulNBits {bits}-bit (PTQ)", ort_nbits(fp_kv, bits), note="also quantizes the output head")
    meta["qat_tokens"] = len(qat.split("train")) * bundle.meta["block_size"]
    return rows, meta


def kv_int2(model) -> bytes:
    from edgec.onnx.generation import export_kv

    return export_kv(model, weights="int2", forms="matmulnbits", activation_precision="int8")[0]


# ------------------------------------------------------------------------------------------------ part 2

def speed_rows(args) -> tuple[list[dict], dict]:
    from edgec.models.checkpoint import new_model
    from edgec.onnx.generation import export_kv

    fp = new_model("llama", SPEED_CONFIG, seed=0)
    say(f"speed model: llama {fp.param_count():,} params, exporting")
    fp_kv = export_kv(fp, weights="fp32")[0]
    tern = folded(passes(fp, ("scaffold.dlt", {"group_size": GROUP})))
    variants = {"fp32": fp_kv, "edgec ternary (DLT fold, INT2 MatMulNBits, int8 activations)": kv_int2(tern),
                "ORT MatMulNBits 4-bit (PTQ)": ort_nbits(fp_kv, 4), "ORT MatMulNBits 2-bit (PTQ)": ort_nbits(fp_kv, 2)}
    rows = []
    for name, kv in variants.items():
        say(f"  measuring {name}")
        row = {"variant": name, "file_bytes": len(kv), "block_bytes": block_weight_bytes(kv, SPEED_CONFIG["vocab_size"])}
        for threads in (1, 2):
            row[f"t{threads}"] = speed(kv, SPEED_CONFIG["vocab_size"], threads)
        rows.append(row)
    return rows, {"config": SPEED_CONFIG, "params": fp.param_count()}


# ------------------------------------------------------------------------------------------------ report

def table(rows: list[dict], quality: bool) -> str:
    fp = rows[0]
    head = ["variant"] + (["test ppl", "bits/byte"] if quality else []) + [
        "ONNX MiB", "block weights × fp32", "decode tok/s 1t", "decode tok/s 2t", "× fp32 (1t)", "prefill tok/s 1t",
        "prefill tok/s 2t"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"] + (f" ({r['note']})" if r.get("note") else "")]
        if quality:
            cells += [f"{r['perplexity']:.2f}", f"{r['bpb']:.3f}" if r.get("bpb") is not None else "—"]
        cells += [f"{r['file_bytes'] / 2**20:.2f}", f"{r['block_bytes'] / fp['block_bytes']:.3f}",
                  f"{r['t1']['decode_tok_s']:.0f}", f"{r['t2']['decode_tok_s']:.0f}",
                  f"{r['t1']['decode_tok_s'] / fp['t1']['decode_tok_s']:.2f}",
                  f"{r['t1']['prefill_tok_s']:.0f}", f"{r['t2']['prefill_tok_s']:.0f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def gap_closed(rows: list[dict]) -> str:
    by = {r["variant"].split(" (")[0]: r["perplexity"] for r in rows}
    fp, ptq, off = by.get("fp32"), by.get("PTQ TWN rounding"), by.get("DLT + OFF + logits KD")
    if None in (fp, ptq, off) or ptq <= fp:
        return "gap closed: n/a"
    closed = (ptq - off) / (ptq - fp)
    return (f"PTQ ternary leaves a perplexity gap of {ptq - fp:.2f} to fp32; DLT + OFF closes {closed:.0%} of it "
            f"(goal: at least half)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "bench-llm"))
    ap.add_argument("--data", default=str(TEXT / "tokens.safetensors"))
    ap.add_argument("--pretrain-epochs", type=int, default=2)
    ap.add_argument("--qat-tokens", type=int, default=600_000)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--pretrain-only", action="store_true", help="train (or find) the fp32 model, then stop")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 pretrain epoch of 200 k tokens, 60 k QAT tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.qat_tokens = 1, 60_000
        args.workdir = str(Path(args.workdir) / "quick")
    out = {}
    if not args.skip_quality:
        from edgec.data import load_data

        if not Path(args.data).exists():
            raise SystemExit(f"no corpus at {args.data} (run `make text` first)")
        bundle = load_data(args.data, block_size=BLOCK)
        if args.quick:
            bundle = tokens_subset(bundle, 200_000)
        if args.pretrain_only:
            pretrained(args, bundle)
            return
        rows, meta = quality_rows(args, bundle)
        out["quality"] = {"rows": rows, "meta": meta}
        print(f"\n**Quality: llama {meta['params'] / 1e6:.2f} M params ({json.dumps(meta['config'])}), pretrained "
              f"here on {meta['tokens_seen']:,} tokens ({meta['epochs']} epochs, {meta['seconds']:.0f} s); QAT "
              f"budget {meta['qat_tokens']:,} tokens for every QAT variant; test split "
              f"{bundle.meta['tokens']['test']:,} tokens**\n")
        print(table(rows, True))
        print("\n" + gap_closed(rows))
    if not args.skip_speed:
        rows, meta = speed_rows(args)
        out["speed"] = {"rows": rows, "meta": meta}
        print(f"\n**Speed: llama {meta['params'] / 1e6:.1f} M params, random weights ({json.dumps(meta['config'])})"
              f", context {CONTEXT}, batch 1**\n")
        print(table(rows, False))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
