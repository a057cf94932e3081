"""Causal-LM fine-tuning end to end on a tiny zoo ``llama``: ``edgec finetune`` on a token file lowers the
validation perplexity and keeps the lowest epoch, an interrupted run resumes bit-identical, ``edgec eval``
scores the checkpoint and its ONNX export alike, a block longer than the model is a clear error, and two
processes under torchrun (gloo, DDP) train it."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from rich.console import Console
from safetensors.torch import save_file

from edgec.app.render import eval_table
from edgec.core.errors import EdgecError
from edgec.core.options import FinetuneOptions
from edgec.evaluation import evaluate
from edgec.models.checkpoint import load_checkpoint
from edgec.train import TrainingInterrupted, finetune_file

ROOT = Path(__file__).resolve().parents[2]
VOCAB, BLOCK = 64, 32
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
TRAIN = ["--epochs", "2", "--batch-size", "16", "--lr", "1e-2", "--block-size", str(BLOCK)]


def markov(n: int, seed: int) -> torch.Tensor:
    """Token ids where the next one is (5·cur + 3) mod 64 nine times in ten, else uniform: learnable bigrams."""
    g = torch.Generator().manual_seed(seed)
    r, alt = torch.rand(n, generator=g), torch.randint(VOCAB, (n,), generator=g)
    out, cur = [], 0
    for i in range(n):
        out.append(cur)
        cur = (5 * cur + 3) % VOCAB if r[i] < 0.9 else int(alt[i])
    return torch.tensor(out, dtype=torch.int64)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A token file (3 bytes per token) and a fresh tiny llama checkpoint."""
    d = tmp_path_factory.mktemp("lm")
    streams = {"train": markov(2049, 0), "val": markov(513, 1), "test": markov(513, 2)}
    tensors = {f"input_ids_{k}": v for k, v in streams.items()}
    tensors |= {f"bytes_{k}": torch.tensor(3 * len(v)) for k, v in streams.items()}
    save_file(tensors | {"vocab_size": torch.tensor(VOCAB)}, d / "tokens.safetensors")
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    run_cli("zoo", "create", "llama", "-o", d / "llama.pt", *sets, check=0)
    return d


pytestmark = pytest.mark.usefixtures("one_thread")


def eval_json(path, data, *extra) -> dict:
    return json.loads(run_cli("eval", path, "--data", data, "--json", *extra, check=0).stdout)


def test_finetune_lowers_perplexity_resumes_and_eval_agrees_on_pt_and_onnx(lm, tmp_path):
    data, src = lm / "tokens.safetensors", lm / "llama.pt"
    env = {"OMP_NUM_THREADS": "1"}
    before = evaluate(src, data, split="val", latency=False)  # in process: the CLI runs below
    assert before["task"] == "causal_lm" and before["input_shape"] == [64]  # min(128, max positions)
    assert before["metrics"]["perplexity"] == pytest.approx(VOCAB, rel=0.1)  # a fresh model is near uniform

    out = tmp_path / "ft.pt"
    res = json.loads(run_cli("finetune", src, "--data", data, "-o", out, "--json", *TRAIN, env=env, check=0).stdout)
    ppl = [h["val"]["perplexity"] for h in res["history"]]
    assert res["task"] == "causal_lm" and res["monitor"] == "perplexity"
    assert res["best_epoch"] == ppl.index(min(ppl)) + 1 and res["best"]["perplexity"] == min(ppl)
    assert min(ppl) < 0.5 * VOCAB, ppl
    for h in res["history"]:
        assert h["val"]["perplexity"] == pytest.approx(math.exp(h["val"]["loss"]), rel=1e-9)

    # resume: an interrupted run continued from its resume file ends with the very same weights
    resumed = tmp_path / "resumed.pt"
    opts = dict(data=str(data), epochs=2, batch_size=16, lr=1e-2, block_size=BLOCK)

    def stop_after_first_epoch(event):
        if event.get("event") == "epoch" and event["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        finetune_file(src, resumed, FinetuneOptions(**opts), progress=stop_after_first_epoch)
    again = finetune_file(src, resumed, FinetuneOptions(resume=True, **opts))
    assert again.resumed_from == 1 and again.best["perplexity"] == pytest.approx(res["best"]["perplexity"], rel=1e-12)
    a, b = load_checkpoint(out).state_dict(), load_checkpoint(resumed).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # eval: the checkpoint (torch) and its ONNX export (onnxruntime) give one perplexity
    run_cli("export", out, "-o", tmp_path / "ft.onnx", check=0)
    pt = eval_json(out, data, "--no-latency")
    ox = eval_json(tmp_path / "ft.onnx", data)
    assert pt["predictions_by"] == "torch" and ox["predictions_by"] == "onnxruntime"
    assert pt["input_shape"] == [BLOCK] == ox["input_shape"]  # eval packs blocks as fine-tuned
    assert pt["tokens"] == ox["tokens"] == (513 - 1) // BLOCK * BLOCK
    assert pt["metrics"]["perplexity"] < 0.5 * before["metrics"]["perplexity"]
    assert ox["metrics"]["perplexity"] == pytest.approx(pt["metrics"]["perplexity"], rel=1e-4)
    assert ox["metrics"]["bits_per_byte"] == pytest.approx(pt["metrics"]["bits_per_byte"], rel=1e-4)
    # bits per byte = NLL / ln 2 / bytes of the scored tokens (3 per token here)
    assert pt["text_bytes"] == pytest.approx(3 * pt["tokens"])
    assert pt["metrics"]["bits_per_byte"] == pytest.approx(pt["metrics"]["loss"] / math.log(2) / 3, rel=1e-9)
    assert ox["latency"]["median_ms"] > 0 and ox["file_bytes"] > 0
    console = Console(record=True, width=120)
    console.print(eval_table(ox))
    table = console.export_text()
    assert "perplexity" in table and "bits_per_byte" in table and f"{ox['tokens']:,} (" in table


def test_a_block_longer_than_the_model_is_a_clear_error(lm, tmp_path):
    """In process (the CLI prints an EdgecError as one line, exit 2): the message names the model's limit."""
    with pytest.raises(EdgecError, match=r"block.*64.*") as err:
        finetune_file(lm / "llama.pt", tmp_path / "x.pt",
                      FinetuneOptions(data=str(lm / "tokens.safetensors"), epochs=1, block_size=100))
    assert "maximum" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.pt").exists()


def test_torchrun_two_processes_train_a_causal_lm(lm, tmp_path):
    """2 CPU processes (gloo, DDP), one epoch: one JSON document, rank 0 alone writes."""
    out_dir = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "edgec",
           "finetune", str(lm / "llama.pt"), "--json", "--data", str(lm / "tokens.safetensors"),
           "-o", str(out_dir / "ft.pt"), "--epochs", "1", "--batch-size", "16", "--lr", "1e-2",
           "--block-size", str(BLOCK)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    assert res["world_size"] == 2 and res["batch_size_per_process"] == 8 and res["written"]
    assert res["monitor"] == "perplexity" and res["best"]["perplexity"] < VOCAB
    assert sorted(p.name for p in out_dir.iterdir()) == ["ft.pt"]
    assert load_checkpoint(out_dir / "ft.pt").provenance[-1]["params"]["world_size"] == 2
