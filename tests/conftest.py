import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, env=None, check=None):
    """Run `python -m edgec ARGS` in a subprocess: real exit codes, real stderr."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("EDGEC_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "edgec", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=600)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Feature caches of this run (also in CLI subprocesses) go to a temporary folder, not the checkout."""
    os.environ["EDGEC_CACHE"] = str(tmp_path_factory.mktemp("edgec-cache"))


@pytest.fixture(scope="session")
def conformer_ckpt(tmp_path_factory):
    from edgec.models.checkpoint import new_model, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "conformer.pt"
    save_checkpoint(new_model("conformer", seed=0), path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one intra-op thread is faster, and much faster on a busy machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
