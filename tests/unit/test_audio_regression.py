"""Audio csv files with a ``value`` column: regression bundles (float32 targets), their errors, the speech zoo's
regression spec (num_classes=1), a short fine-tune on them, and the speech fixture's arousal csv."""
import csv
import importlib.util
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from edgec.core.errors import EdgecError
from edgec.data import load_data

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
SPEAKERS = {"a": "train", "b": "train", "c": "val", "d": "test"}


def write_wav(path: Path, freq: float, amp: float, seconds: float = 0.4, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    pcm = np.round(amp * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def folder(tmp_path):
    """4 speakers x 4 clips; value rises with the tone's pitch; labels.csv (classes) and arousal.csv (values)
    name the same wavs."""
    root = tmp_path / "d"
    values, labels = [], []
    for i, (spk, split) in enumerate(SPEAKERS.items()):
        for k in range(4):
            value = round(-1.5 + k + 0.25 * i, 4)
            path = f"wav/{spk}/{k}.wav"
            write_wav(root / path, 200.0 + 150.0 * k + 11 * i, 0.2 + 0.05 * k)
            values.append((path, f"{value}", split, spk))
            labels.append((path, "hi" if k >= 2 else "lo", split, spk))
    write_csv(root / "labels.csv", ("path", "label", "split", "speaker"), labels)
    write_csv(root / "arousal.csv", ("path", "value", "split", "speaker"), values)
    return root


def test_value_column_loads_as_regression(folder, tmp_path):
    cache = str(tmp_path / "cache")
    reg = load_data(str(folder / "arousal.csv"), cache_dir=cache, n_mels=16, frames=32)
    assert reg.task == "regression" and reg.classes is None and reg.num_classes is None
    assert reg.output_dim == 1 and reg.meta["target_dim"] == 1
    assert reg.source == str(folder / "arousal.csv")
    assert {s: len(ds) for s, ds in reg.splits.items()} == {"train": 8, "val": 4, "test": 4}
    x, y = reg.split("train")[5]
    assert x.shape == (32, 16) and y.dtype == torch.float32 and y.shape == ()
    rows = read_csv(folder / "arousal.csv")
    want = torch.tensor([float(r["value"]) for r in rows if r["split"] == "test"], dtype=torch.float32)
    got = torch.stack([reg.split("test")[i][1] for i in range(4)])
    assert torch.equal(got, want)
    stats = reg.meta["value_stats"]["test"]
    assert stats["n"] == 4 and stats["mean"] == pytest.approx(float(want.double().mean()))
    assert stats["min"] == pytest.approx(-0.75) and stats["max"] == pytest.approx(2.25)
    assert "class_counts" not in reg.meta
    # the classification csv of the same folder: same features (one cache entry), other targets and digest
    cls = load_data(str(folder), cache_dir=cache, n_mels=16, frames=32)
    assert cls.task == "classification" and cls.classes == ["hi", "lo"] and cls.meta["from_cache"]
    assert cls.meta["features_digest"] == reg.meta["features_digest"] and cls.digest != reg.digest
    assert torch.equal(cls.split("test")[2][0], reg.split("test")[2][0])
    assert cls.split("test")[2][1].dtype == torch.int64


@pytest.mark.parametrize("value, match", [
    ("high", r"row 3: value 'high' is not a finite number"),
    ("nan", r"row 3: value 'nan' is not a finite number"),
    ("-inf", r"row 3: value '-inf' is not a finite number"),
    ("", r"row 3: empty value"),
])
def test_bad_values_are_one_line_errors(folder, tmp_path, value, match):
    path = write_csv(folder / "bad.csv", ("path", "value"), [("wav/a/0.wav", "0.5"), ("wav/a/1.wav", value)])
    with pytest.raises(EdgecError, match=match) as err:
        load_data(str(path), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("header, match", [
    (("path", "label", "value"), r"malformed header 'path,label,value' \(both 'label' and 'value'"),
    (("path", "split"), r"missing column 'label' \(or 'value' for regression\)"),
    (("value", "split"), r"missing column 'path'"),
])
def test_header_needs_exactly_one_target_column(folder, tmp_path, header, match):
    row = {"path": "wav/a/0.wav", "label": "x", "value": "1", "split": "train"}
    path = write_csv(folder / "bad.csv", header, [[row[c] for c in header]])
    with pytest.raises(EdgecError, match=match):
        load_data(str(path), cache_dir=str(tmp_path / "cache"))


def test_speech_zoo_spec_is_regression_with_one_output():
    from edgec.models.blocks import speech_input_spec
    from edgec.models.checkpoint import new_model

    assert speech_input_spec(40).task == "classification"
    assert speech_input_spec(40, num_classes=1).task == "regression"
    assert speech_input_spec(40, num_classes=4).task == "classification"
    model = new_model("hafformer", {"num_classes": 1, "dims": [16, 16, 16]}, seed=0)
    assert model.spec.task == "regression"
    assert new_model("hafformer", {"dims": [16, 16, 16]}, seed=0).spec.task == "classification"


def test_finetune_a_speech_model_on_values(folder, tmp_path):
    """num_classes=1 + a value csv trains with MSE and keeps the best epoch by val CCC."""
    from edgec.evaluation import evaluate_model
    from edgec.models.checkpoint import new_model
    from edgec.train import finetune

    bundle = load_data(str(folder / "arousal.csv"), cache_dir=str(tmp_path / "cache"), n_mels=16, frames=32)
    model = new_model("hafformer", {"num_classes": 1, "n_mels": 16, "dims": [16, 16, 16]}, seed=0)
    trained, report = finetune(model, bundle, epochs=2, lr=3e-3, batch_size=4, seed=0)
    assert report["monitor"] == "ccc"
    assert {"ccc", "mae"} <= set(report["history"][-1]["val"])
    res = evaluate_model(trained, bundle, split="test", latency=False)
    assert set(res["metrics"]) >= {"ccc", "mae", "rmse"} and res["task"] == "regression"
    out = trained.run((bundle.split("test")[0][0][None],))[0]
    assert out.shape == (1, 1)


def test_wrong_output_width_is_refused(folder, tmp_path):
    from edgec.models.checkpoint import new_model
    from edgec.train import finetune

    bundle = load_data(str(folder / "arousal.csv"), cache_dir=str(tmp_path / "cache"), n_mels=16, frames=32)
    model = new_model("hafformer", {"n_mels": 16, "dims": [16, 16, 16]}, seed=0)  # 4 outputs
    with pytest.raises(EdgecError, match=r"outputs shape \[2, 4\] but the regression data has 1 target"):
        finetune(model, bundle, epochs=1, batch_size=4, seed=0)


@pytest.fixture(scope="module")
def make_speech():
    spec = importlib.util.spec_from_file_location("make_speech", ROOT / "fixtures" / "make_speech.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arousal_is_the_mean_neutral_z_score(make_speech):
    assert make_speech.arousal({"pitch": 50, "speed": 165, "amp": 100}) == 0.0
    assert make_speech.arousal({"pitch": 57, "speed": 177, "amp": 110}) == pytest.approx(1.0)
    assert make_speech.arousal({"pitch": 36, "speed": 165, "amp": 70}) == pytest.approx(-(2 + 3) / 3)


def test_arousal_csv_matches_labels_csv_rows(make_speech, tmp_path):
    """--csv-only writes both csv files from the seeded plan (no espeak-ng): same paths, splits and speakers,
    byte-identical on a second run, and the classes' arousal in the designed order."""
    make_speech.write_csvs(str(tmp_path / "a"), sentences=3, seed=0)
    make_speech.write_csvs(str(tmp_path / "b"), sentences=3, seed=0)
    for name in ("labels.csv", "arousal.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    labels = read_csv(tmp_path / "a" / "labels.csv")
    values = read_csv(tmp_path / "a" / "arousal.csv")
    assert len(values) == len(labels) == 3 * 4 * 13
    assert [(r["path"], r["split"], r["speaker"]) for r in values] == \
        [(r["path"], r["split"], r["speaker"]) for r in labels]
    mean = {c: np.mean([float(v["value"]) for v, lab in zip(values, labels) if lab["label"] == c])
            for c in ("low_arousal", "neutral", "high_arousal")}
    assert mean["low_arousal"] < -2 < mean["neutral"] < 1 < 2 < mean["high_arousal"]
