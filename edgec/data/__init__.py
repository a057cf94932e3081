"""Dataset readers: tensor files, wav + labels.csv folders, text folders, detection folders, Python entry points.

    bundle = load_data("train/")                       # audio folder with labels.csv
    bundle = load_data("digits.npz")                   # .pt / .npz / .safetensors
    bundle = load_data("corpus/", block_size=128)      # train.txt [val.txt test.txt] + tokenizer.json
    bundle = load_data("tokens.safetensors")           # token ids: input_ids_train [input_ids_val ...]
    bundle = load_data("shapes/", image_size=128)      # train.json [val.json test.json] (COCO) + images
    bundle = load_data("mypkg.data:make_datasets")     # Python entry point
    loader = DataLoader(bundle.split("train"), batch_size=32, shuffle=True)  # default collate stacks

Items are ``(input_tensor, target)``: int64 scalar targets for classification, float32 for regression, and
for causal LMs (task "causal_lm", edgec.data.text) int64 [T] token ids and the next tokens; for detection
(task "detection", edgec.data.detection) float32 [3, S, S] images and [M, 5] (class, cx, cy, w, h) rows.
All problems raise ``EdgecError`` with one line naming the file (and the csv row).
"""
from __future__ import annotations

import os

from edgec.core.errors import EdgecError
from edgec.data.audio import load_audio_folder
from edgec.data.bundle import MAX_CLASSES, SPLIT_NAMES, DataBundle, TensorPairDataset, check_fits
from edgec.data.detection import is_detection_folder, load_detection_folder
from edgec.data.entrypoint import is_entry_point, load_entry_point
from edgec.data.features import compute_features, feature_params, log_mel
from edgec.data.tensors import TENSOR_SUFFIXES, load_tensor_file, read_tensor_file
from edgec.data.text import TEXT_FILES, is_text_folder, is_token_data, load_text_folder, load_token_file, max_sequence

__all__ = [
    "DataBundle",
    "MAX_CLASSES",
    "SPLIT_NAMES",
    "TensorPairDataset",
    "check_fits",
    "compute_features",
    "feature_params",
    "load_data",
    "log_mel",
    "max_sequence",
    "source_kind",
]


def source_kind(source: str) -> str:
    """"audio" | "text" | "detection" | "tensors" | "entry" for a source string (raises EdgecError if it names
    nothing). A folder (or its file) with labels.csv is audio, one with train.txt and no labels.csv text, one with
    train.json and no labels.csv detection (COCO json); a tensor file may
    hold classification/regression tensors or token ids (decided by its keys when loaded). Any ``.csv`` file is an
    audio csv (wav paths relative to its folder; ``label`` or ``value`` column)."""
    src = os.fspath(source)
    if os.path.isdir(src):
        if is_detection_folder(src):
            return "detection"
        return "text" if is_text_folder(src) else "audio"
    if os.path.isfile(src):
        if os.path.basename(src) == "labels.csv" or src.lower().endswith(".csv"):
            return "audio"
        if os.path.basename(src) == TEXT_FILES["train"] and is_text_folder(os.path.dirname(src) or "."):
            return "text"
        if os.path.basename(src) in ("train.json", "val.json", "test.json") and is_detection_folder(
                os.path.dirname(src) or "."):
            return "detection"
        if src.lower().endswith(TENSOR_SUFFIXES):
            return "tensors"
        raise EdgecError(
            f"{src}: unknown data file type (expected a folder with labels.csv, {', '.join(TENSOR_SUFFIXES)}, or package.module:function)"
        )
    if is_entry_point(src):
        return "entry"
    if src.lower().endswith(TENSOR_SUFFIXES):
        raise EdgecError(f"{src}: no such data file")
    raise EdgecError(f"{src}: no such data folder or file (expected a folder with labels.csv, a tensor file, or package.module:function)")


def load_data(
    source: str,
    *,
    sample_rate: int = 16000,
    n_mels: int = 40,
    frames: int = 200,
    val_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
    normalize: str = "utterance",
    block_size: int | None = None,
    max_block_size: int | None = None,
    image_size: int | None = None,
) -> DataBundle:
    """Load a dataset from a folder (labels.csv + wavs, or train.txt + tokenizer.json), a tensor file, or
    `package.module:function`.

    sample_rate/n_mels/frames/normalize apply to audio folders only, cache_dir to audio and text folders;
    val_fraction and seed decide the val split when the source has none (speaker-disjoint for audio with
    speakers; the contiguous tail of the train stream for text). block_size (tokens per causal-LM item; None:
    128, at most max_block_size, the model's longest sequence when the caller knows it) applies to text only.
    image_size (S: images are resized to S x S; None: 128, the model's when the caller knows it) applies to
    detection folders only.
    """
    source = os.fspath(source)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise EdgecError(f"val_fraction must be in [0, 1), got {val_fraction}")
    kind = source_kind(source)
    if kind == "audio":
        # a csv file names its wavs relative to its folder: labels.csv (classes), or any csv with a value column
        is_file = os.path.isfile(source)
        folder = (os.path.dirname(source) or ".") if is_file else source
        return load_audio_folder(
            folder,
            sample_rate=sample_rate,
            n_mels=n_mels,
            frames=frames,
            val_fraction=val_fraction,
            seed=seed,
            cache_dir=cache_dir,
            normalize=normalize,
            **({"csv_name": os.path.basename(source)} if is_file else {}),
        )
    if kind == "text":
        folder = (os.path.dirname(source) or ".") if os.path.isfile(source) else source
        return load_text_folder(folder, block_size=block_size, max_block_size=max_block_size,
                                val_fraction=val_fraction, cache_dir=cache_dir)
    if kind == "detection":
        folder = (os.path.dirname(source) or ".") if os.path.isfile(source) else source
        return load_detection_folder(folder, image_size=image_size, val_fraction=val_fraction, seed=seed,
                                     cache_dir=cache_dir)
    if kind == "tensors":
        loaded = read_tensor_file(source)
        if is_token_data(loaded[0]):
            return load_token_file(source, block_size=block_size, max_block_size=max_block_size,
                                   val_fraction=val_fraction, loaded=loaded)
        return load_tensor_file(source, val_fraction=val_fraction, seed=seed, loaded=loaded)
    return load_entry_point(source, val_fraction=val_fraction, seed=seed)
