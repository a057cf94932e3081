"""The bundled fixture generators: the espeak-ng speech task and the digits task (deterministic, composed as
documented)."""
import csv
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest
import torch

from edgec.data import load_data

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ fixtures
def _run_fixture(script, *args):
    proc = subprocess.run([sys.executable, str(ROOT / "fixtures" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def small_speech(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); the speech fixture cannot be synthesised")
    out = tmp_path_factory.mktemp("speech") / "a"
    _run_fixture("make_speech.py", "--out", out, "--sentences", "2")
    return out


def test_speech_fixture_composition(small_speech, tmp_path):
    with open(small_speech / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "split", "speaker"]
    labels = {r["label"] for r in rows}
    assert labels == {"neutral", "high_arousal", "low_arousal", "whisper"}
    spk = {s: {r["speaker"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert all(spk.values())
    assert not (spk["train"] & spk["val"]) and not (spk["train"] & spk["test"]) and not (spk["val"] & spk["test"])
    # every speaker has every class, so speaker and class are independent
    for s in set().union(*spk.values()):
        assert {r["label"] for r in rows if r["speaker"] == s} == labels
    with wave.open(str(small_speech / rows[0]["path"])) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (16000, 2, 1)
    b = load_data(str(small_speech), cache_dir=str(tmp_path / "c"))
    assert b.classes == sorted(labels) and {k: len(v) for k, v in b.splits.items()} == {
        s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    assert sorted(b.meta["speakers"]["test"]) == sorted(spk["test"])
    assert b.input_shape == (200, 40)


def test_speech_fixture_deterministic(small_speech, tmp_path):
    other = tmp_path / "b"
    _run_fixture("make_speech.py", "--out", other, "--sentences", "2")
    a_files = sorted(p.relative_to(small_speech) for p in small_speech.rglob("*") if p.is_file())
    b_files = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    assert a_files == b_files and len(a_files) > 50
    for rel in a_files:
        assert (small_speech / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_digits_fixture(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits.npz"
    _run_fixture("make_digits.py", "--out", out)
    b = load_data(str(out))
    assert b.num_classes == 10 and b.classes == [str(i) for i in range(10)]
    x, y = b.split("test")[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    allx = b.split("train").inputs
    assert float(allx.min()) >= 0.0 and float(allx.max()) == 1.0
    assert sum(len(v) for v in b.splits.values()) == 1797
    again = tmp_path / "digits2.npz"
    _run_fixture("make_digits.py", "--out", again)
    assert out.read_bytes() == again.read_bytes()
