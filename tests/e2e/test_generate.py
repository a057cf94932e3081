"""`edgec generate`: greedy and seeded sampling from a checkpoint (torch) and a KV-cache ONNX file (onnxruntime),
text prompts through a tokenizers file, --prompt-ids, EOS, and one-line errors (exit 2)."""
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgec.app import api
from edgec.app.cli import main
from edgec.core.fileio import atomic_write
from edgec.core.options import ZooCreateOptions
from edgec.generation import generate, select
from edgec.models.checkpoint import load_checkpoint
from edgec.onnx.generation import export_kv


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    api.zoo_create("llama", d / "l.pt", ZooCreateOptions(set={"num_hidden_layers": 1}))  # one layer: a faster export
    data, _ = export_kv(load_checkpoint(d / "l.pt"))
    atomic_write(d / "l.onnx", data)
    return d


def cli(capsys, monkeypatch, *args):
    """``edgec ARGS`` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edgec", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def gen(capsys, monkeypatch, model, *args):
    code, out, err = cli(capsys, monkeypatch, "generate", model, "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_greedy_torch_and_onnx_agree(files, capsys, monkeypatch):
    pt = gen(capsys, monkeypatch, files / "l.pt", "--prompt-ids", "1,2,3,4", "--max-new-tokens", "12")
    ox = gen(capsys, monkeypatch, files / "l.onnx", "--prompt-ids", "1,2,3,4", "--max-new-tokens", "12")
    assert pt["schema"] == "edgec.generate/1" and pt["runtime"] == "torch" and ox["runtime"] == "onnxruntime"
    assert len(pt["generated_ids"]) == 12 and pt["stopped"] == "max_new_tokens"
    assert pt["generated_ids"] == ox["generated_ids"]
    assert pt["prompt_ids"] == [1, 2, 3, 4] and pt["text"] is None and pt["sampling"]["mode"] == "greedy"
    for res in (pt, ox):
        assert res["prefill"]["tokens"] == 4 and res["prefill"]["tokens_per_s"] > 0
        assert res["decode"]["tokens"] == 11 and res["decode"]["tokens_per_s"] > 0


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(files, capsys, monkeypatch):
    args = ("--prompt-ids", "5,6", "--max-new-tokens", "16", "--temperature", "1.5", "--top-k", "200", "--top-p",
            "0.95")
    a = gen(capsys, monkeypatch, files / "l.onnx", *args, "--seed", "1")
    b = gen(capsys, monkeypatch, files / "l.onnx", *args, "--seed", "1")
    c = gen(capsys, monkeypatch, files / "l.onnx", *args, "--seed", "2")
    t = gen(capsys, monkeypatch, files / "l.pt", *args, "--seed", "1")
    assert a["generated_ids"] == b["generated_ids"] == t["generated_ids"]
    assert a["generated_ids"] != c["generated_ids"]
    assert a["sampling"] == {"mode": "sample", "temperature": 1.5, "top_k": 200, "top_p": 0.95, "seed": 1}


def test_text_prompt_through_a_tokenizer(files, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(511)} | {"</s>": 511}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    res = gen(capsys, monkeypatch, files / "l.onnx", "--prompt", "w7 w8 w9", "--tokenizer", tmp_path / "tokenizer.json",
              "--max-new-tokens", "5")
    assert res["prompt_ids"] == [7, 8, 9] and res["eos_id"] == 511
    assert res["text"] == tok.decode(res["generated_ids"]) and res["text"]
    code, out, _ = cli(capsys, monkeypatch, "generate", files / "l.onnx", "--prompt", "w7 w8", "--tokenizer",
                       tmp_path / "tokenizer.json", "--max-new-tokens", "3")
    assert code == 0 and "decode" in out and "tokens/s" in out


class FakeRunner:
    """Logits that always favour token 4, then EOS (id 9) from the third step on."""

    runtime, vocab, context = "fake", 10, None

    def __init__(self):
        self.calls = 0

    def empty_past(self, batch):
        return []

    def step(self, ids, mask, pos, past):
        self.calls += 1
        logits = np.zeros((1, ids.shape[1], 10), np.float32)
        logits[..., 9 if self.calls >= 3 else 4] = 1.0
        return logits, past


def test_stops_at_eos_and_selection_rules():
    run = generate(FakeRunner(), [1, 2], 10, eos_id=9, warmup=0)
    assert run["generated_ids"] == [4, 4] and run["stopped"] == "eos"
    assert generate(FakeRunner(), [1], 10, warmup=0)["generated_ids"][:3] == [4, 4, 9]  # no EOS known: max_new_tokens
    z = np.array([0.0, 3.0, 2.9, -1.0])
    assert select(z, None, None, None, None) == 1
    rng = np.random.Generator(np.random.PCG64(0))
    assert {select(z, rng, 1.0, 1, None) for _ in range(20)} == {1}  # top-k 1 is greedy
    assert {select(z, rng, 1.0, None, 0.5) for _ in range(20)} == {1}  # p(1) > 0.5: nucleus of one
    assert {select(z, rng, 5.0, 2, None) for _ in range(50)} == {1, 2}  # top-2 at a high temperature


@pytest.mark.parametrize("args, message", [
    (("--max-new-tokens", "3"), "exactly one of --prompt"),
    (("--prompt", "hello"), "--prompt needs --tokenizer"),
    (("--prompt-ids", "1,600"), "out of range"),
    (("--prompt-ids", "1,x"), "comma-separated token ids"),
])
def test_bad_input_is_one_line_exit_2(files, capsys, monkeypatch, args, message):
    code, out, err = cli(capsys, monkeypatch, "generate", files / "l.pt", *args)
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert code == 2 and len(errors) == 1 and message in errors[0], err


def test_plain_onnx_without_a_cache_is_refused(tmp_path, capsys, monkeypatch):
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph([helper.make_node("Identity", ["input_ids"], ["logits"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), tmp_path / "plain.onnx")
    code, _, err = cli(capsys, monkeypatch, "generate", tmp_path / "plain.onnx", "--prompt-ids", "1,2")
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert code == 2 and len(errors) == 1 and "no KV cache" in errors[0] and "--kv-cache" in errors[0]
