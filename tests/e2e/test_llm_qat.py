"""TernaryLLM on a tiny decoder, end to end: a zoo ``llama`` trained in fp32 on a token stream from a small
grammar, DLT scaffolds on every block Linear (embedding and head fp32), fine-tuned with OFF on the decoder
block outputs plus per-token logits KD from the fp32 checkpoint the scaffold came from (found by provenance),
then folded exactly and exported to INT2 ONNX whose onnxruntime logits match torch."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

import edgec.app.api as api
from edgec.core.options import ExportOptions, FinetuneOptions, FoldOptions, ScaffoldTernaryOptions
from edgec.layers.lowbit import LowBitLinear
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.onnx.session import create_session
from edgec.train import finetune_file

VOCAB, BLOCK = 64, 32
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
BLOCK_LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
KD, OFF = 0.5, 1.0


def grammar(sentences: int, seed: int) -> torch.Tensor:
    """``DET [ADJ] NOUN VERB DET NOUN .`` — the determiner, adjective and verb agree with the subject noun, so
    most tokens are predictable from the context (a learnable structure, not memorisable noise)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sentences):
        subj, obj = (int(v) for v in torch.randint(16, 32, (2,), generator=g))
        out.append(1 + subj % 2)
        if float(torch.rand(1, generator=g)) < 0.5:
            out.append(4 + subj % 4)
        out += [subj, 40 + subj % 8, 1 + obj % 2, obj, 3]
    return torch.tensor(out, dtype=torch.int64)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    """The token file and a tiny llama fine-tuned on it in fp32 (the teacher)."""
    d = tmp_path_factory.mktemp("llm")
    streams = {"train": grammar(700, 0), "val": grammar(150, 1)}
    save_file({f"input_ids_{k}": v for k, v in streams.items()} | {"vocab_size": torch.tensor(VOCAB)},
              d / "tokens.safetensors")
    save_checkpoint(new_model("llama", TINY, seed=0), d / "llama.pt")
    res = finetune_file(d / "llama.pt", d / "fp32.pt", FinetuneOptions(
        data=str(d / "tokens.safetensors"), epochs=3, batch_size=16, lr=1e-2, block_size=BLOCK))
    assert res.best["perplexity"] < 0.25 * VOCAB  # it learnt the grammar (a fresh model is near 64)
    return d


def test_dlt_off_kd_finetune_fold_exact_and_export_matches(fp32):
    d = fp32
    data = d / "tokens.safetensors"
    sc = api.scaffold_ternary(d / "fp32.pt", d / "dlt.pt", ScaffoldTernaryOptions(method="dlt", group_size=16))
    assert sc.checks["selection"]["layers"] == BLOCK_LINEARS  # every Linear of the decoder blocks
    assert [s["layer"] for s in sc.skipped] == ["model.embed_tokens", "lm_head"]

    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli("finetune", d / "dlt.pt", "--data", data, "-o", d / "qat.pt", "--distill", "off",
                   "--kd-weight", str(KD), "--off-weight", str(OFF), "--epochs", "3", "--batch-size", "16",
                   "--lr", "5e-3", "--block-size", str(BLOCK), "--json", env=env, check=0)
    res = json.loads(proc.stdout)
    dist = res["distill"]
    # the teacher is the fp32 checkpoint the scaffold came from; OFF compares the decoder layers' outputs
    assert dist["mode"] == "off" and dist["teacher_file"] == "fp32.pt"
    assert dist["teacher_source"] == "scaffold provenance"
    assert dist["off_layers"] == ["model.layers.0", "model.layers.1"] and dist["kd_weight"] == KD
    hist = res["history"]
    for h in hist:  # the combined loss is (1 − w)·CE + w·KD + λ·OFF, each term present
        assert h["train_kd_loss"] > 0 and h["train_off_loss"] > 0
        parts = (1 - KD) * h["train_task_loss"] + KD * h["train_kd_loss"] + OFF * h["train_off_loss"]
        assert h["train_loss"] == pytest.approx(parts, rel=1e-4)
    losses = [h["train_loss"] for h in hist]
    assert losses[-1] < losses[0], losses

    folded = api.fold(d / "qat.pt", d / "folded.pt", FoldOptions())
    fold_dlt = next(p for p in folded.passes if p["pass"] == "fold.dlt")
    assert fold_dlt["checks"]["equivalence"]["rel_error"] <= 1e-5 and folded.scaffolds_left == 0
    model = load_checkpoint(d / "folded.pt")
    assert [n for n, m in model.gm.named_modules() if isinstance(m, LowBitLinear)] == BLOCK_LINEARS

    ex = api.export(d / "folded.pt", d / "folded.onnx", ExportOptions(forms="cast"))
    assert ex.checks["ort_parity"]["passed"]
    # onnxruntime on a held-out block: the torch logits and the same perplexity
    x = grammar(150, 1)[: BLOCK + 1]
    with torch.no_grad():
        want = model.gm(x[None, :-1]).numpy()
    sess = create_session(d / "folded.onnx")
    got = sess.run(None, {sess.get_inputs()[0].name: x[None, :-1].numpy()})[0]
    assert float(np.abs(got - want).max()) <= 1e-4 * float(np.abs(want).max())
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(got)[0], x[1:])
    assert math.exp(float(nll)) < 0.25 * VOCAB  # the ternary model still predicts the grammar
