"""Shared by tests/unit/test_model_card.py and tests/e2e/test_gates.py: a tiny user model in its own file
(exports in about a second), data it scores perfectly on, and the CLI run in-process with real exit codes."""
import sys
from pathlib import Path

import pytest
import torch

MLP_SOURCE = '''
from torch import nn


class Mlp(nn.Module):
    def __init__(self, n_in=8, hidden=16, n_classes=3):
        super().__init__()
        self.l1 = nn.Linear(n_in, hidden)
        self.act = nn.ReLU()
        self.l2 = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))
'''
ARCH = "mlp.py:Mlp"
CLASSES = ["yes", "no|maybe", "stop"]  # a '|' to check the card's markdown escaping


def make_project(folder: Path):
    """``mlp.py``, ``m.pt`` (the model, arch relative to ``folder``) and ``d.pt`` whose targets are the model's
    own predictions (accuracy 1.0 for the model itself, lower for anything that changes it)."""
    from edgec.app.python_api import from_module, save
    from edgec.models.source import resolve

    (folder / "mlp.py").write_text(MLP_SOURCE)
    torch.manual_seed(0)
    module = resolve(str(folder / "mlp.py") + ":Mlp")().eval()
    model = from_module(module, torch.randn(2, 8), arch=ARCH, config={})
    save(model, folder / "m.pt")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g)
    with torch.no_grad():
        y = module(x).argmax(1)
    torch.save({"inputs": x[:30], "targets": y[:30], "test_inputs": x[30:], "test_targets": y[30:],
                "classes": CLASSES}, folder / "d.pt")
    return model


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """``edgec ARGS`` in this process through the console entry point: (exit code, stdout, stderr)."""
    from edgec.app.cli import main

    monkeypatch.setattr(sys, "argv", ["edgec", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err
