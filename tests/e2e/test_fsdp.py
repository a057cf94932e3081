"""FSDP fine-tuning (``edgec finetune --fsdp`` under torchrun, gloo, 2 CPU processes) of a tiny zoo llama with
a tied head on token-id data: sharded for real, equal to the DDP run, exact resume, same checkpoint format."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.core.options import FinetuneOptions
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.train import finetune_file

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
          "tie_word_embeddings": True}
HYPER = ["--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--block-size", "32"]

# Runs inside torchrun (every rank): the DDP run, an uninterrupted FSDP run, the same run interrupted at the
# first step of epoch 3 (on every rank: KeyboardInterrupt from extra_loss) and resumed, the optimizer's shards,
# the distill 'off' refusal. Rank 0 writes what the test compares.
DRIVER = r'''
import gc, json, sys
import torch, torch.distributed as dist
from edgec.core.errors import EdgecError
from edgec.data import load_data
from edgec.models.checkpoint import load_checkpoint
from edgec.train import TrainingInterrupted, finetune
from edgec.train import distributed as D
from edgec.train import fsdp as F

class Stop:
    """extra_loss adding 0; raises KeyboardInterrupt at call ``at`` (the same step on every rank)."""
    def __init__(self, at=None):
        self.at, self.calls = at, 0
    def __call__(self, outputs, batch, features):
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return torch.zeros(())

ckpt, data_path, out = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()
model, data = load_checkpoint(ckpt), load_data(data_path, block_size=32)
hyper = dict(epochs=3, batch_size=8, lr=3e-3)
ddp, _ = finetune(model, data, **hyper)
full, report = finetune(model, data, fsdp=True, extra_loss=Stop(), **hyper)
rfile = out + "/run.resume"
try:
    finetune(model, data, fsdp=True, extra_loss=Stop(at=2 * report["steps_per_epoch"] + 1), resume_file=rfile, **hyper)
    interrupted = False
except TrainingInterrupted:
    interrupted = True
resumed, rreport = finetune(model, data, fsdp=True, extra_loss=Stop(), resume_file=rfile, resume=True, **hyper)
try:
    finetune(model, data, fsdp=True, teacher=model, distill="off", **hyper)
    off_error = None
except EdgecError as exc:
    off_error = str(exc)
gm = model.clone().gm
F.shard(gm, D.current(), torch.device("cpu"))
opt = torch.optim.AdamW(gm.parameters(), lr=1e-3)
gm(torch.zeros(2, 8, dtype=torch.long)).float().pow(2).mean().backward()
opt.step()
state_local = sum(s["exp_avg"].to_local().numel() + s["exp_avg_sq"].to_local().numel() for s in opt.state.values())
state_full = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values())
local = D.gather_objects(state_local, D.current())
if rank == 0:
    torch.save({"ddp": ddp.state_dict(), "full": full.state_dict(), "resumed": resumed.state_dict()}, out + "/sd.pt")
    json.dump({"interrupted": interrupted, "resumed_from": rreport["resumed_from"], "off_error": off_error,
               "tied": gm.lm_head.weight is gm.model.embed_tokens.weight,
               "opt_state_local": local, "opt_state_full": state_full,
               "report_fsdp": report["fsdp"], "history": [h["train_loss"] for h in report["history"]],
               "resumed_history": [h["train_loss"] for h in rreport["history"]]}, open(out + "/driver.json", "w"))
del gm, opt
gc.collect()  # FSDP modules alive at interpreter exit, after the process group is gone, can abort the process
dist.destroy_process_group()
'''


def _torchrun(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("EDGEC_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny tied-head llama and a learnable token stream (a 16-token motif, 10 % noise)."""
    d = tmp_path_factory.mktemp("fsdp")
    save_checkpoint(new_model("llama", CONFIG, seed=0), d / "llama.pt")
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 64, (16,), generator=g).repeat(100)
    noise = torch.rand(stream.shape, generator=g) < 0.1
    stream = torch.where(noise, torch.randint(0, 64, stream.shape, generator=g), stream)
    torch.save({"input_ids_train": stream[:1300].clone(), "input_ids_val": stream[1300:].clone(), "vocab_size": 64},
               d / "tokens.pt")
    return d


@pytest.fixture(scope="module")
def runs(llama):
    """The CLI FSDP run (rank 0's JSON, the checkpoint) and the driver's results."""
    d = llama
    proc = _torchrun(["-m", "edgec", "finetune", d / "llama.pt", "--json", "--data", d / "tokens.pt",
                      "-o", d / "out" / "ft.pt", "--fsdp", *HYPER], d)
    result = json.loads(proc.stdout)  # exactly one JSON document: rank 1 printed nothing
    (d / "drv").mkdir()
    (d / "driver.py").write_text(DRIVER)
    _torchrun([d / "driver.py", d / "llama.pt", d / "tokens.pt", d / "drv"], d)
    driver = json.loads((d / "drv" / "driver.json").read_text())
    return result, driver, torch.load(d / "drv" / "sd.pt"), d


def test_cli_fsdp_shards_and_writes_the_usual_checkpoint(runs):
    result, driver, _, d = runs
    f = result["fsdp"]
    assert result["world_size"] == 2 and result["written"] and result["batch_size_per_process"] == 4
    assert f["world"] == 2 and len(f["params_per_rank_bytes"]) == 2
    total = sum(p.numel() * 4 for p in load_checkpoint(d / "llama.pt").gm.parameters())  # unique (tied once)
    assert f["params_total_bytes"] == total
    for b in f["params_per_rank_bytes"]:  # half each, up to dim-0 padding of odd-sized rows
        assert total / 2 * 0.98 <= b <= total / 2 * 1.02
    assert f["units"] == 3  # one per decoder block + the root (norms, the tied embedding/head)
    assert sorted(p.name for p in (d / "out").iterdir()) == ["ft.pt"]
    model = load_checkpoint(d / "out" / "ft.pt")
    assert model.gm.lm_head.weight is model.gm.model.embed_tokens.weight  # still tied
    record = model.provenance[-1]
    assert record["params"]["fsdp"] is True and record["params"]["world_size"] == 2
    assert len(record["metrics"]["history"]) == 3 and model.digest() == result["digest"]
    assert driver["tied"] and driver["report_fsdp"] == f


def test_fsdp_equals_ddp(runs):
    """Same seeds and data order: FSDP's reduce-scatter and sharded AdamW give DDP's weights to float rounding."""
    result, driver, sd, d = runs
    fsdp = load_checkpoint(d / "out" / "ft.pt").state_dict()
    ddp = sd["ddp"]
    assert fsdp.keys() == ddp.keys()
    for k in ddp:
        assert torch.allclose(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6), k
    assert result["history"][0]["train_loss"] == pytest.approx(driver["history"][0], rel=1e-6)
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]  # it learns


def test_fsdp_resume_is_exact_and_optimizer_states_are_sharded(runs):
    _, driver, sd, _ = runs
    assert driver["interrupted"] and driver["resumed_from"] == 2
    assert driver["resumed_history"] == driver["history"]
    for k, v in sd["full"].items():
        assert torch.equal(v, sd["resumed"][k]), k
    local, full = driver["opt_state_local"], driver["opt_state_full"]
    assert sum(local) >= full and all(n <= full / 2 * 1.02 for n in local)
    assert "fsdp does not support distill 'off'" in driver["off_error"]


def test_fsdp_without_torchrun_is_one_clear_error(llama, tmp_path):
    d = llama
    with pytest.raises(EdgecError, match=r"launch with torchrun --nproc-per-node N \(N >= 2\)"):
        finetune_file(d / "llama.pt", tmp_path / "ft.pt", FinetuneOptions(data=str(d / "tokens.pt"), fsdp=True))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "edgec", "finetune", str(d / "llama.pt"), "--data",
                           str(d / "tokens.pt"), "-o", str(tmp_path / "ft.pt"), "--fsdp"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fsdp shards the model across processes" in proc.stderr and not (tmp_path / "ft.pt").exists()
