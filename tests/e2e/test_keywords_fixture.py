"""The keyword-spotting fixture generator (fixtures/make_keywords.py): byte-deterministic in its seed, speaker-disjoint
splits, fixed-length clips, readable by the audio loader, and one-line errors for bad arguments."""
import csv
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import pytest

from edgec.data import load_data

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "fixtures" / "make_keywords.py"
TINY = ("--words", "4", "--speakers", "5", "--reps", "1")
WORDS = ["yes", "no", "go", "stop"]  # the first four of the list


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120)


def _generate(out, *extra):
    proc = _run("--out", out, *TINY, *extra)
    assert proc.returncode == 0, proc.stderr
    return out


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng); the keyword fixture cannot be synthesised")
    return _generate(tmp_path_factory.mktemp("kw") / "a", "--jobs", "2")


def test_keywords_byte_deterministic_in_seed_and_jobs(tiny, tmp_path):
    same = _files(_generate(tmp_path / "b", "--jobs", "1"))
    ref = _files(tiny)
    assert len(ref) == 4 * 5 + 1 and sorted(same) == sorted(ref)
    for rel, blob in ref.items():
        assert same[rel] == blob, rel
    other = _files(_generate(tmp_path / "c", "--seed", "1"))
    assert sorted(other) == sorted(ref)  # same layout, different audio
    assert other[Path("labels.csv")] == ref[Path("labels.csv")]
    wavs = [rel for rel in ref if rel.suffix == ".wav"]
    assert all(other[rel] != ref[rel] for rel in wavs)


def test_keywords_composition_and_loader(tiny, tmp_path):
    with open(tiny / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "split", "speaker"] and len(rows) == 20
    spk = {s: {r["speaker"] for r in rows if r["split"] == s} for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in spk.items()} == {"train": 3, "val": 1, "test": 1}
    assert not (spk["train"] & spk["val"]) and not (spk["train"] & spk["test"]) and not (spk["val"] & spk["test"])
    for s in set().union(*spk.values()):  # every speaker says every word: speaker and word are independent
        assert sorted(r["label"] for r in rows if r["speaker"] == s) == sorted(WORDS)
    for r in rows:
        with wave.open(str(tiny / r["path"])) as w:
            assert (w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()) == (16000, 2, 1, 16000)
    b = load_data(str(tiny), cache_dir=str(tmp_path / "cache"), frames=100)
    assert b.classes == sorted(WORDS)
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 12, "val": 4, "test": 4}
    assert b.input_shape == (100, 40)
    assert sorted(b.meta["speakers"]["test"]) == sorted(spk["test"])


@pytest.mark.parametrize("args, needle", [
    (("--words", "0"), "--words must be between 1 and 36"),
    (("--words", "37"), "--words must be between 1 and 36"),
    (("--speakers", "2"), "--speakers must be between 3 and"),
    (("--reps", "0"), "--reps must be between 1 and"),
])
def test_keywords_bad_arguments_one_line(tmp_path, args, needle):
    proc = _run("--out", tmp_path / "x", *args)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_keywords: error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
