"""Model sources: architectures from user files and packages, configs from signatures, --input-shape, the
checkpoint forms PyTorch users have, the project file, and `edgec import torch`."""
import json
import textwrap

import pytest
import torch
from conftest import run_cli

from edgec.core.errors import EdgecError
from edgec.core.options import SourceOptions
from edgec.core.spec import Dim, build_spec, parse_input_shape, spec_from_dict, spec_to_dict
from edgec.models import full_config, resolve
from edgec.models.checkpoint import load_checkpoint, save_checkpoint
from edgec.models.source import parse_arch_config, stored_arch

NET = '''
import torch
from torch import nn
from helpers import block  # a sibling module: works without PYTHONPATH


class Net(nn.Module):
    def __init__(self, width=8, num_classes=10, kernel=(3, 3)):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = block(width)
        self.head = nn.Linear(width, num_classes)
        self.register_buffer("unused", torch.zeros(3))  # persistent, never used in forward
        self.register_buffer("scale", torch.ones(1), persistent=False)

    def forward(self, x):
        return self.head((self.body(self.stem(x)) * self.scale).mean((2, 3)))


class Needs(nn.Module):
    def __init__(self, n, m=2):
        super().__init__()
        self.lin = nn.Linear(n, m)

    def forward(self, x):
        return self.lin(x)


class Bad(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        if width < 1:
            raise ValueError("width must be positive")
'''
HELPERS = '''
from torch import nn


def block(c):
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
'''
X = ["x=1x3x16x16"]


@pytest.fixture
def user(tmp_path, monkeypatch):
    """tmp/src/net.py (+ helpers.py); the current directory is tmp/work (outside src, no PYTHONPATH)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "net.py").write_text(NET)
    (tmp_path / "src" / "helpers.py").write_text(HELPERS)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def _eager(user, **cfg):
    torch.manual_seed(0)
    module = resolve(str(user / "src" / "net.py") + ":Net")(**cfg).eval()
    with torch.no_grad():
        module.stem.weight.mul_(3)  # weights that differ from a fresh init
    return module


def _same_outputs(model, module):
    x = model.spec.sample(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.run(x)[0], module(*x), rtol=0, atol=0)


# --- architectures and configs -------------------------------------------------------------------

def test_file_arch_relative_to_cwd_without_pythonpath(user):
    cls = resolve("../src/net.py:Net")
    assert cls.__name__ == "Net" and resolve("../src/net.py:Net") is cls  # imported once
    assert full_config("../src/net.py:Net") == {"width": 8, "num_classes": 10}  # the tuple default is left out
    assert full_config("../src/net.py:Net", {"width": 4})["width"] == 4
    assert stored_arch("../src/net.py:Net") == "net.py:Net"  # outside the current directory: no path at all
    assert stored_arch(str(user / "src" / "net.py") + ":Net", base="/elsewhere") == "net.py:Net"


def test_stored_arch_is_relative_inside_cwd(user, monkeypatch):
    monkeypatch.chdir(user)
    assert stored_arch(str(user / "src" / "net.py") + ":Net") == "src/net.py:Net"


def test_package_module_arch(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_sources_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("from torch import nn\nclass Tiny(nn.Linear):\n"
                                "    def __init__(self, n=4):\n        super().__init__(n, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert resolve("mypkg_sources_test.mod:Tiny").__name__ == "Tiny"
    assert full_config("mypkg_sources_test.mod:Tiny") == {"n": 4}
    with pytest.raises(EdgecError, match="no class 'Nope' in mypkg_sources_test.mod; classes there: Tiny"):
        resolve("mypkg_sources_test.mod:Nope")
    with pytest.raises(EdgecError, match="cannot import architecture 'nosuchpkg_x.mod:A'"):
        resolve("nosuchpkg_x.mod:A")


def test_config_errors(user):
    with pytest.raises(EdgecError, match=r"'depth' is not a config key of \.\./src/net.py:Net; keys: kernel, "
                                         r"num_classes, width"):
        full_config("../src/net.py:Net", {"depth": 2})
    with pytest.raises(EdgecError) as err:
        full_config("../src/net.py:Needs")
    assert str(err.value) == ("../src/net.py:Needs: constructor argument(s) n have no default; "
                              "pass --arch-config '{\"n\": ...}'")
    assert full_config("../src/net.py:Needs", {"n": 5}) == {"m": 2, "n": 5}
    with pytest.raises(EdgecError, match="no such file net2.py"):
        resolve("../src/net2.py:Net")
    opts = SourceOptions(arch="../src/net.py:Bad", arch_config='{"width": 0.5}', input_shape=X)  # 0: a size edgec refuses first
    torch.save({"w": torch.zeros(1)}, user / "work" / "w.pt")
    with pytest.raises(EdgecError, match=r"Bad: invalid config \(width must be positive\)"):
        load_checkpoint(user / "work" / "w.pt", opts)


def test_arch_config_forms(tmp_path):
    (tmp_path / "c.json").write_text('{"width": 3}')
    assert parse_arch_config(str(tmp_path / "c.json")) == {"width": 3}
    assert parse_arch_config(' {"a": [1, 2]}') == {"a": [1, 2]}
    assert parse_arch_config({"a": 1}) == {"a": 1}
    with pytest.raises(EdgecError, match="not valid JSON"):
        parse_arch_config("{width: 3}")
    with pytest.raises(EdgecError, match="neither JSON"):
        parse_arch_config("nofile.json")


def test_import_error_names_file_and_line(user):
    (user / "src" / "broken.py").write_text("import torch\n\nraise RuntimeError('boom')\n")
    with pytest.raises(EdgecError, match=r"importing broken.py:3 for architecture .* RuntimeError: boom"):
        resolve("../src/broken.py:X")


# --- input shapes and specs ----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("x=1x3x32x32", ("x", (1, 3, 32, 32), "float32")),
    ("idx=1xT=64:int64", ("idx", (1, ("T", 64)), "int64")),
    ("Bx3x32x32", (None, ("B", 3, 32, 32), "float32")),
    ("mask=1,max_len=8:bool", ("mask", (1, ("max_len", 8)), "bool")),
    ("feats=2×200×40:float", ("feats", (2, 200, 40), "float32")),
])
def test_parse_input_shape(text, expected):
    assert parse_input_shape(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("x=1x0x3", "sizes must be >= 1"), ("x=1x3:float16", "unknown dtype 'float16'"),
    ("x=", "empty dimension"), ("x=1xT=abc", "bad dimension 'T=abc'"), ("x=1x-3", "bad dimension '-3'"),
])
def test_parse_input_shape_errors(text, fragment):
    with pytest.raises(EdgecError, match=fragment):
        parse_input_shape(text)


def test_build_spec_inference():
    spec = build_spec([parse_input_shape("idx=1x64:int64"), parse_input_shape("attention_mask=1x64:int64"),
                       parse_input_shape("img=1x3x8x8")], vocab=100)
    ids, mask, img = spec.inputs
    assert ids.dims == (Dim("batch", 2, 3), Dim("seq", 64, 32)) and ids.high == 100 and not ids.ones
    assert mask.dims[1] is ids.dims[1] and mask.ones  # one Dim per name; a mask samples as ones
    assert img.dims[1:] == (3, 8, 8) and img.high is None
    assert [tuple(t.shape) for t in spec.sample(alt=True)] == [(3, 32), (3, 32), (3, 3, 8, 8)]
    assert int(spec.sample()[0].max()) < 100 and bool(spec.sample()[1].eq(1).all())
    named = build_spec([("x", ("B", ("T", 10), 4), "float32")], outputs=("a", "b"))
    assert named.inputs[0].dims == (Dim("B", 2, 3), Dim("T", 10, 5), 4) and named.outputs == ("a", "b")
    from edgec.latency.shapes import parse_input_shapes  # profile/prune read the same grammar as sizes

    assert parse_input_shapes(named, ["x=4xTx4:float32", "x=2xT=7x4"]) == {"x": (2, 7, 4)}
    assert parse_input_shapes(named, ["x=4xTx4"]) == {"x": (4, 10, 4)}
    with pytest.raises(EdgecError, match="give the example size of 'T', e.g. T=64"):
        build_spec([("x", (1, "T"), "float32")])
    with pytest.raises(EdgecError, match="dimension 'T' is 8 in one input and 9 in 'y'"):
        build_spec([("x", (1, ("T", 8)), "float32"), ("y", (1, ("T", 9)), "float32")])


def test_spec_round_trip():
    from edgec.models.bert import Bert

    for spec in (Bert(**Bert.default_config()).input_spec(),
                 build_spec([parse_input_shape("ids=Bx12:int64"), parse_input_shape("m=BxT=4:bool")], vocab=7)):
        data = spec_to_dict(spec)
        assert json.loads(json.dumps(data)) == data
        back = spec_from_dict(data)
        assert back == spec
        assert back.inputs[0].dims[0] is back.inputs[-1].dims[0]  # shared dims stay shared


# --- checkpoint forms ----------------------------------------------------------------------------

def _write(form, module, path):
    sd = module.state_dict()
    if form == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif form == "lightning":
        state = {f"model.{k}": v for k, v in sd.items()} | {"loss_fn.weight": torch.ones(2)}
        torch.save({"state_dict": state, "pytorch-lightning_version": "2.4.0", "epoch": 3,
                    "hyper_parameters": {"width": 16, "lr": 0.01}}, path)
    else:
        torch.save(sd, path)


@pytest.mark.parametrize("form, suffix", [("state_dict", ".pt"), ("safetensors", ".safetensors"),
                                          ("lightning", ".ckpt")])
def test_checkpoint_forms(user, form, suffix):
    module = _eager(user, width=16)
    path = user / "work" / f"w{suffix}"
    _write(form, module, path)
    config = None if form == "lightning" else '{"width": 16}'  # Lightning: from hyper_parameters
    model = load_checkpoint(path, SourceOptions(arch="../src/net.py:Net", arch_config=config, input_shape=X))
    _same_outputs(model, module)
    assert model.config == {"width": 16, "num_classes": 10} and model.arch == "net.py:Net"
    rec = model.provenance[0]
    assert rec["pass"] == "import.torch" and rec["params"]["form"] == form
    assert rec["params"]["source"] == path.name and len(rec["params"]["source_sha256"]) == 64
    assert rec["output_digest"] == model.digest()
    if form == "lightning":
        assert rec["hyper_parameters_ignored"] == ["lr"] and rec["ignored_keys"] == ["loss_fn.weight"]


def test_sizes_that_do_not_fit_say_so(user):
    _write("state_dict", _eager(user, width=16), user / "work" / "w.pt")
    with pytest.raises(EdgecError, match=r"w.pt: tensor 'stem.weight' has shape \[16, 3, 3, 3\] but the "
                                         r"architecture expects \[8, 3, 3, 3\] \(pass the sizes with --arch-config\)"):
        load_checkpoint(user / "work" / "w.pt", SourceOptions(arch="../src/net.py:Net", input_shape=X))


def test_pickled_module_needs_trust_pickle(user, capsys):
    module = _eager(user)
    path = user / "work" / "whole.pt"
    torch.save(module, path)
    opts = SourceOptions(arch="../src/net.py:Net", input_shape=X)
    with pytest.raises(EdgecError) as err:
        load_checkpoint(path, opts)
    assert str(err.value) == (f"{path} is a pickled module: loading it runs code from the file; pass "
                              "--trust-pickle if you trust it, or save model.state_dict() instead")
    model = load_checkpoint(path, SourceOptions(arch="../src/net.py:Net", input_shape=X, trust_pickle=True))
    _same_outputs(model, module)
    assert model.provenance[0]["trust_pickle"] is True and model.provenance[0]["params"]["form"] == "pickled-module"
    assert "--trust-pickle: unpickling runs code" in capsys.readouterr().err


def test_buffers_never_block_loading(user):
    module = _eager(user)
    sd = module.state_dict()
    assert "unused" in sd and "scale" not in sd  # persistent-but-unused and non-persistent
    path = user / "work" / "w.pt"
    torch.save(sd, path)
    model = load_checkpoint(path, SourceOptions(arch="../src/net.py:Net", input_shape=X))
    save_checkpoint(model, user / "work" / "m.pt")
    again = load_checkpoint(user / "work" / "m.pt", "../src/net.py:Net")
    assert again.digest() == model.digest()
    _same_outputs(again, module)
    torch.save({k: v for k, v in sd.items() if k != "unused"}, path)  # a file that leaves a buffer out
    model = load_checkpoint(path, SourceOptions(arch="../src/net.py:Net", input_shape=X))
    assert model.provenance[0]["buffers_from_init"] == ["unused"]
    torch.save({k: v for k, v in sd.items() if k != "head.bias"}, path)  # ... but never a parameter
    with pytest.raises(EdgecError, match="missing 1 tensor.*'head.bias'"):
        load_checkpoint(path, SourceOptions(arch="../src/net.py:Net", input_shape=X))


def test_missing_input_shape_and_wrong_shape(user):
    _write("state_dict", _eager(user), user / "work" / "w.pt")
    with pytest.raises(EdgecError, match="has no input_spec\\(\\); describe its example inputs with --input-shape"):
        load_checkpoint(user / "work" / "w.pt", "../src/net.py:Net")
    with pytest.raises(EdgecError, match=r"failed on the example inputs \(x: \[2, 5, 16, 16\] float32\)"):
        load_checkpoint(user / "work" / "w.pt", SourceOptions(arch="../src/net.py:Net", input_shape=["x=1x5x16x16"]))
    with pytest.raises(EdgecError, match="names 'y', but net.py:Net.forward takes x"):
        load_checkpoint(user / "work" / "w.pt", SourceOptions(arch="../src/net.py:Net", input_shape=["y=1x3x4x4"]))


def test_stored_arch_never_absolute_and_needs_trust(user):
    _write("state_dict", _eager(user), user / "work" / "w.pt")
    arch = str(user / "src" / "net.py") + ":Net"  # an absolute path
    model = load_checkpoint(user / "work" / "w.pt", SourceOptions(arch=arch, input_shape=X))
    save_checkpoint(model, user / "work" / "m.pt")
    data = (user / "work" / "m.pt").read_bytes()
    assert model.arch == "net.py:Net" and str(user).encode() not in data
    stored = torch.load(user / "work" / "m.pt", weights_only=True)["model"]
    assert stored["arch"] == "net.py:Net" and spec_from_dict(stored["spec"]) == model.spec
    assert stored["capture"]["method"] in ("fx", "fx-shapes")
    with pytest.raises(EdgecError, match="uses the user architecture 'net.py:Net'; pass --arch path/to/net.py:Net"):
        load_checkpoint(user / "work" / "m.pt")
    with pytest.raises(EdgecError, match="holds a 'net.py:Net' model, not '../src/net.py:Needs'"):
        load_checkpoint(user / "work" / "m.pt", "../src/net.py:Needs")
    # the project file (in a parent folder) trusts it: no --arch needed; its paths are relative to it
    (user / "edgec.toml").write_text('trusted = ["src/net.py:Net"]\n')
    assert load_checkpoint(user / "work" / "m.pt").digest() == model.digest()


def test_project_file_defaults(user):
    module = _eager(user, width=4)
    _write("state_dict", module, user / "work" / "w.pt")
    (user / "pyproject.toml").write_text(textwrap.dedent('''
        [project]
        name = "x"

        [tool.edgec]
        arch = "src/net.py:Net"
        arch-config = {width = 4}
        input-shape = ["x=1x3x16x16"]
    '''))
    model = load_checkpoint(user / "work" / "w.pt")  # nothing given: everything from the project file
    _same_outputs(model, module)
    assert model.config["width"] == 4
    # explicit values win
    with pytest.raises(EdgecError, match="expects \\[8, 3, 3, 3\\]"):
        load_checkpoint(user / "work" / "w.pt", SourceOptions(arch_config={"width": 8}))
    (user / "work" / "edgec.toml").write_text('[tool.edgec]\narch = "x.py:A"\ntrusted = "src/net.py:Net"\n')
    with pytest.raises(EdgecError, match=r"project file edgec.toml \(\[tool.edgec\]\)|'trusted' must be a list"):
        load_checkpoint(user / "work" / "w.pt")
    (user / "work" / "edgec.toml").write_text('archs = "x"\n')
    with pytest.raises(EdgecError, match="project file edgec.toml: unknown key 'archs'; keys: arch, arch-config"):
        load_checkpoint(user / "work" / "w.pt")


# --- edgec import torch --------------------------------------------------------------------------

def test_import_torch_cli(user):
    _write("lightning", _eager(user, width=16), user / "w.ckpt")
    out = user / "m.pt"
    proc = run_cli("import", "torch", "w.ckpt", "--arch", "src/net.py:Net", "--input-shape", "x=1x3x16x16",
                   "-o", out, "--json", cwd=user, check=0)
    res = json.loads(proc.stdout)
    assert res["arch"] == "src/net.py:Net" and res["config"] == {"width": 16, "num_classes": 10}
    proc = run_cli("inspect", "m.pt", "--json", cwd=user)
    assert proc.returncode == 2 and "pass --arch src/net.py:Net" in proc.stderr + proc.stdout
    proc = run_cli("import", "torch", "w.ckpt", "--arch", "src/net.py:Needs", "-o", user / "n.pt", cwd=user)
    assert proc.returncode == 2 and "constructor argument(s) n have no default" in proc.stderr
    assert "Traceback" not in proc.stderr and not (user / "n.pt").exists()
