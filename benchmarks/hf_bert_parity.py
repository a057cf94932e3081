"""Parity of the zoo ``bert`` (imported with edgec.models.hf_bert) against transformers' BertModel.

For a few BERT sizes (Turc et al.'s BERT miniatures; ``--base`` adds BERT-base), randomly initialised by
transformers (nothing is downloaded), saved with ``save_pretrained`` and read back by ``read_hf_bert``:
max abs error of eager, fx-traced and ONNX Runtime outputs (last_hidden_state and pooler_output) against
transformers, on a padded batch. Needs ``transformers`` installed.

    python benchmarks/hf_bert_parity.py [--base] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from edgec.models.bert import Bert
from edgec.models.hf_bert import read_hf_bert

SIZES = {  # name: (layers, hidden, heads, intermediate)
    "tiny": (2, 128, 2, 512),
    "mini": (4, 256, 4, 1024),
    "small": (4, 512, 8, 2048),
}
BASE = {"base": (12, 768, 12, 3072)}


def max_abs(ref, got) -> float:
    return max(float(np.abs(np.asarray(r, dtype=np.float64) - np.asarray(g, dtype=np.float64)).max())
               for r, g in zip(ref, got))


def run_size(name, dims, batch, seq, workdir: Path) -> dict:
    import onnxruntime as ort
    import transformers

    layers, hidden, heads, inter = dims
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                        intermediate_size=inter)  # vocab 30522, 512 positions: the real tables
    hf = transformers.BertModel(hf_config).eval()
    folder = workdir / name
    hf.save_pretrained(folder)

    config, state = read_hf_bert(folder)
    model = Bert(**config).eval()
    model.load_state_dict(state, strict=True)
    gm = torch.fx.symbolic_trace(model).eval()

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[1:2, seq // 2:] = 0  # padded rows exercise the attention mask
    mask[2:3, seq // 8:] = 0
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
        ref = (out.last_hidden_state.numpy(), out.pooler_output.numpy())
        eager = tuple(t.numpy() for t in model(ids, mask))
        traced = tuple(t.numpy() for t in gm(ids, mask))

    spec = model.input_spec()
    dynamic = tuple({ax: torch.export.Dim(d.name, min=d.min, max=d.max) for ax, d in dims_.items()}
                    for dims_ in spec.dynamic_dims())
    start = time.perf_counter()
    program = torch.onnx.export(gm, spec.sample(seed=0), dynamo=True, opset_version=20, dynamic_shapes=dynamic,
                                input_names=[t.name for t in spec.inputs], output_names=list(spec.outputs),
                                external_data=False, verbose=False)
    export_s = time.perf_counter() - start
    path = folder / "model.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return {
        "size": name, "L/H/A/I": f"{layers}/{hidden}/{heads}/{inter}",
        "params": sum(p.numel() for p in model.parameters()),
        "eager": max_abs(ref, eager), "traced": max_abs(ref, traced), "onnx": max_abs(ref, onnx_out),
        "onnx_mb": os.path.getsize(path) / 2**20, "export_s": export_s,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", action="store_true", help="also BERT-base (12/768/12/3072, ~110M params)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    import transformers

    sizes = dict(SIZES, **(BASE if args.base else {}))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}; batch {args.batch}, seq {args.seq}, "
          "2 of the rows padded; max abs error vs transformers BertModel (last_hidden_state, pooler_output)")
    header = f"{'size':6} {'L/H/A/I':16} {'params':>11} {'eager':>9} {'traced':>9} {'onnx':>9} {'onnx MB':>8} {'export s':>8}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name, dims in sizes.items():
            r = run_size(name, dims, args.batch, args.seq, Path(tmp))
            print(f"{r['size']:6} {r['L/H/A/I']:16} {r['params']:>11,} {r['eager']:9.1e} {r['traced']:9.1e} "
                  f"{r['onnx']:9.1e} {r['onnx_mb']:8.1f} {r['export_s']:8.1f}", flush=True)


if __name__ == "__main__":
    main()
