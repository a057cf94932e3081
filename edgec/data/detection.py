"""Object-detection folders: COCO json per split plus the image files (PNG/JPEG, read with Pillow).

    folder/train.json  [val.json]  [test.json]     images, annotations, categories (COCO)
    folder/<file_name>                             each image's file_name, relative to the folder

A folder holding ``train.json`` (and no ``labels.csv``) is a detection folder. Per split json: ``images``
(``id``, ``file_name``, ``width``, ``height``), ``annotations`` (``image_id``, ``category_id``, ``bbox``
``[x, y, w, h]`` in pixels; ``iscrowd: 1`` ones are left out, with a note) and ``categories`` (``id``,
``name``; every split lists the same ones). Class index = position of the category in id order.

Items: ``x`` float32 [3, S, S] in [0, 1], the image (converted to RGB) resized to S x S (Pillow bilinear,
deterministic); ``y`` float32 [M, 5] rows ``(class, cx, cy, w, h)`` normalised by the image's width and
height (resizing does not change them), padded with rows of class -1 to ``M = meta["max_objects"]``, the most
objects in any image of any split, so the default collate stacks items. Without ``val.json`` a ``val_fraction``
of the train images is held out (seeded). Decoded images are kept in memory as uint8 (3·S² bytes per image)
and cached on disk under ``cache_dir`` keyed by the digest. Every problem is one ``EdgecError`` line naming
the file (and the image or annotation).
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os

import numpy as np
import torch
from torch.utils.data import Dataset

from edgec.core.errors import EdgecError
from edgec.core.fileio import atomic_save
from edgec.data.bundle import SPLIT_NAMES, DataBundle, random_split_indices

SPLIT_FILES = {"train": "train.json", "val": "val.json", "test": "test.json"}
DEFAULT_IMAGE_SIZE = 128
# bbox edges may pass the image border by this many pixels (rounding in other tools); they are clipped
BOX_TOLERANCE = 1.0
FORMAT_VERSION = 1  # of the decoded cache


def is_detection_folder(folder: str) -> bool:
    """A folder with train.json and no labels.csv."""
    return os.path.isfile(os.path.join(folder, SPLIT_FILES["train"])) and not os.path.isfile(
        os.path.join(folder, "labels.csv"))


class DetectionDataset(Dataset):
    """Items ``(image float32 [3, S, S] in [0, 1], targets float32 [M, 5])`` from uint8 images and padded
    target rows."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, file_names: list[str]):
        self.images = images  # uint8 [N, 3, S, S]
        self.targets = targets  # float32 [N, M, 5]
        self.file_names = file_names

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i):
        return self.images[i].to(torch.float32).div_(255.0), self.targets[i]


# ------------------------------------------------------------------------------------------ json checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise EdgecError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise EdgecError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise EdgecError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(doc, dict):
        raise EdgecError(f"{path}: expected a JSON object with images, annotations and categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise EdgecError(f"{path}: '{key}' must be a list (COCO detection format)")
    return doc


def _categories(doc: dict, path: str) -> list[tuple[int, str]]:
    cats = []
    for k, c in enumerate(doc["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise EdgecError(f"{path}: categories[{k}] needs an integer 'id' and a string 'name'")
        cats.append((c["id"], c["name"]))
    ids = [i for i, _ in cats]
    if len(set(ids)) != len(ids):
        raise EdgecError(f"{path}: category id {next(i for i in ids if ids.count(i) > 1)} is listed twice")
    if not cats:
        raise EdgecError(f"{path}: no categories")
    return sorted(cats)


def _image_entries(doc: dict, path: str, folder: str) -> list[dict]:
    out, seen = [], set()
    for k, im in enumerate(doc["images"]):
        where = f"{path}: images[{k}]"
        if not isinstance(im, dict) or not _is_int(im.get("id")) or not isinstance(im.get("file_name"), str):
            raise EdgecError(f"{where} needs an integer 'id' and a string 'file_name'")
        if im["id"] in seen:
            raise EdgecError(f"{where}: image id {im['id']} is listed twice")
        seen.add(im["id"])
        for key in ("width", "height"):
            if not _is_int(im.get(key)) or im[key] <= 0:
                raise EdgecError(f"{where} (id {im['id']}): '{key}' must be a positive integer")
        name = im["file_name"]
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
            raise EdgecError(f"{where} (id {im['id']}): file_name '{name}' must be relative to the folder, "
                             "without '..'")
        out.append({"id": im["id"], "file_name": name, "width": im["width"], "height": im["height"],
                    "path": os.path.join(folder, name)})
    return out


def _annotations(doc: dict, path: str, images: dict[int, dict], cat_index: dict[int, int],
                 notes: list) -> dict[int, list[list[float]]]:
    """{image id: [[class, cx, cy, w, h], ...]} in annotation order."""
    rows: dict[int, list[list[float]]] = {i: [] for i in images}
    crowd = 0
    for k, a in enumerate(doc["annotations"]):
        where = f"{path}: annotations[{k}]" + (f" (id {a['id']})" if isinstance(a, dict) and _is_int(a.get("id"))
                                               else "")
        if not isinstance(a, dict):
            raise EdgecError(f"{where} is not an object")
        if a.get("iscrowd") in (1, True):
            crowd += 1
            continue
        if not _is_int(a.get("image_id")) or a["image_id"] not in images:
            raise EdgecError(f"{where}: unknown image_id {a.get('image_id')!r}")
        if not _is_int(a.get("category_id")) or a["category_id"] not in cat_index:
            raise EdgecError(f"{where}: unknown category_id {a.get('category_id')!r} (categories: "
                             f"{', '.join(str(c) for c in cat_index)})")
        box = a.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_num(v) for v in box):
            raise EdgecError(f"{where}: bbox must be 4 finite numbers [x, y, w, h]")
        x, y, w, h = (float(v) for v in box)
        im = images[a["image_id"]]
        if w <= 0 or h <= 0:
            raise EdgecError(f"{where}: bbox {box} has a non-positive width or height")
        W, H = im["width"], im["height"]
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
            raise EdgecError(f"{where}: bbox {box} is outside its {W}x{H} image (id {im['id']})")
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(W)), min(y + h, float(H))
        if x1 <= x0 or y1 <= y0:
            raise EdgecError(f"{where}: bbox {box} has no area inside its {W}x{H} image (id {im['id']})")
        rows[a["image_id"]].append([float(cat_index[a["category_id"]]), (x0 + x1) / 2 / W, (y0 + y1) / 2 / H,
                                    (x1 - x0) / W, (y1 - y0) / H])
    if crowd:
        notes.append(f"{os.path.basename(path)}: {crowd} iscrowd annotation(s) left out")
    return rows


# ------------------------------------------------------------------------------------------ images
def _decode(entry: dict, size: int, path: str) -> np.ndarray:
    """uint8 [3, S, S]; the image's real size must match its json entry."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(entry["path"], "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise EdgecError(f"{entry['path']}: image file missing ({os.path.basename(path)} image id "
                         f"{entry['id']})") from None
    except OSError as exc:
        raise EdgecError(f"{entry['path']}: cannot read ({exc.strerror or exc})") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.size != (entry["width"], entry["height"]):
                raise EdgecError(f"{entry['path']}: the image is {img.size[0]}x{img.size[1]} but "
                                 f"{os.path.basename(path)} says {entry['width']}x{entry['height']} (id {entry['id']})")
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise EdgecError(f"{entry['path']}: not a readable image ({str(exc).splitlines()[0][:120]})") from None
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _file_digest(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except FileNotFoundError:
        raise EdgecError(f"{path}: image file missing ({what})") from None
    except OSError as exc:
        raise EdgecError(f"{path}: cannot read ({exc.strerror or exc})") from None


# ------------------------------------------------------------------------------------------ loader
def load_detection_folder(folder: str, *, image_size: int | None = None, val_fraction: float = 0.2, seed: int = 0,
                          cache_dir: str | None = None) -> DataBundle:
    """A COCO-json detection folder as a DataBundle (task "detection"); see the module docstring."""
    size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
    if not _is_int(size) or not 1 <= size <= 4096:
        raise EdgecError(f"image_size must be an integer in [1, 4096], got {image_size!r}")
    notes: list[str] = []
    parsed, categories = {}, None
    h = hashlib.sha256(f"edgec.detection/{FORMAT_VERSION} size={size}".encode())
    for split in SPLIT_NAMES:
        path = os.path.join(folder, SPLIT_FILES[split])
        if not os.path.isfile(path):
            continue
        doc = _read_json(path)
        cats = _categories(doc, path)
        if categories is None:
            categories = cats
        elif cats != categories:
            raise EdgecError(f"{path}: its categories differ from {SPLIT_FILES['train']}'s")
        entries = _image_entries(doc, path, folder)
        cat_index = {cid: k for k, (cid, _) in enumerate(categories)}
        rows = _annotations(doc, path, {e["id"]: e for e in entries}, cat_index, notes)
        with open(path, "rb") as f:
            h.update(split.encode() + hashlib.sha256(f.read()).digest())
        for e in entries:
            h.update(e["file_name"].encode() + _file_digest(e["path"], f"{SPLIT_FILES[split]} image id {e['id']}"))
        parsed[split] = (path, entries, rows)
    digest = h.hexdigest()
    max_objects = max([1] + [len(r) for _, _, rows in parsed.values() for r in rows.values()])

    cached = _read_cache(cache_dir, digest)
    splits, names = {}, {}
    for split, (path, entries, rows) in parsed.items():
        if cached is not None and split in cached:
            images = cached[split]
        else:
            images = torch.from_numpy(np.stack([_decode(e, size, path) for e in entries])) if entries else \
                torch.zeros((0, 3, size, size), dtype=torch.uint8)
        targets = torch.full((len(entries), max_objects, 5), -1.0, dtype=torch.float32)
        targets[:, :, 1:] = 0.0
        for i, e in enumerate(entries):
            r = rows[e["id"]]
            if r:
                targets[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
        splits[split] = DetectionDataset(images, targets, [e["file_name"] for e in entries])
        names[split] = [e["file_name"] for e in entries]
    if cached is None and cache_dir is not None:
        _write_cache(cache_dir, digest, {k: v.images for k, v in splits.items()})
    if "val" not in splits and len(splits["train"]) >= 2 and val_fraction > 0:
        tr, va = random_split_indices(len(splits["train"]), val_fraction, seed)
        full = splits["train"]
        splits["train"] = DetectionDataset(full.images[tr], full.targets[tr], [full.file_names[i] for i in tr])
        splits["val"] = DetectionDataset(full.images[va], full.targets[va], [full.file_names[i] for i in va])
        notes.append(f"no {SPLIT_FILES['val']}: {len(va)} train images held out for val (seed {seed})")
        digest = hashlib.sha256(f"{digest} val_fraction={val_fraction} seed={seed}".encode()).hexdigest()
    classes = [name for _, name in categories]
    meta = {"max_objects": int(max_objects), "image_size": int(size),
            "categories": [{"id": int(i), "name": n} for i, n in categories], "notes": notes,
            "objects": {k: int((v.targets[:, :, 0] >= 0).sum()) for k, v in splits.items()}}
    return DataBundle(task="detection", classes=classes, num_classes=len(classes), splits=splits, digest=digest,
                      source=folder, kind="detection folder", meta=meta)


def _cache_path(cache_dir: str, digest: str) -> str:
    return os.path.join(cache_dir, "detection", f"{digest}.pt")


def _read_cache(cache_dir: str | None, digest: str) -> dict | None:
    if cache_dir is None:
        return None
    path = _cache_path(cache_dir, digest)
    if not os.path.isfile(path):
        return None
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) and v.dtype == torch.uint8
                                            for v in obj.values()):
        return None
    return obj


def _write_cache(cache_dir: str, digest: str, images: dict) -> None:
    path = _cache_path(cache_dir, digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save(path, dict(images))
