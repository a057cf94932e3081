"""Audio folders: ``labels.csv`` + 16-bit PCM WAV files -> fixed-size log-mel tensors.

Columns ``path``, ``label`` (required), ``split``, ``speaker`` (optional). A csv with a numeric ``value``
column instead of ``label`` (any file name, e.g. ``arousal.csv`` beside ``labels.csv``) is a regression task:
float32 targets, one per clip. Without val rows a fraction of the
train speakers is held out, so validation never hears a training speaker. Features are cached by parameters
and wav content. Rules and errors: see docs/architecture.md#data-and-imports.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import struct

import numpy as np
import torch

from edgec.core.errors import EdgecError
from edgec.core.fileio import atomic_write, serialize, sha256_file
from edgec.data import features as F
from edgec.data.bundle import DataBundle, TensorPairDataset, random_split_indices

LABELS_CSV = "labels.csv"
TARGET_COLUMNS = ("label", "value")  # exactly one: class names (classification) or numbers (regression)
OPTIONAL_COLUMNS = ("split", "speaker")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}
FORMAT_TAGS = {
    1: "PCM",
    2: "MS ADPCM",
    3: "IEEE float",
    6: "A-law",
    7: "mu-law",
    0x11: "IMA ADPCM",
    0x55: "MP3",
    0xFFFE: "extensible",
}


def default_cache_dir() -> str:
    """``$EDGEC_CACHE/features`` if EDGEC_CACHE is set, else ``./.cache/edgec/features``."""
    root = os.environ.get("EDGEC_CACHE")
    if root:
        return os.path.join(root, "features")
    return os.path.join(os.getcwd(), ".cache", "edgec", "features")


# --------------------------------------------------------------------------------------------- WAV
def _chunks(raw: bytes, where: str):
    """``(id, body)`` of each RIFF chunk. A chunk claiming more bytes than the file holds is malformed, except
    ``data``, whose size streaming writers leave open: its body is what the file has."""
    pos = 12
    while pos + 8 <= len(raw):
        cid = raw[pos : pos + 4]
        (size,) = struct.unpack("<I", raw[pos + 4 : pos + 8])
        end = pos + 8 + size
        if end > len(raw) and cid != b"data":
            raise EdgecError(f"{where}: malformed WAV (its '{repr(cid)[2:-1]}' chunk claims {size} bytes, the file "
                             f"has {len(raw) - pos - 8} after it)")
        yield cid, raw[pos + 8 : end]
        pos = end + (size & 1)


def wav_format(raw: bytes, where: str) -> tuple[int, int, int, int]:
    """(format_tag, channels, sample_rate, bits) from the fmt chunk; the real tag for EXTENSIBLE."""
    if len(raw) < 12 or raw[:4] != b"RIFF" or raw[8:12] != b"WAVE":
        raise EdgecError(f"{where}: not a WAV file (no RIFF/WAVE header)")
    for cid, body in _chunks(raw, where):
        if cid == b"fmt ":
            if len(body) < 16:
                raise EdgecError(f"{where}: malformed WAV (fmt chunk of {len(body)} bytes)")
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            if tag == 0xFFFE and len(body) >= 26:
                (tag,) = struct.unpack("<H", body[24:26])  # first two bytes of the sub-format GUID
            return tag, channels, rate, bits
    raise EdgecError(f"{where}: malformed WAV (no fmt chunk)")


def decode_wav(raw: bytes, where: str, sample_rate: int) -> torch.Tensor:
    """Mono float64 waveform in [-1, 1] from the bytes of a 16-bit PCM WAV at `sample_rate`. The chunks are
    parsed here (not by the wave module, which seeks wherever a corrupt size points)."""
    tag, channels, rate, bits = wav_format(raw, where)
    if tag != 1 or bits != 16:
        name = FORMAT_TAGS.get(tag, f"format tag {tag}")
        raise EdgecError(f"{where}: not 16-bit PCM (found {name}, {bits}-bit); convert it to 16-bit PCM WAV")
    if rate != sample_rate:
        raise EdgecError(f"{where}: sample rate {rate} Hz, expected {sample_rate} Hz; resample the file or pass sample_rate={rate}")
    if channels < 1:
        raise EdgecError(f"{where}: WAV declares {channels} channels")
    data = next((body for cid, body in _chunks(raw, where) if cid == b"data"), b"")
    usable = len(data) // (2 * channels) * (2 * channels)
    if usable == 0:
        raise EdgecError(f"{where}: WAV has no audio samples")
    pcm = np.frombuffer(data[:usable], dtype="<i2").astype(np.float64).reshape(-1, channels).mean(axis=1)
    return torch.from_numpy(pcm / 32768.0)


# --------------------------------------------------------------------------------------------- CSV
class Row:
    __slots__ = ("line", "path", "label", "split", "speaker", "file", "sha")

    def __init__(self, line, path, label, split, speaker):
        self.line, self.path, self.label, self.split, self.speaker = line, path, label, split, speaker
        self.file = ""
        self.sha = ""


def read_labels(csv_path: str) -> tuple[list[Row], tuple[str, ...], bytes]:
    with open(csv_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgecError(f"{csv_path}: not UTF-8 text ({e})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)
        if header is None:
            raise EdgecError(f"{csv_path}: empty file (expected a header: path,label[,split][,speaker])")
        cols = tuple(c.strip().lower() for c in header)
        bad = [c for c in cols if c not in ("path",) + TARGET_COLUMNS + OPTIONAL_COLUMNS]
        dup = sorted({c for c in cols if cols.count(c) > 1})
        missing = [c for c in ("path",) if c not in cols]
        targets = [c for c in TARGET_COLUMNS if c in cols]
        if bad or dup or missing or len(targets) != 1:
            why = (
                f"unknown column '{bad[0]}'" if bad else f"duplicate column '{dup[0]}'" if dup
                else f"missing column '{missing[0]}'" if missing else "both 'label' and 'value'" if targets
                else "missing column 'label' (or 'value' for regression)"
            )
            raise EdgecError(
                f"{csv_path}: row {reader.line_num}: malformed header '{','.join(header)}' ({why}; expected "
                f"path,label[,split][,speaker] or path,value[,split][,speaker])"
            )
        target = targets[0]
        rows = []
        for rec in reader:
            line = reader.line_num
            if not any(c.strip() for c in rec):
                continue
            if len(rec) != len(cols):
                raise EdgecError(f"{csv_path}: row {line}: expected {len(cols)} fields ({','.join(cols)}), found {len(rec)}")
            d = {c: v.strip() for c, v in zip(cols, rec)}
            if not d["path"]:
                raise EdgecError(f"{csv_path}: row {line}: empty path")
            if not d[target]:
                raise EdgecError(f"{csv_path}: row {line}: empty {target}")
            label = d[target] if target == "label" else _number(d[target], csv_path, line)
            split = "train"
            if "split" in d:
                split = SPLIT_ALIASES.get(d["split"].lower())
                if split is None:
                    raise EdgecError(f"{csv_path}: row {line}: unknown split '{d['split']}' (expected train, val or test)")
            speaker = None
            if "speaker" in d:
                speaker = d["speaker"]
                if not speaker:
                    raise EdgecError(f"{csv_path}: row {line}: empty speaker")
            rows.append(Row(line, d["path"], label, split, speaker))
    except csv.Error as e:
        raise EdgecError(f"{csv_path}: row {reader.line_num}: malformed CSV ({e})") from None
    if not rows:
        raise EdgecError(f"{csv_path}: no data rows after the header")
    return rows, cols, raw


def _number(text: str, csv_path: str, line: int) -> float:
    """A regression target: a finite decimal number."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not np.isfinite(value):
        raise EdgecError(f"{csv_path}: row {line}: value '{text}' is not a finite number (a 'value' column holds "
                         f"regression targets)")
    return value


# --------------------------------------------------------------------------------------------- load
def _assign_val(rows: list[Row], has_speaker: bool, val_fraction: float, seed: int) -> str | None:
    """Moves part of train to val when the csv has no val rows; returns a note, or None."""
    if any(r.split == "val" for r in rows) or val_fraction <= 0:
        return None
    train = [r for r in rows if r.split == "train"]
    speakers = sorted({r.speaker for r in train}) if has_speaker else []
    if len(speakers) >= 2:
        tr, va = random_split_indices(len(speakers), val_fraction, seed)
        held = {speakers[i] for i in va}
        for r in train:
            if r.speaker in held:
                r.split = "val"
        return f"val: {len(held)} of {len(speakers)} train speakers held out (speaker-disjoint, seed {seed})"
    tr, va = random_split_indices(len(train), val_fraction, seed)
    for i in va:
        train[i].split = "val"
    why = "only one speaker" if has_speaker else "no speaker column"
    return f"val: random {val_fraction:g} of train rows ({why}, seed {seed})" if va else None


def _speaker_note(rows: list[Row]) -> str:
    spk = {s: {r.speaker for r in rows if r.split == s} for s in ("train", "val", "test")}
    counts = ", ".join(f"{s} {len(v)}" for s, v in spk.items() if v)
    shared = []
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        n = len(spk[a] & spk[b])
        if n:
            shared.append(f"{a}/{b} share {n}")
    return f"speakers: {counts} ({'; '.join(shared) if shared else 'disjoint'})"


def _load_cache(path: str, n: int, frames: int, n_mels: int) -> torch.Tensor | None:
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
        feats = obj["features"]
        if isinstance(feats, torch.Tensor) and tuple(feats.shape) == (n, frames, n_mels) and feats.dtype == torch.float32:
            return feats
    except Exception:
        pass
    return None  # absent or unusable: recompute


def _save_cache(path: str, feats: torch.Tensor, params: dict) -> None:
    atomic_write(path, serialize({"features": feats, "params": params}))


def _check_options(folder: str, csv_path: str, sample_rate: int, n_mels: int, frames: int, normalize: str) -> None:
    if not os.path.isdir(folder):
        raise EdgecError(f"{folder}: no such data folder")
    if not os.path.isfile(csv_path):
        raise EdgecError(f"{csv_path}: not found (an audio data folder needs labels.csv with path,label[,split][,speaker])")
    if normalize not in F.NORMALIZE_CHOICES:
        raise EdgecError(f"normalize must be one of {', '.join(F.NORMALIZE_CHOICES)}, not '{normalize}'")
    if sample_rate <= 0 or n_mels <= 0 or frames <= 0:
        raise EdgecError(f"sample_rate, n_mels and frames must be positive (got {sample_rate}, {n_mels}, {frames})")


def _locate_wavs(rows: list[Row], folder: str, csv_path: str) -> None:
    """Each row's wav file path and content hash."""
    for r in rows:
        r.file = os.path.normpath(os.path.join(folder, r.path))
        if not os.path.isfile(r.file):
            raise EdgecError(f"{csv_path}: row {r.line}: wav file '{r.path}' not found ({r.file})")
        r.sha = sha256_file(r.file)


def _train_classes(rows: list[Row], csv_path: str) -> list[str]:
    if not any(r.split == "train" for r in rows):
        raise EdgecError(f"{csv_path}: no train rows (the split column marks none as train)")
    classes = sorted({r.label for r in rows if r.split == "train"})
    for r in rows:
        if r.label not in classes:
            raise EdgecError(
                f"{csv_path}: row {r.line}: label '{r.label}' ({r.split}) is not among the train labels ({', '.join(classes)})"
            )
    return classes


def _digests(rows: list[Row], params: dict, csv_raw: bytes, val_fraction: float, seed: int) -> tuple[str, str]:
    """``(features digest, data digest)``: the features by their parameters and every wav's path and hash;
    the data by those, the csv bytes and the val split options."""
    fh = hashlib.sha256()
    fh.update(b"edgec-data/audio-features/v1\0")
    fh.update(json.dumps(params, sort_keys=True).encode())
    for r in rows:
        fh.update(f"\0{r.path}\0{r.sha}".encode())
    features_digest = fh.hexdigest()
    dh = hashlib.sha256()
    dh.update(b"edgec-data/audio/v1\0")
    dh.update(features_digest.encode())
    dh.update(csv_raw)
    dh.update(json.dumps({"val_fraction": val_fraction, "seed": seed}).encode())
    return features_digest, dh.hexdigest()


def _compute_features(rows: list[Row], sample_rate: int, n_mels: int, frames: int, normalize: str) -> torch.Tensor:
    out = torch.empty((len(rows), frames, n_mels), dtype=torch.float32)
    # Small per-utterance ops: one intra-op thread is 10-100x faster than several on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, r in enumerate(rows):
            with open(r.file, "rb") as f:
                raw = f.read()
            where = f"{r.file} ({LABELS_CSV} row {r.line})"
            wave_t = decode_wav(raw, where, sample_rate)
            out[i] = F.compute_features(wave_t, sample_rate, n_mels, frames, normalize)
    finally:
        torch.set_num_threads(threads)
    return out


def _cached_features(rows: list[Row], cache_dir: str, cache_path: str, params: dict, sample_rate: int, n_mels: int,
                     frames: int, normalize: str, notes: list[str]) -> tuple[torch.Tensor, bool]:
    """The features from the cache, or computed and cached; ``(features, from_cache)``."""
    feats = _load_cache(cache_path, len(rows), frames, n_mels)
    if feats is not None:
        return feats, True
    feats = _compute_features(rows, sample_rate, n_mels, frames, normalize)
    try:
        _save_cache(cache_path, feats, params)
    except OSError as e:
        notes.append(f"feature cache not written ({cache_dir}: {e.strerror or e})")
    return feats, False


def _splits(rows: list[Row], classes: list[str] | None, feats: torch.Tensor, csv_path: str) -> dict:
    """Per split the features and targets: class ids (int64), or the ``value`` column (float32) when
    ``classes`` is None."""
    if classes is None:
        targets = torch.tensor([r.label for r in rows], dtype=torch.float64).to(torch.float32)
    else:
        index = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([index[r.label] for r in rows], dtype=torch.int64)
    splits = {}
    for s in ("train", "val", "test"):
        idx = [i for i, r in enumerate(rows) if r.split == s]
        if idx:
            t = torch.tensor(idx, dtype=torch.int64)
            splits[s] = TensorPairDataset(feats[t], targets[t])
    if "train" not in splits:
        raise EdgecError(f"{csv_path}: the train split is empty after holding out val (lower val_fraction)")
    return splits


def _value_stats(values: list[float]) -> dict:
    """n, mean, std (population), min and max of one split's regression targets."""
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
            "max": float(v.max())}


def load_audio_folder(
    folder: str,
    *,
    sample_rate: int = 16000,
    n_mels: int = 40,
    frames: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
    normalize: str = "utterance",
    csv_name: str = LABELS_CSV,
) -> DataBundle:
    """The bundle of ``<folder>/<csv_name>``: classification with a ``label`` column, regression (float32
    targets, ``task`` "regression") with a ``value`` column."""
    csv_path = os.path.join(folder, csv_name)
    _check_options(folder, csv_path, sample_rate, n_mels, frames, normalize)
    rows, cols, csv_raw = read_labels(csv_path)
    has_speaker = "speaker" in cols
    regression = "value" in cols
    _locate_wavs(rows, folder, csv_path)
    classes = None if regression else _train_classes(rows, csv_path)
    notes = []
    note = _assign_val(rows, has_speaker, val_fraction, seed)
    if note:
        notes.append(note)
    if has_speaker:
        notes.append(_speaker_note(rows))

    params = F.feature_params(sample_rate, n_mels, frames, normalize)
    features_digest, digest = _digests(rows, params, csv_raw, val_fraction, seed)
    cache_dir = cache_dir or default_cache_dir()
    cache_path = os.path.join(cache_dir, f"{features_digest}.pt")
    feats, from_cache = _cached_features(rows, cache_dir, cache_path, params, sample_rate, n_mels, frames, normalize,
                                         notes)
    splits = _splits(rows, classes, feats, csv_path)
    notes.append(f"features: log-mel {n_mels} x {frames} frames @ {sample_rate} Hz, normalize={normalize}"
                 f" ({'cache hit' if from_cache else 'computed'})")
    if regression:
        targets = {"target_dim": 1, "value_stats": {s: _value_stats([r.label for r in rows if r.split == s])
                                                    for s in splits}}
    else:
        counts = {s: dict.fromkeys(classes, 0) for s in splits}
        for r in rows:
            counts[r.split][r.label] += 1
        targets = {"class_counts": counts}
    return DataBundle(
        task="regression" if regression else "classification",
        classes=classes,
        num_classes=None if regression else len(classes),
        splits=splits,
        digest=digest,
        source=folder if csv_name == LABELS_CSV else csv_path,
        kind="audio folder",
        meta={
            "features": params,
            "features_digest": features_digest,
            "cache_path": cache_path,
            "from_cache": from_cache,
            **targets,
            "speakers": {s: sorted({r.speaker for r in rows if r.split == s}) for s in splits} if has_speaker else None,
            "paths": {s: [r.path for r in rows if r.split == s] for s in splits},
            "notes": notes,
        },
    )
