import csv
import os
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.data import DataBundle, load_data
from edgec.data import features as F

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ helpers
def tone(freq=440.0, seconds=0.5, sr=16000, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return amp * np.sin(2 * np.pi * freq * t)


def write_wav(path, x, sr=16000, channels=1):
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(np.asarray(x) * 32767), -32768, 32767).astype("<i2")
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1).reshape(-1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def write_raw_wav(path, payload: bytes, tag: int, bits: int, sr=16000, channels=1, extensible_sub=None):
    """A WAV with any fmt chunk (the wave module cannot write float or EXTENSIBLE)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible_sub else tag, channels, sr, sr * block, block, bits)
    if extensible_sub:
        guid_tail = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", extensible_sub) + guid_tail
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


def make_folder(root: Path, rows, header=("path", "label", "split", "speaker"), sr=16000):
    """rows: tuples matching header; a wav with a label-dependent tone is written for every path."""
    root.mkdir(parents=True, exist_ok=True)
    freqs = {}
    for r in rows:
        d = dict(zip(header, r))
        p = root / d["path"]
        if not p.exists():
            f = freqs.setdefault(d.get("label", "x"), 300.0 + 400.0 * len(freqs))
            write_wav(p, tone(f + 7 * len(list(root.rglob("*.wav"))), 0.6, sr), sr)
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return root


def speaker_rows(speakers, labels=("a", "b"), per=2, split=None):
    rows = []
    for s in speakers:
        for lab in labels:
            for k in range(per):
                row = (f"{s}/{lab}{k}.wav", lab)
                row += ((split,) if split else ()) + (s,)
                rows.append(row)
    return rows


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


# ------------------------------------------------------------------------------------------ tensor files
def test_pt_classification_random_val_split(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, 4, generator=g, dtype=torch.float64)
    y = torch.arange(50) % 3
    p = tmp_path / "d.pt"
    torch.save({"inputs": x, "targets": y, "classes": ["cat", "dog", "eel"]}, p)
    b = load_data(str(p), val_fraction=0.2, seed=1)
    assert isinstance(b, DataBundle)
    assert b.task == "classification" and b.classes == ["cat", "dog", "eel"] and b.num_classes == 3
    assert len(b.split("train")) == 40 and len(b.split("val")) == 10
    xi, yi = b.split("train")[0]
    assert xi.dtype == torch.float32 and xi.shape == (3, 4)
    assert yi.dtype == torch.int64 and yi.ndim == 0
    batch = next(iter(torch.utils.data.DataLoader(b.split("train"), batch_size=8)))
    assert batch[0].shape == (8, 3, 4) and batch[1].shape == (8,)
    # deterministic split and digest; a different seed changes both
    b2 = load_data(str(p), val_fraction=0.2, seed=1)
    assert b2.digest == b.digest
    assert torch.equal(b2.split("val").targets, b.split("val").targets)
    assert torch.equal(b2.split("val").inputs, b.split("val").inputs)
    b3 = load_data(str(p), val_fraction=0.2, seed=2)
    assert b3.digest != b.digest
    assert len(b.digest) == 64
    with pytest.raises(EdgecError, match="no 'test' split"):
        b.split("test")
    assert "classification, 3 classes" in b.describe() and "train 40" in b.describe()


def test_pt_regression(tmp_path):
    p = tmp_path / "r.pt"
    torch.save({"inputs": torch.randn(20, 5), "targets": torch.rand(20, dtype=torch.float64),
                "test_inputs": torch.randn(4, 5), "test_targets": torch.rand(4)}, p)
    b = load_data(str(p), val_fraction=0.25)
    assert b.task == "regression" and b.classes is None and b.num_classes is None and b.output_dim == 1
    assert len(b.split("train")) == 15 and len(b.split("val")) == 5 and len(b.split("test")) == 4
    assert b.split("train")[0][1].dtype == torch.float32


def test_npz_with_explicit_splits(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, inputs=np.zeros((6, 2), np.float32), targets=np.array([0, 1, 2, 0, 1, 4]),
             val_inputs=np.ones((2, 2), np.float32), val_targets=np.array([1, 0]),
             test_inputs=np.ones((3, 2), np.float32), test_targets=np.array([2, 2, 0]))
    b = load_data(str(p))
    assert b.num_classes == 5 and b.classes == ["0", "1", "2", "3", "4"]
    assert {k: len(v) for k, v in b.splits.items()} == {"train": 6, "val": 2, "test": 3}


def test_npz_classes_and_object_arrays(tmp_path):
    p = tmp_path / "c.npz"
    np.savez(p, inputs=np.zeros((4, 2), np.float32), targets=np.array([0, 1, 0, 1]), classes=np.array(["no", "yes"]))
    assert load_data(str(p)).classes == ["no", "yes"]
    bad = tmp_path / "obj.npz"
    np.savez(bad, inputs=np.array([object(), object()], dtype=object), targets=np.array([0, 1]))
    with pytest.raises(EdgecError, match=r"obj\.npz.*unsafe"):
        load_data(str(bad))


def test_safetensors_with_metadata_classes(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "d.safetensors"
    save_file({"inputs": torch.randn(10, 3), "targets": torch.tensor([0, 1] * 5)}, str(p),
              metadata={"classes": '["low", "high"]'})
    b = load_data(str(p), val_fraction=0.2)
    assert b.classes == ["low", "high"] and len(b.split("val")) == 2


class _Hostile:
    """Unpickling this would create a file (builtins.open(path, 'w'))."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pt_hostile_pickle_refused(tmp_path):
    victim = tmp_path / "pwned.txt"
    p = tmp_path / "evil.pt"
    torch.save({"inputs": torch.zeros(2, 2), "targets": torch.tensor([0, 1]), "x": _Hostile(str(victim))}, p)
    assert not victim.exists()
    with pytest.raises(EdgecError) as e:
        load_data(str(p))
    msg = str(e.value)
    assert "unsafe" in msg and str(p) in msg and "\n" not in msg
    assert not victim.exists()


@pytest.mark.parametrize(
    "content, match",
    [
        ({"inputs": torch.zeros(3, 2)}, "needs 'inputs' and 'targets'"),
        ({"inputs": torch.zeros(3, 2), "targets": torch.tensor([0, 1])}, "3 examples but 'targets' has 2"),
        ({"inputs": torch.tensor([[0.0], [float("nan")]]), "targets": torch.tensor([0, 1])}, "NaN/Inf.*example 1"),
        ({"inputs": torch.zeros(2, 1), "targets": torch.tensor([0, 1]), "val_inputs": torch.zeros(1, 1)},
         "'val_inputs' but not 'val_targets'"),
        ({"inputs": torch.zeros(2, 1), "targets": torch.tensor([0, -1])}, "negative class"),
        ({"inputs": torch.zeros(2, 1), "targets": torch.tensor([0, 2]), "classes": ["a", "b"]}, "out of range"),
        ({"inputs": torch.zeros(0, 1), "targets": torch.zeros(0, dtype=torch.int64)}, "empty"),
        ({"inputs": torch.zeros(2, 1), "targets": torch.tensor([0, 1]),
          "test_inputs": torch.zeros(2, 3), "test_targets": torch.tensor([0, 1])}, "shapes differ"),
        ([1, 2, 3], "expected a dict"),
    ],
)
def test_tensor_file_errors(tmp_path, content, match):
    p = tmp_path / "bad.pt"
    torch.save(content, p)
    with pytest.raises(EdgecError, match=match) as e:
        load_data(str(p))
    assert str(p) in str(e.value)


def test_missing_and_unknown_sources(tmp_path):
    with pytest.raises(EdgecError, match="no such data file"):
        load_data(str(tmp_path / "nope.pt"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(EdgecError, match="unknown data file type"):
        load_data(str(tmp_path / "x.txt"))
    with pytest.raises(EdgecError, match="no such data folder"):
        load_data(str(tmp_path / "missing_dir"))


# ------------------------------------------------------------------------------------------ features
def test_log_mel_shape_and_tone_peak():
    sr, n_mels = 16000, 40
    x = torch.from_numpy(tone(1000.0, 1.0, sr))
    lm = F.log_mel(x, sr, n_mels)
    assert lm.shape == (1 + (16000 - 400) // 160, n_mels)
    centres = F.mel_centres_hz(sr, n_mels)
    expected = int(torch.argmin((centres - 1000.0).abs()))
    peaks = lm.argmax(dim=1)
    assert bool((peaks == expected).all())
    for f in (300.0, 2500.0, 6000.0):
        lm = F.log_mel(torch.from_numpy(tone(f, 0.3, sr)), sr, n_mels)
        assert int(lm.mean(0).argmax()) == int(torch.argmin((centres - f).abs()))
    # silence sits at the log floor
    assert torch.allclose(F.log_mel(torch.zeros(800), sr, n_mels), torch.full((3, n_mels), float(np.log(1e-6)), dtype=torch.float64), atol=1e-9)


def test_mel_filterbank_properties():
    fb = F.mel_filterbank(16000, 512, 40)
    assert fb.shape == (257, 40)
    assert float(fb.max()) <= 1.0 and float(fb.min()) >= 0.0
    assert bool((fb.sum(0) > 0).all())  # no empty filter at 40 mels / 512-point FFT
    assert F.hz_to_mel(700.0) == pytest.approx(2595.0 * np.log10(2.0))
    assert F.frame_params(16000) == (400, 160, 512)


def test_compute_features_fixed_length_and_normalisation():
    short = F.compute_features(torch.from_numpy(tone(500.0, 0.5)), frames=200)
    assert short.shape == (200, 40) and short.dtype == torch.float32
    real = 1 + (8000 - 400) // 160
    assert torch.all(short[real:] == short.min())  # padded at the end with the utterance minimum
    assert float(short[:real].mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(short[:real].std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    # gain invariance of the default normalisation (broadband signal: far above the log floor)
    noise = torch.from_numpy(np.random.default_rng(0).normal(0.0, 0.05, 8000))
    quiet, loud = F.compute_features(noise, frames=60), F.compute_features(4 * noise, frames=60)
    assert torch.allclose(quiet, loud, atol=1e-3)
    long = torch.from_numpy(np.concatenate([tone(300.0, 2.0), tone(3000.0, 2.0)]))
    lm = F.normalize_utterance(F.log_mel(long), "utterance")
    cropped = F.compute_features(long, frames=100)
    start = (lm.shape[0] - 100) // 2
    assert torch.allclose(cropped, lm[start : start + 100].float())
    raw = F.compute_features(torch.from_numpy(tone(500.0, 0.5)), frames=60, normalize="none")
    assert raw.shape == (60, 40) and float(raw.max()) > 0
    cmvn = F.compute_features(torch.from_numpy(tone(500.0, 0.5)), frames=40, normalize="bin")
    assert cmvn.mean(0).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------ audio folders
def test_audio_folder_speaker_disjoint_val(tmp_path, cache):
    rows = speaker_rows(["s1", "s2", "s3", "s4", "s5"], split="train") + speaker_rows(["t1"], split="test")
    root = make_folder(tmp_path / "data", rows)
    b = load_data(str(root), val_fraction=0.2, seed=0, cache_dir=cache, frames=50, n_mels=32)
    assert b.task == "classification" and b.classes == ["a", "b"]
    assert set(b.splits) == {"train", "val", "test"}
    sp = b.meta["speakers"]
    assert len(sp["val"]) == 1 and not set(sp["val"]) & set(sp["train"]) and sp["test"] == ["t1"]
    assert len(b.split("train")) == 16 and len(b.split("val")) == 4 and len(b.split("test")) == 4
    x, y = b.split("val")[0]
    assert x.shape == (50, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert "speaker-disjoint" in b.describe() and "(disjoint)" in b.describe()
    # another seed may hold out another speaker but stays disjoint
    b2 = load_data(str(root), val_fraction=0.4, seed=3, cache_dir=cache, frames=50, n_mels=32)
    assert len(b2.meta["speakers"]["val"]) == 2 and not set(b2.meta["speakers"]["val"]) & set(b2.meta["speakers"]["train"])


def test_audio_folder_without_split_or_speaker(tmp_path, cache):
    rows = [(f"w{i}.wav", "yes" if i % 2 else "no") for i in range(10)]
    root = make_folder(tmp_path / "d", rows, header=("path", "label"))
    b = load_data(str(root), val_fraction=0.3, cache_dir=cache, frames=30)
    assert len(b.split("train")) == 7 and len(b.split("val")) == 3 and not b.has_split("test")
    with pytest.raises(EdgecError, match="no 'test' split"):
        b.split("test")
    # labels.csv itself is accepted as the source
    assert load_data(str(root / "labels.csv"), val_fraction=0.3, cache_dir=cache, frames=30).digest == b.digest


def test_feature_cache_hit(tmp_path, cache, monkeypatch):
    root = make_folder(tmp_path / "d", speaker_rows(["s1", "s2"], split="train") + speaker_rows(["s3"], split="val"))
    b1 = load_data(str(root), cache_dir=cache, frames=40)
    assert b1.meta["from_cache"] is False and os.path.isfile(b1.meta["cache_path"])
    assert os.path.dirname(b1.meta["cache_path"]) == cache
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]

    def boom(*a, **k):
        raise AssertionError("features recomputed despite the cache")

    monkeypatch.setattr(F, "compute_features", boom)
    b2 = load_data(str(root), cache_dir=cache, frames=40)
    assert b2.meta["from_cache"] is True and b2.digest == b1.digest
    assert torch.equal(b2.split("train").inputs, b1.split("train").inputs)
    # a feature parameter is part of the key
    with pytest.raises(AssertionError, match="recomputed"):
        load_data(str(root), cache_dir=cache, frames=41)
    monkeypatch.undo()
    # changing a wav's content changes the digest
    write_wav(root / "s1" / "a0.wav", tone(1234.0, 0.4))
    assert load_data(str(root), cache_dir=cache, frames=40).digest != b1.digest


def test_cache_dir_from_env(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d", speaker_rows(["s1", "s2"], per=1), header=("path", "label", "speaker"))
    monkeypatch.setenv("EDGEC_CACHE", str(tmp_path / "envcache"))
    b = load_data(str(root), frames=20)
    assert b.meta["cache_path"].startswith(str(tmp_path / "envcache" / "features"))
    monkeypatch.delenv("EDGEC_CACHE")
    monkeypatch.chdir(tmp_path)
    b = load_data(str(root), frames=20)
    assert b.meta["cache_path"].startswith(str(tmp_path / ".cache" / "edgec" / "features"))


def test_stereo_and_extensible_pcm(tmp_path, cache):
    root = tmp_path / "d"
    write_wav(root / "st.wav", tone(440.0, 0.5), channels=2)
    pcm = np.round(tone(440.0, 0.5) * 32767).astype("<i2").tobytes()
    write_raw_wav(root / "ext.wav", pcm, tag=1, bits=16, extensible_sub=1)
    write_wav(root / "mono.wav", tone(440.0, 0.5))
    (root / "labels.csv").write_text("path,label\nst.wav,x\next.wav,x\nmono.wav,x\n")
    b = load_data(str(root), val_fraction=0.0, cache_dir=cache, frames=30)
    x = b.split("train").inputs
    assert torch.allclose(x[0], x[2], atol=1e-5) and torch.allclose(x[1], x[2], atol=1e-5)


def _expect(root, match, **kw):
    with pytest.raises(EdgecError, match=match) as e:
        load_data(str(root), frames=20, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_audio_error_missing_folder_and_csv(tmp_path):
    msg = _expect(tmp_path / "nowhere", "no such data folder")
    assert "nowhere" in msg
    (tmp_path / "empty").mkdir()
    msg = _expect(tmp_path / "empty", "labels.csv: not found")
    assert str(tmp_path / "empty" / "labels.csv") in msg


def test_audio_error_missing_wav(tmp_path, cache):
    root = make_folder(tmp_path / "d", [("a.wav", "x"), ("b.wav", "y")], header=("path", "label"))
    os.remove(root / "b.wav")
    msg = _expect(root, r"labels\.csv: row 3: wav file 'b\.wav' not found", cache_dir=cache)
    assert str(root / "b.wav") in msg


def test_audio_error_unknown_label(tmp_path, cache):
    rows = [("a.wav", "x", "train"), ("b.wav", "y", "train"), ("c.wav", "z", "test")]
    root = make_folder(tmp_path / "d", rows, header=("path", "label", "split"))
    msg = _expect(root, r"row 4: label 'z' \(test\) is not among the train labels \(x, y\)", cache_dir=cache)
    assert str(root / "labels.csv") in msg


def test_audio_error_empty_split(tmp_path, cache):
    root = make_folder(tmp_path / "d", [("a.wav", "x", "test"), ("b.wav", "y", "val")], header=("path", "label", "split"))
    msg = _expect(root, "no train rows", cache_dir=cache)
    assert "labels.csv" in msg
    root2 = make_folder(tmp_path / "e", [("a.wav", "x", "train"), ("b.wav", "y", "train")], header=("path", "label", "split"))
    b = load_data(str(root2), val_fraction=0.0, cache_dir=cache, frames=20)
    with pytest.raises(EdgecError, match="no 'val' split"):
        b.split("val")
    with pytest.raises(EdgecError, match="unknown split 'dev2'"):
        b.split("dev2")
    empty = DataBundle("classification", ["a"], 1, {"train": b.split("train"), "test": torch.utils.data.Subset(b.split("train"), [])}, "0" * 64, source="x")
    with pytest.raises(EdgecError, match="'test' split is empty"):
        empty.split("test")


def test_audio_error_wrong_sample_rate(tmp_path, cache):
    root = tmp_path / "d"
    write_wav(root / "ok.wav", tone(), 16000)
    write_wav(root / "fast.wav", tone(sr=22050), 22050)
    (root / "labels.csv").write_text("path,label\nok.wav,x\nfast.wav,y\n")
    msg = _expect(root, r"sample rate 22050 Hz, expected 16000 Hz", cache_dir=cache)
    assert str(root / "fast.wav") in msg and "row 3" in msg


def test_audio_error_not_pcm16(tmp_path, cache):
    root = tmp_path / "d"
    write_raw_wav(root / "float.wav", np.zeros(1600, "<f4").tobytes(), tag=3, bits=32)
    write_wav(root / "ok.wav", tone())
    (root / "labels.csv").write_text("path,label\nok.wav,x\nfloat.wav,x\n")
    msg = _expect(root, r"not 16-bit PCM \(found IEEE float, 32-bit\)", cache_dir=cache)
    assert str(root / "float.wav") in msg and "row 3" in msg
    write_raw_wav(root / "float.wav", np.zeros(1600, "<f4").tobytes(), tag=1, bits=32, extensible_sub=3)
    _expect(root, "not 16-bit PCM .found IEEE float", cache_dir=cache)
    with wave.open(str(root / "float.wav"), "wb") as w:  # 8-bit PCM
        w.setnchannels(1), w.setsampwidth(1), w.setframerate(16000), w.writeframes(bytes(1600))
    _expect(root, r"float\.wav.*not 16-bit PCM \(found PCM, 8-bit\)", cache_dir=cache)
    (root / "float.wav").write_bytes(b"ID3 this is an mp3")
    _expect(root, r"float\.wav \(labels\.csv row 3\): not a WAV file", cache_dir=cache)


@pytest.mark.parametrize(
    "text, match",
    [
        ("file,label\na.wav,x\n", r"row 1: malformed header 'file,label' \(unknown column 'file'"),
        ("path,split\na.wav,train\n", r"row 1: malformed header.*missing column 'label'"),
        ("path,label,label\na.wav,x,x\n", r"duplicate column 'label'"),
        ("", "empty file"),
        ("path,label\n", "no data rows"),
        ("path,label\na.wav,x\na.wav\n", r"row 3: expected 2 fields"),
        ("path,label,split\na.wav,x,training\n", r"row 2: unknown split 'training'"),
        ("path,label\na.wav,\n", r"row 2: empty label"),
    ],
)
def test_audio_error_malformed_csv(tmp_path, cache, text, match):
    root = tmp_path / "d"
    write_wav(root / "a.wav", tone())
    (root / "labels.csv").write_text(text)
    msg = _expect(root, match, cache_dir=cache)
    assert str(root / "labels.csv") in msg


# ------------------------------------------------------------------------------------------ entry points
ENTRY = '''
import torch
from torch.utils.data import Dataset, TensorDataset

class Named(TensorDataset):
    classes = ["zero", "one", "two"]

def whole():
    g = torch.Generator().manual_seed(0)
    return Named(torch.randn(30, 4, generator=g), torch.arange(30) % 3)

def splits():
    return {"train": TensorDataset(torch.randn(8, 2), torch.rand(8)),
            "test": TensorDataset(torch.randn(3, 2), torch.rand(3))}

def wrong():
    return [1, 2, 3]

def raises():
    raise RuntimeError("database is down")

not_callable = 5
'''


@pytest.fixture
def entry_module(tmp_path, monkeypatch):
    (tmp_path / "edgec_test_entry_mod.py").write_text(ENTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("edgec_test_entry_mod", None)
    yield "edgec_test_entry_mod"
    sys.modules.pop("edgec_test_entry_mod", None)


def test_entry_point_dataset_and_dict(entry_module):
    b = load_data(f"{entry_module}:whole", val_fraction=0.2, seed=0)
    assert b.task == "classification" and b.classes == ["zero", "one", "two"] and b.num_classes == 3
    assert len(b.split("train")) == 24 and len(b.split("val")) == 6
    x, y = b.split("val")[0]
    assert y.dtype == torch.int64 and y.ndim == 0 and x.shape == (4,)
    assert load_data(f"{entry_module}:whole", val_fraction=0.2, seed=0).digest == b.digest
    r = load_data(f"{entry_module}:splits", val_fraction=0.25)
    assert r.task == "regression" and set(r.splits) == {"train", "val", "test"} and len(r.split("val")) == 2
    assert r.split("test")[0][1].dtype == torch.float32


@pytest.mark.parametrize(
    "target, match",
    [
        ("wrong", "returned a list; expected a torch Dataset"),
        ("raises", "raised RuntimeError: database is down"),
        ("not_callable", "is a int, not a function"),
        ("absent", "has no attribute 'absent'"),
    ],
)
def test_entry_point_errors(entry_module, target, match):
    with pytest.raises(EdgecError, match=match):
        load_data(f"{entry_module}:{target}")


def test_entry_point_import_error():
    with pytest.raises(EdgecError, match="cannot import 'edgec_no_such_module_xyz'"):
        load_data("edgec_no_such_module_xyz:make")
