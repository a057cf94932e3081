"""``edgec prune`` on a detection checkpoint (issue 14): a tiny lwdetr prunes one-shot (no data) to a valid,
smaller graph whose outputs keep their shapes and whose verified export matches onnxruntime. Latency is measured
for real on a shared CPU, so the budget is generous (95 % of dense)."""
from __future__ import annotations

import pytest
import torch

from edgec.core.options import PruneOptions
from edgec.models.checkpoint import load_checkpoint, new_model, save_checkpoint
from edgec.prune.run import prune_file

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "global_blocks": [1],
        "out_indices": [1], "dim": 32, "decoder_layers": 1, "decoder_heads": 2, "decoder_ffn": 64,
        "num_queries": 8, "groups": 2}


def test_detection_checkpoint_prunes_to_a_smaller_valid_graph(tmp_path):
    dense = new_model("lwdetr", TINY, seed=0)
    save_checkpoint(dense, tmp_path / "det.pt")
    # what `edgec prune det.pt -o p.pt --latency-ratio 0.95 --margin 0.05 --max-retries 1 --no-search --json` runs,
    # on a two-point profiling grid to keep the test short
    options = PruneOptions(latency_ratio=0.95, margin=0.05, max_retries=1, search=False, densities=(1.0, 0.5))
    result = prune_file(tmp_path / "det.pt", tmp_path / "p.pt", options).to_dict()
    assert result["mode"] == "one-shot" and result["params"] < result["before"]["params"]
    assert any(d < 1 for d in result["densities"].values())
    skipped = {s["layer"]: s["reason"] for s in result["skipped"]}
    assert "merges a channel dim with a dynamic dim" in skipped["decoder.0.cross_attn.sampling_offsets"]
    pruned = load_checkpoint(tmp_path / "p.pt")
    assert sum(p.numel() for p in pruned.gm.parameters()) == result["params"]
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, boxes = pruned.gm(image)
        ref_logits, ref_boxes = dense.gm(image)
    assert logits.shape == ref_logits.shape and boxes.shape == ref_boxes.shape
    assert bool(((boxes >= 0) & (boxes <= 1)).all())


def test_prune_data_loads_a_detection_folder_at_the_models_image_size(tmp_path):
    """``--data DIR`` on a detection checkpoint resizes the folder's images to the model's input (was: the
    loader's default 128 px, which check_fits then refused)."""
    import subprocess
    import sys
    from pathlib import Path

    from edgec.prune import run as run_mod

    folder = tmp_path / "shapes"
    script = Path(__file__).resolve().parents[2] / "fixtures" / "make_detection.py"
    subprocess.run([sys.executable, str(script), "--out", str(folder), "--images", "12"], check=True,
                   capture_output=True)
    model = new_model("lwdetr", TINY, seed=0)
    bundle, _ = run_mod._load_bundle(PruneOptions(latency_ratio=0.9, data=folder), model)
    assert bundle.task == "detection" and bundle.meta["image_size"] == 32
    x, y = bundle.split("train")[0]
    assert tuple(x.shape) == (3, 32, 32) and y.shape[-1] == 5
