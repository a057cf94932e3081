"""Detection data: the synthetic shapes fixture (fixtures/make_detection.py) and the COCO-json folder reader
(edgec.data.detection): byte-identical generation, item shapes and values, one-line errors."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from edgec.core.errors import EdgecError
from edgec.data import load_data, source_kind

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]


def _make(out: Path, images: int = 12, seed: int = 0) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "fixtures" / "make_detection.py"), "--out", str(out),
                           "--images", str(images), "--seed", str(seed)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("det") / "shapes"
    _make(out)
    return out


def test_fixture_is_byte_identical_and_coco_shaped(shapes, tmp_path):
    again = tmp_path / "again"
    _make(again)
    assert _tree_digest(shapes) == _tree_digest(again)
    _make(again, seed=1)
    assert _tree_digest(shapes) != _tree_digest(again)
    counts = {}
    for split in ("train", "val", "test"):
        doc = json.loads((shapes / f"{split}.json").read_text())
        assert [c["name"] for c in doc["categories"]] == ["circle", "square", "triangle", "cross", "ring"]
        counts[split] = len(doc["images"])
        per_image = {im["id"]: 0 for im in doc["images"]}
        sizes = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
        for im in doc["images"]:
            assert 64 <= im["width"] <= 128 and 64 <= im["height"] <= 128
            with Image.open(shapes / im["file_name"]) as img:
                assert img.size == (im["width"], im["height"]) and img.mode == "RGB"
        for a in doc["annotations"]:
            x, y, w, h = a["bbox"]
            W, H = sizes[a["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= W and y + h <= H
            assert 1 <= a["category_id"] <= 5
            per_image[a["image_id"]] += 1
        assert all(1 <= n <= 6 for n in per_image.values())
    assert counts == {"train": 10, "val": 1, "test": 1}


def test_fixture_boxes_are_the_visible_extent_of_each_shape():
    sys.path.insert(0, str(ROOT / "fixtures"))
    try:
        import make_detection
    finally:
        sys.path.pop(0)
    occluded = 0
    for i in range(40):
        img, objects, owner = make_detection.make_image(0, i)
        assert set(np.unique(owner).tolist()) - {-1} == set(range(len(objects)))
        for k, (_cls, (x, y, w, h)) in enumerate(objects):
            inside = np.zeros_like(owner, dtype=bool)
            inside[y:y + h, x:x + w] = True
            visible = owner == k
            assert not (visible & ~inside).any()  # nothing of it shows outside its box
            # tight: the first and last row and column of the box each show some of the shape
            assert visible[y].any() and visible[y + h - 1].any() and visible[:, x].any() and visible[:, x + w - 1].any()
            assert visible.sum() >= 20
            occluded += any((owner[y:y + h, x:x + w] == j).any() for j in range(k + 1, len(objects)))
        img2, objects2, _ = make_detection.make_image(0, i)
        assert np.array_equal(img, img2) and objects == objects2
    assert occluded > 0  # some shapes are partly covered by later ones


def test_loader_items_shapes_and_targets(shapes):
    assert source_kind(str(shapes)) == "detection" and source_kind(str(shapes / "train.json")) == "detection"
    b = load_data(str(shapes), image_size=48)
    assert b.task == "detection" and b.classes == ["circle", "square", "triangle", "cross", "ring"]
    assert b.num_classes == 5 and b.output_dim == 5 and b.kind == "detection folder"
    assert b.meta["image_size"] == 48 and [c["id"] for c in b.meta["categories"]] == [1, 2, 3, 4, 5]
    doc = json.loads((shapes / "train.json").read_text())
    m = b.meta["max_objects"]
    assert m == max(sum(a["image_id"] == im["id"] for a in d["annotations"]) for s in ("train", "val", "test")
                    for d in [json.loads((shapes / f"{s}.json").read_text())] for im in d["images"])
    x, y = b.split("train")[0]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert y.shape == (m, 5) and y.dtype == torch.float32
    im = doc["images"][0]
    rows = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
    want = [[a["category_id"] - 1, (a["bbox"][0] + a["bbox"][2] / 2) / im["width"],
             (a["bbox"][1] + a["bbox"][3] / 2) / im["height"], a["bbox"][2] / im["width"],
             a["bbox"][3] / im["height"]] for a in rows]
    torch.testing.assert_close(y[: len(rows)], torch.tensor(want, dtype=torch.float32))
    assert (y[len(rows):, 0] == -1).all()
    # the image resized bilinearly, the same way every time
    with Image.open(shapes / im["file_name"]) as img:
        ref = np.asarray(img.convert("RGB").resize((48, 48), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy(ref.transpose(2, 0, 1).copy()))
    xb, yb = next(iter(DataLoader(b.split("train"), batch_size=4)))  # default collate stacks
    assert xb.shape == (4, 3, 48, 48) and yb.shape == (4, m, 5)
    again = load_data(str(shapes), image_size=48)
    assert again.digest == b.digest and torch.equal(again.split("test")[0][0], b.split("test")[0][0])
    assert load_data(str(shapes), image_size=32).digest != b.digest
    assert "detection, 5 classes" in b.describe()


def test_decoded_images_are_cached(shapes, tmp_path):
    b = load_data(str(shapes), image_size=40, cache_dir=str(tmp_path))
    files = list((tmp_path / "detection").glob("*.pt"))
    assert len(files) == 1
    c = load_data(str(shapes), image_size=40, cache_dir=str(tmp_path))
    assert torch.equal(b.split("train").images, c.split("train").images)


# ---------------------------------------------------------------------------------------------- errors
def _folder(tmp_path: Path, *, annotations=None, images=None, categories=None, val=True) -> Path:
    d = tmp_path / "data"
    (d / "img").mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate([(20, 10), (16, 16)]):
        Image.fromarray(np.full((h, w, 3), 40 * k, np.uint8)).save(d / "img" / f"{k}.png")
    doc = {"images": images if images is not None else [
               {"id": 1, "file_name": "img/0.png", "width": 20, "height": 10},
               {"id": 2, "file_name": "img/1.png", "width": 16, "height": 16}],
           "annotations": annotations if annotations is not None else [
               {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 1, 10, 5]},
               {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 16, 16]}],
           "categories": categories if categories is not None else [{"id": 7, "name": "b"}, {"id": 3, "name": "a"}]}
    (d / "train.json").write_text(json.dumps(doc))
    if val:
        (d / "val.json").write_text(json.dumps(doc))
    return d


def test_loader_reads_a_hand_made_folder(tmp_path):
    b = load_data(str(_folder(tmp_path)), image_size=8)
    assert b.classes == ["a", "b"]  # category id order: 3, 7
    y = b.split("train")[0][1]
    torch.testing.assert_close(y, torch.tensor([[1, 0.35, 0.35, 0.5, 0.5]]))
    assert b.split("val")[1][1][0].tolist() == [0, 0.5, 0.5, 1.0, 1.0]


def test_no_val_json_holds_out_train_images(tmp_path):
    b = load_data(str(_folder(tmp_path, val=False)), image_size=8, val_fraction=0.5)
    assert len(b.split("train")) == 1 and len(b.split("val")) == 1
    assert any("held out for val" in n for n in b.meta["notes"])


@pytest.mark.parametrize("kw, match", [
    (dict(annotations=[{"image_id": 9, "category_id": 3, "bbox": [0, 0, 1, 1]}]), r"annotations\[0\]: unknown image_id 9"),
    (dict(annotations=[{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]), r"unknown category_id 5"),
    (dict(annotations=[{"image_id": 1, "category_id": 3, "bbox": [15, 0, 10, 5]}]), r"outside its 20x10 image"),
    (dict(annotations=[{"image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5]}]), r"non-positive width or height"),
    (dict(annotations=[{"image_id": 1, "category_id": 3, "bbox": [1, 1, 5]}]), r"bbox must be 4 finite numbers"),
    (dict(images=[{"id": 1, "file_name": "img/nope.png", "width": 20, "height": 10}], annotations=[]),
     r"nope.png: image file missing \(train.json image id 1\)"),
    (dict(images=[{"id": 1, "file_name": "img/0.png", "width": 30, "height": 10}], annotations=[]),
     r"the image is 20x10 but train.json says 30x10"),
    (dict(images=[{"id": 1, "file_name": "../x.png", "width": 20, "height": 10}], annotations=[]), r"without '\.\.'"),
    (dict(categories=[{"id": 3}]), r"categories\[0\] needs an integer 'id' and a string 'name'"),
])
def test_loader_errors_are_one_line(tmp_path, kw, match):
    with pytest.raises(EdgecError, match=match) as exc:
        load_data(str(_folder(tmp_path, **kw)), image_size=8)
    assert "\n" not in str(exc.value)


def test_bad_json_and_unreadable_image_are_one_line(tmp_path):
    d = _folder(tmp_path)
    (d / "val.json").write_text('{"images": [}')
    with pytest.raises(EdgecError, match=r"val.json: not valid JSON \(line 1, column 13"):
        load_data(str(d), image_size=8)
    d = _folder(tmp_path)
    (d / "img" / "1.png").write_bytes(b"not a png")
    with pytest.raises(EdgecError, match=r"1.png: not a readable image"):
        load_data(str(d), image_size=8)
    with pytest.raises(EdgecError, match="image_size must be an integer"):
        load_data(str(_folder(tmp_path)), image_size=0)
