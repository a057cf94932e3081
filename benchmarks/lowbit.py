"""Size, speed and quality of edgec's low-bit exports vs onnxruntime's post-training quantizers, side by side.

    python benchmarks/lowbit.py [--epochs 10] [--models conformer-l resnet]

For each model (a weight-dominated Conformer, d_model 192 × 4 blocks, on the speech fixture; the zoo ResNet
on scikit-learn's digits): train fp32; then from it
* edgec ternary: DLT scaffold (per-channel scale and shift) fine-tuned, folded, exported with INT2 weights;
* edgec binary: binary scaffold with latent-weight supervision fine-tuned, folded, exported with INT2 weights;
* ORT int8: ``onnxruntime.quantization.quantize_dynamic`` on the fp32 ONNX (post-training, no fine-tuning);
* ORT 2-bit: ``MatMulNBitsQuantizer(bits=2)`` on the fp32 ONNX (post-training; MatMul weights only).
Reported: file size and ratio to fp32, the low-bit layers' own weight ratio, median ORT latency (default
session, 1 thread) at batch 1 and at a realistic batch, and test-split quality (UAR on held-out speakers /
accuracy on digits), all in one run on this machine. First layer and classifier stay fp32 in edgec's
variants (the methods' reference setting); embeddings, norms, biases and the other non-Conv/Linear
tensors are fp32 in every variant.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "conformer-l": ("conformer", {"d_model": 192, "num_layers": 4, "ffn_dim": 768, "num_heads": 4}, "speech", "uar", 32),
    "resnet": ("resnet", {}, "digits", "accuracy", 64),
}


def passes(model, *names_params):
    from edgec.core.pass_manager import PassManager, get_pass

    return PassManager([get_pass(n)(**p) for n, p in names_params])(model)[0]


def folded(model):
    from edgec.app.api import fold_passes

    return passes(model, *[(n, {}) for n in fold_passes()])


def ort_int8(data: bytes) -> bytes:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "fp32.onnx", Path(d) / "int8.onnx"
        src.write_bytes(data)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return onnx.load(str(dst)).SerializeToString()


def ort_2bit(data: bytes) -> bytes:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    q = MatMulNBitsQuantizer(onnx.load_from_string(data), bits=2, block_size=32, is_symmetric=True)
    q.process()
    return q.model.model.SerializeToString()


def row(name, data, fp32_bytes, bundle, metric, spec, batch, lowbit_ratio="-"):
    from edgec.evaluation import evaluate_model
    from edgec.onnx.session import measure_onnx, sample_inputs

    quality = evaluate_model(data, bundle, split="test", latency=False)["metrics"][metric]
    lat1 = measure_onnx(data, sample_inputs(spec, batch=1), threads=1)["median_ms"]
    latb = measure_onnx(data, sample_inputs(spec, batch=batch), threads=1)["median_ms"]
    return [name, f"{len(data) / 1024:.0f} KiB", f"{len(data) / fp32_bytes:.3f}", lowbit_ratio,
            f"{lat1:.3f}", f"{latb:.2f}", f"{quality:.3f}"]


def bench(key: str, epochs: int, bundles: dict) -> None:
    from edgec.models.checkpoint import new_model
    from edgec.onnx.export import export
    from edgec.train import finetune

    arch, cfg, task, metric, batch = MODELS[key]
    bundle = bundles[task]
    fp, _ = finetune(new_model(arch, cfg, seed=0), bundle, epochs=epochs, lr=2e-3, seed=0)
    fp = folded(fp)
    spec = fp.spec
    fp32, _ = export(fp, weights="fp32")
    rows = [row("fp32", fp32, len(fp32), bundle, metric, spec, batch)]
    variants = {
        "edgec ternary (DLT, fine-tuned)": ("scaffold.dlt", {"group_size": 0, "shift_init": "mean"}),
        "edgec binary (latent-weight supervised)": ("scaffold.binary", {}),
    }
    fp32_layers = []
    for name, (scaffold, params) in variants.items():
        student = passes(fp, (scaffold, params))
        student, _ = finetune(student, bundle, epochs=epochs, lr=1e-3, seed=0)
        data, record = export(folded(student), weights="int2")
        fp32_layers = record["lowbit"]["fp32_layers"]
        forms = sorted({layer["form"] for layer in record["lowbit"]["layers"]})
        rows.append(row(f"{name} [{'/'.join(forms)}]", data, len(fp32), bundle, metric, spec, batch,
                        f"{record['size']['lowbit_weight_ratio']:.3f}"))
    rows.append(row("ORT quantize_dynamic int8 (PTQ)", ort_int8(fp32), len(fp32), bundle, metric, spec, batch))
    rows.append(row("ORT MatMulNBits 2-bit (PTQ)", ort_2bit(fp32), len(fp32), bundle, metric, spec, batch))
    print(f"\n{key}: {arch} {cfg or '(zoo default)'}, {fp.param_count():,} params, task {task} ({metric}), "
          f"{epochs} epochs per training stage; edgec keeps fp32: {', '.join(x['layer'] for x in fp32_layers)}\n")
    print(f"| variant | ONNX size | vs fp32 file | low-bit layers vs fp32 | latency b1 ms | latency b{batch} ms | {metric} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--speech", default=str(ROOT / "fixtures" / "speech"))
    args = ap.parse_args()
    from edgec.data import load_data

    bundles = {}
    if any(MODELS[m][2] == "speech" for m in args.models):
        bundles["speech"] = load_data(args.speech)
    if any(MODELS[m][2] == "digits" for m in args.models):
        path = Path(tempfile.mkdtemp()) / "digits.npz"
        subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_digits.py"), "--out", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
        bundles["digits"] = load_data(str(path))
    for key in args.models:
        bench(key, args.epochs, bundles)


if __name__ == "__main__":
    main()
