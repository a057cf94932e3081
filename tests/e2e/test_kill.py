"""SIGKILL mid-way: `export`, `finetune` and `prune` killed while working leave nothing at the destination (no
partial output, no temporary file), and `finetune --resume` after the kill gives the byte-identical checkpoint
of an uninterrupted run; Ctrl-C (SIGINT) during export exits "interrupted" and leaves nothing either. Real
processes (a kill cannot be simulated in-process), on a tiny model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgec.core.errors import EXIT_INTERRUPTED

WAIT_S = 120  # a step that never reaches its kill point fails instead of hanging the suite
_STARTED: list = []


@pytest.fixture(autouse=True)
def _no_stray_processes():
    """A test that fails before its kill must not leave its edgec process running."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(args, cwd, cache, stdout=subprocess.DEVNULL):
    # one intra-op thread: on a shared CPU OpenMP threads spin ~10x slower (and the runs compared must match)
    env = {k: v for k, v in os.environ.items() if k != "EDGEC_DEBUG"} | {"EDGEC_CACHE": str(cache),
                                                                         "OMP_NUM_THREADS": "1"}
    err = Path(cwd) / f".stderr-{time.monotonic_ns()}"
    with open(err, "w") as f:  # the child keeps its own descriptor
        proc = subprocess.Popen([sys.executable, "-m", "edgec", *map(str, args)], cwd=cwd, env=env,
                                stdout=stdout, stderr=f, text=True)
    proc.err_path = err
    _STARTED.append(proc)
    return proc


def stderr_of(proc) -> str:
    return proc.err_path.read_text()


def kill_when(proc, ready, after_s: float = 0.0, sig=signal.SIGKILL) -> int:
    """Send ``sig`` (SIGKILL) to ``proc`` ``after_s`` seconds after ``ready()`` first holds; fail if it ends
    before that. Returns the exit status."""
    deadline = time.monotonic() + WAIT_S
    while not ready():
        assert proc.poll() is None, f"ended (exit {proc.returncode}) before the kill point:\n{stderr_of(proc)}"
        assert time.monotonic() < deadline, f"never reached the kill point:\n{stderr_of(proc)}"
        time.sleep(0.01)
    time.sleep(after_s)
    assert proc.poll() is None, f"finished (exit {proc.returncode}) before it could be killed:\n{stderr_of(proc)}"
    proc.send_signal(sig)
    return proc.wait(30)


def leftovers(*folders) -> list[str]:
    """Files a killed command may have left: temporary files (atomic writes, caches) anywhere below."""
    return sorted(str(p) for f in folders for p in Path(f).rglob("*") if p.is_file() and ".tmp" in p.name)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from edgec.app import api
    from edgec.core.options import ZooCreateOptions

    folder = tmp_path_factory.mktemp("kill")
    api.zoo_create("resnet", folder / "r.pt", ZooCreateOptions(set={"base_width": 4, "blocks_per_stage": [1, 1, 1, 1],
                                                                    "image_size": 8}))
    g = np.random.default_rng(0)
    np.savez(folder / "d.npz", inputs=g.standard_normal((128, 1, 8, 8)).astype("float32"),
             targets=g.integers(0, 10, 128))
    return folder


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.suffix in (".pt", ".npz")}


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_kill_export_leaves_nothing(work, tmp_path, sig):
    before = snapshot(work)
    out = tmp_path / "out"
    out.mkdir()
    proc = start(["export", work / "r.pt", "-o", out / "m.onnx"], tmp_path, tmp_path / "cache")
    code = kill_when(proc, lambda: "export" in stderr_of(proc), after_s=0.5, sig=sig)
    # SIGINT is Ctrl-C: a clean "interrupted" exit (EXIT_INTERRUPTED), cleaning up as it goes
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else EXIT_INTERRUPTED), stderr_of(proc)
    assert sorted(p.name for p in out.iterdir()) == []
    assert leftovers(out, tmp_path / "cache", work) == []
    assert snapshot(work) == before  # inputs untouched


def test_kill_prune_leaves_nothing(work, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start(["prune", work / "r.pt", "--latency-ratio", "0.8", "--data", work / "d.npz", "-o", out / "p.pt"],
                 tmp_path, tmp_path / "cache")
    assert kill_when(proc, lambda: "prun" in stderr_of(proc), after_s=1.5) == -signal.SIGKILL
    assert sorted(p.name for p in out.iterdir()) == []
    assert leftovers(out, tmp_path / "cache") == []


def test_kill_finetune_then_resume_is_byte_identical(work, tmp_path):
    args = ["finetune", work / "r.pt", "--data", work / "d.npz", "--epochs", "3", "--batch-size", "16",
            "--lr", "3e-3", "--seed", "3"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref_dir.mkdir()
    run_dir.mkdir()
    ref = start([*args, "-o", "model.pt"], ref_dir, tmp_path / "cache-ref")  # runs alongside the killed one
    run = start([*args, "-o", "model.pt"], run_dir, tmp_path / "cache-run")
    resume = run_dir / "model.pt.resume"
    assert kill_when(run, resume.exists) == -signal.SIGKILL
    assert not (run_dir / "model.pt").exists()
    assert leftovers(run_dir) == []
    assert resume.stat().st_size > 0
    resumed = start([*args, "-o", "model.pt", "--resume", "--json"], run_dir, tmp_path / "cache-run",
                    stdout=subprocess.PIPE)
    stdout, _ = resumed.communicate(timeout=WAIT_S)
    assert resumed.returncode == 0, stderr_of(resumed)
    assert json.loads(stdout)["resumed_from"] == 1  # continued after epoch 1, not restarted
    assert ref.wait(WAIT_S) == 0, stderr_of(ref)
    assert not resume.exists()  # deleted once the output is saved
    assert (run_dir / "model.pt").read_bytes() == (ref_dir / "model.pt").read_bytes()
