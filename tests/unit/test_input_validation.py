"""Bad values, paths and data files are one-line EdgecErrors (exit 2), found before any work: the option schema
(CLI and recipes), output paths, data files (.npz/.pt/.safetensors/WAV/entry points), configs, opsets, devices."""
import io
import json
import os
import pickle
import re
import stat
import struct
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gate_helpers import run_main

from edgec.app.params import check_values
from edgec.core.errors import EdgecError
from edgec.core.fileio import check_output, same_file
from edgec.core.options import (
    SEED_MAX,
    ExportOptions,
    FinetuneOptions,
    ProfileOptions,
    PruneOptions,
    ScaffoldBinaryOptions,
    ScaffoldTernaryOptions,
    ZooCreateOptions,
)

USER_MODELS = Path(__file__).resolve().parents[1] / "user_models"

# --- the option schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, values, message", [
    (ZooCreateOptions, {"seed": -1}, "'seed' must be greater than or equal to 0 (got -1)"),
    (ZooCreateOptions, {"seed": 2**64}, f"'seed' must be less than or equal to {SEED_MAX}"),
    (ZooCreateOptions, {"seed": 1.5}, "'seed' must be an integer (got 1.5)"),
    (ZooCreateOptions, {"seed": True}, "'seed' must be an integer (got True)"),
    (FinetuneOptions, {"device": "meta"}, "'device' must be auto, cpu, mps, cuda or cuda:N (got 'meta')"),
    (FinetuneOptions, {"device": "cuda:x"}, "'device' must be auto, cpu, mps, cuda or cuda:N"),
    (FinetuneOptions, {"epochs": "3"}, "'epochs' must be an integer (got '3')"),
    (FinetuneOptions, {"epochs": 0}, "'epochs' must be greater than or equal to 1"),
    (FinetuneOptions, {"warmup": 1.0}, "'warmup' must be less than 1"),
    (FinetuneOptions, {"lr": "fast"}, "'lr' must be a number (got 'fast')"),
    (FinetuneOptions, {"off_layers": [1]}, "'off_layers' must be a string or a list of strings (got [1])"),
    (ScaffoldTernaryOptions, {"method": "dtl"}, "'method' must be one of sttn, dlt (got 'dtl')"),
    (ScaffoldTernaryOptions, {"activations": "binary"}, "'activations' must be one of none, ternary"),
    (ScaffoldBinaryOptions, {"activations": "ternary"}, "'activations' must be one of none, binary"),
    (ExportOptions, {"opset": 17}, "'opset' must be greater than or equal to 18 (got 17)"),
    (ExportOptions, {"weights": "int4"}, "'weights' must be one of auto, fp32, int2 (got 'int4')"),
    (PruneOptions, {"pattern": "simd:1"}, "'pattern' must be channel or simd:N (N >= 2) (got 'simd:1')"),
    (PruneOptions, {"threads": 0}, "'threads' must be greater than or equal to 1"),
    (PruneOptions, {"latency_ratio": 1.5}, "'latency_ratio' must be less than or equal to 1"),
    (ProfileOptions, {"patterns": ["channel", "simd"]}, "'patterns' must be channel or simd:N"),
])
def test_schema_refuses_a_bad_value_naming_the_field(cls, values, message):
    with pytest.raises(EdgecError) as err:
        check_values(cls, values, where="r.toml: step 1")
    assert str(err.value) == f"r.toml: step 1: {message}" or str(err.value).startswith(f"r.toml: step 1: {message}")


@pytest.mark.parametrize("cls, values", [
    (ZooCreateOptions, {"seed": SEED_MAX, "set": {"num_classes": 3}}),
    (FinetuneOptions, {"device": "cuda:1", "lr": 1, "off_layers": "blocks.*", "epochs": 2}),
    (PruneOptions, {"pattern": "SIMD:8", "latency_ratio": 1, "min_density": None}),
    (ProfileOptions, {"patterns": "channel"}),
    (ExportOptions, {"opset": 25, "weights": "int2", "forms": "dq"}),
])
def test_schema_accepts_good_values(cls, values):
    check_values(cls, values)


def test_schema_on_the_cli_names_the_option():
    from edgec.app.params import from_cli

    with pytest.raises(EdgecError, match=r"^--device must be auto, cpu, mps, cuda or cuda:N \(got 'meta'\)$"):
        values = {f: getattr(FinetuneOptions(data="d"), f) for f in FinetuneOptions.__dataclass_fields__}
        from_cli(FinetuneOptions, values | {"device": "meta", "data": "d", "off_layers": None}, dict)


# --- output paths ----------------------------------------------------------------------------------------

def test_output_guards(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = {
        tmp_path / "folder": "is a directory",
        fifo: "exists and is not a regular file",
        "/dev/null": "exists and is not a regular file",
        src / "x.onnx": "in.pt is a file, not a folder",
        src / "a" / "b" / "x.onnx": "in.pt is a file, not a folder",
        tmp_path / "sub" / ".." / "in.pt": "refusing to overwrite the input",
        "": "the output path is empty",
    }
    for out, message in cases.items():
        with pytest.raises(EdgecError, match=message):
            check_output(out, src)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # left alone
    with pytest.raises(EdgecError, match="is also the output; give each output its own path"):
        check_output(tmp_path / "x.pt", src, others={"the output": tmp_path / "." / "x.pt"})
    assert check_output(tmp_path / "new" / "deeper" / "x.pt", src) == tmp_path / "new" / "deeper" / "x.pt"
    link = tmp_path / "link.pt"
    link.symlink_to(src)
    assert same_file(link, src) and not same_file(tmp_path / "y.pt", src)


def test_finetune_refuses_the_resume_file_as_output_before_any_work(tmp_path):
    from edgec.train.job import finetune_file

    out = tmp_path / "X.pt"
    start = time.perf_counter()
    with pytest.raises(EdgecError, match="X.pt is also the output"):
        finetune_file(tmp_path / "missing.pt", out, FinetuneOptions(data="d.npz", resume_file=str(out)))
    assert time.perf_counter() - start < 1 and not out.exists()


@pytest.mark.parametrize("device, ok", [("cpu", True), (None, True), ("auto", True), ("meta", False),
                                        ("foo", False), ("cuda:x", False)])
def test_training_device(device, ok):
    from edgec.train.job import check_device

    if ok:
        check_device(device)
    else:
        with pytest.raises(EdgecError, match="device must be auto, cpu, mps, cuda or cuda:N"):
            check_device(device)


# --- data files ----------------------------------------------------------------------------------------

X = np.random.default_rng(0).standard_normal((12, 1, 8, 8)).astype(np.float32)


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _load(path):
    from edgec.data import load_data

    return load_data(str(path))


def test_npz_members_must_be_arrays(tmp_path):
    for name, members in {"extra.npz": {"evil.pkl": pickle.dumps([1, 2])},
                          "targets.npz": {"targets.npy": pickle.dumps(np.arange(12))}}.items():
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("inputs.npy", _npy(X))
            if "targets.npy" not in members:
                z.writestr("targets.npy", _npy(np.arange(12) % 3))
            for member, data in members.items():
                z.writestr(member, data)
        with pytest.raises(EdgecError, match=r"is not a \.npy array \(a pickle or other bytes\)"):
            _load(path)
    np.savez(tmp_path / "obj.npz", inputs=X, targets=np.array([object()] * 12, dtype=object))
    with pytest.raises(EdgecError, match="refused to load an unsafe pickled"):
        _load(tmp_path / "obj.npz")


def test_unsigned_and_huge_targets(tmp_path):
    np.savez(tmp_path / "u64.npz", inputs=X, targets=(np.arange(12) % 3).astype(np.uint64))
    bundle = _load(tmp_path / "u64.npz")
    assert bundle.num_classes == 3 and bundle.split("train")[0][1].dtype == torch.int64
    np.savez(tmp_path / "u64max.npz", inputs=X, targets=np.full(12, 2**64 - 1, dtype=np.uint64))
    with pytest.raises(EdgecError, match="beyond the int64 range"):
        _load(tmp_path / "u64max.npz")
    start = time.perf_counter()
    for value in (2**62, np.iinfo(np.int64).max):
        np.savez(tmp_path / "big.npz", inputs=X, targets=np.full(12, value, dtype=np.int64))
        with pytest.raises(EdgecError, match=f"class id {value} is not plausible"):
            _load(tmp_path / "big.npz")
    assert time.perf_counter() - start < 5  # refused, not a list of 2**62 class names


def test_sparse_and_meta_tensors(tmp_path):
    cases = {"sparse.pt": ({"inputs": torch.from_numpy(X).to_sparse(), "targets": torch.arange(12) % 3},
                           "'inputs' is a sparse_coo tensor"),
             "meta.pt": ({"inputs": torch.empty(12, 1, 8, 8, device="meta"), "targets": torch.arange(12) % 3},
                         "'inputs' is on device 'meta'"),
             "sparse_t.pt": ({"inputs": torch.from_numpy(X), "targets": (torch.arange(12) % 3).to_sparse()},
                             "'targets' is a sparse_coo tensor"),
             "giant.pt": ({"inputs": torch.zeros(1).expand(1 << 40, 1, 8, 8),  # 2 KB on disk, 2**48 bytes copied
                           "targets": torch.zeros(1, dtype=torch.long).expand(1 << 40)},
                          "'inputs' is a view of 70368744177664 elements over a storage of 1")}
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(EdgecError, match=message):
            _load(tmp_path / name)


def test_safetensors_header_must_be_an_object(tmp_path):
    header = b"[1, 2]"
    (tmp_path / "h.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(EdgecError, match="the safetensors header is not a JSON object"):
        _load(tmp_path / "h.safetensors")
    deep = b"[" * 5000 + b"]" * 5000
    (tmp_path / "d.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    with pytest.raises(EdgecError, match="nested"):
        _load(tmp_path / "d.safetensors")


def _wav(fmt_size: int | None = None, data_size: int | None = None, samples: int = 400) -> bytes:
    pcm = (np.sin(np.arange(samples) / 5) * 8000).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", fmt_size or len(fmt)) + fmt
            + b"data" + struct.pack("<I", data_size if data_size is not None else len(pcm)) + pcm)
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_chunk_sizes():
    from edgec.data.audio import decode_wav

    with pytest.raises(EdgecError, match=r"a.wav: malformed WAV \(its 'fmt ' chunk claims 4294967280 bytes"):
        decode_wav(_wav(fmt_size=0xFFFFFFF0), "a.wav", 16000)
    good = decode_wav(_wav(), "a.wav", 16000)
    streamed = decode_wav(_wav(data_size=0xFFFFFFFF), "a.wav", 16000)  # an open data size: what is there
    assert good.shape == (400,) and torch.equal(good, streamed)


def test_entry_points_that_are_not_data_functions(tmp_path, monkeypatch):
    (tmp_path / "h2_quits.py").write_text(
        "import sys\nimport torch\n"
        "def leave():\n    sys.exit(0)\n"
        "def sparse():\n    x = torch.ones(4, 3).to_sparse()\n"
        "    return {'train': torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))}\n")
    monkeypatch.chdir(tmp_path)
    cases = {"builtins:exit": "'exit' is a Quitter, not a function returning data",
             "builtins:input": "'input' is a builtin_function_or_method, not a function",
             "h2_quits:leave": "raised SystemExit",
             "h2_quits:sparse": "train item 0 input is a sparse_coo tensor"}
    for source, message in cases.items():
        with pytest.raises(EdgecError, match=message):
            _load(source)
    sys.modules.pop("h2_quits", None)


def test_finetune_data_must_fit_the_model_like_eval():
    from edgec.core.spec import Dim, InputSpec, TensorSpec
    from edgec.data import check_fits
    from edgec.data.bundle import DataBundle, TensorPairDataset

    spec = InputSpec((TensorSpec("pixels", (Dim("batch", 2, 3), 1, Dim("height", 8, 11, 4, 512), 8)),))

    def bundle(shape, dtype=torch.float32):
        x = torch.zeros((4, *shape), dtype=dtype)
        return DataBundle("classification", ["a"], 1, {"train": TensorPairDataset(x, torch.zeros(4))}, "d",
                          source="d.npz")

    check_fits(bundle((1, 16, 8)), spec)
    for shape, message in {(1, 8, 9): r"axis 3: the data has 9, the model needs 8",
                           (1, 3, 8): r"axis 2 'height' must be in \[4, 512\], the data has 3",
                           (8, 8): "3 axes after the batch axis, the data has 2"}.items():
        with pytest.raises(EdgecError, match=message):
            check_fits(bundle(shape), spec, "the model (resnet)")
    tokens = InputSpec((TensorSpec("ids", (Dim("batch", 2, 3), Dim("t", 8, 9)), "int64"),))
    with pytest.raises(EdgecError, match="takes int64 token ids but the data items are float32"):
        check_fits(bundle((8,)), tokens)


# --- configs, opsets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, overrides, message", [
    ("conformer", {"num_layers": 0}, "config 'num_layers' is a size and must be >= 1 (got 0)"),
    ("conformer", {"num_layers": -1}, "config 'num_layers' is a size and must be >= 1 (got -1)"),
    ("resnet", {"num_classes": 0}, "config 'num_classes' is a size"),
    ("conformer", {"ffn_dim": 0}, "config 'ffn_dim' is a size"),
    ("resnet", {"in_channels": 0}, "config 'in_channels' is a size"),
    ("bert", {"vocab_size": 0}, "config 'vocab_size' is a size"),
    ("hafformer", {"depths": [1, 0, 1]}, "config 'depths' is a size"),
    (f"{USER_MODELS}/buffered.py:NormalizedMLP", {"hidden": 0}, "config 'hidden' is a size"),
])
def test_degenerate_sizes_are_refused(arch, overrides, message):
    from edgec.models.source import full_config

    with pytest.raises(EdgecError, match=re.escape(message)):
        full_config(arch, overrides)


def test_sizes_that_may_be_zero():
    from edgec.models.source import full_config

    assert full_config("bert", {"num_labels": 0})["num_labels"] == 0  # BertModel: no classifier head
    assert full_config("resnet", {"num_classes": 3})["num_classes"] == 3


def test_an_opset_edgec_does_not_write_is_an_error():
    import onnx

    from edgec.core.options import MIN_OPSET
    from edgec.onnx.export import check_opset, check_written_opset

    top = onnx.defs.onnx_opset_version()
    for bad in (-5, 0, 1, 17, top + 1, 999):
        with pytest.raises(EdgecError, match=f"opset {bad} is not one edgec writes: choose {MIN_OPSET}..{top}"):
            check_opset(bad)
    check_opset(MIN_OPSET)
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []),
                                   opset_imports=[onnx.helper.make_opsetid("", 18)])
    check_written_opset(proto, 18)
    with pytest.raises(EdgecError, match="opset 20 was requested but the exporter wrote opset 18"):
        check_written_opset(proto, 20)


# --- the CLI, in process ------------------------------------------------------------------------------------



@pytest.mark.parametrize("args, message", [
    (["zoo", "create", "resnet", "-o", "{tmp}/a.pt", "--seed", "99999999999999999999999"],
     "--seed must be less than or equal to"),
    (["zoo", "create", "resnet", "-o", "{tmp}/a.pt", "--set", "num_classes=0"],
     "resnet: config 'num_classes' is a size and must be >= 1 (got 0)"),
    (["finetune", "{tmp}/m.pt", "--data", "d.npz", "-o", "{tmp}/X.pt", "--resume-file", "{tmp}/X.pt"],
     "X.pt is also the output"),
    (["finetune", "{tmp}/m.pt", "--data", "d.npz", "-o", "{tmp}/X.pt", "--device", "meta"], "--device must be"),
    (["export", "{tmp}/m.pt", "--opset", "17"], "--opset must be greater than or equal to 18 (got 17)"),
    (["export", "{tmp}/m.pt", "-o", "/dev/null"], "exists and is not a regular file"),
])
def test_cli_values_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run_main(monkeypatch, capsys, *args, "--json")
    assert code == 2, err
    obj = json.loads(out)
    assert obj["kind"] == "input" and message in obj["error"] and "Traceback" not in err
    assert not (tmp_path / "X.pt").exists() and not (tmp_path / "a.pt").exists()


def test_finetune_refuses_data_eval_refuses(tmp_path, monkeypatch, capsys):
    from edgec.app import api

    api.zoo_create("resnet", tmp_path / "r.pt", ZooCreateOptions(set={"base_width": 4, "blocks_per_stage": [1] * 4}))
    np.savez(tmp_path / "small.npz", inputs=X[:, :, :3, :3], targets=np.arange(12) % 3)  # height 3 < the model's 4
    for command in (["finetune", tmp_path / "r.pt", "-o", tmp_path / "f.pt", "--epochs", "1"],
                    ["eval", tmp_path / "r.pt", "--no-latency"]):
        code, _, err = run_main(monkeypatch, capsys, *command, "--data", tmp_path / "small.npz")
        assert code == 2 and "axis 2 'height' must be in [4, 512]" in err and "data has 3" in err
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "f.pt.resume").exists()
