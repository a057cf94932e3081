"""Text data for causal LMs (edgec.data.text): token-id files, text folders + tokenizer.json, packed blocks."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from edgec.core.errors import EdgecError
from edgec.core.options import DataOptions, EvalOptions, FinetuneOptions, value_rule
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.data import load_data, max_sequence, source_kind
from edgec.data.bundle import TargetCastDataset
from edgec.data.text import DEFAULT_BLOCK_SIZE, pack_blocks, split_documents
from edgec.evaluation import load_eval_data

WORDS = ["<|endoftext|>", "[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]
VOCAB = {w: i for i, w in enumerate(WORDS)}


def word_tokenizer(path, eos=True):
    """A word-level tokenizer with a known vocabulary: ids are hand-computable."""
    vocab = dict(VOCAB) if eos else {w: i for i, w in enumerate(WORDS[1:])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path))
    return tok


def ids_of(words):
    return [VOCAB.get(w, VOCAB["[UNK]"]) for w in words.split()]


def text_folder(tmp_path, train, val=None, test=None, eos=True):
    d = tmp_path / "corpus"
    d.mkdir()
    for name, text in (("train", train), ("val", val), ("test", test)):
        if text is not None:
            (d / f"{name}.txt").write_bytes(text.encode("utf-8"))
    word_tokenizer(d / "tokenizer.json", eos=eos)
    return d


def one_line_error(fn, *words):
    with pytest.raises(EdgecError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------------------- packing

def test_pack_blocks_equals_hand_computation():
    x, y = pack_blocks(torch.arange(11), 3)  # windows of 4 tokens with stride 3: 0-3, 3-6, 6-9 (10 dropped)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert x.dtype == y.dtype == torch.int64
    assert pack_blocks(torch.arange(10), 3)[0].shape == (3, 3)  # exactly 3 * 3 + 1 tokens
    assert pack_blocks(torch.arange(9), 3)[0].shape == (2, 3)
    assert pack_blocks(torch.arange(3), 3)[0].shape == (0, 3)


@pytest.mark.parametrize("suffix", ["safetensors", "npz", "pt"])
def test_token_file_formats(tmp_path, suffix):
    train = np.arange(50, dtype=np.uint16) % 20
    val = np.array([5, 6, 7, 8, 9, 10, 11], dtype=np.int32)
    test = np.array([1, 2, 3, 4, 19], dtype=np.int64)
    path = tmp_path / f"tok.{suffix}"
    if suffix == "safetensors":
        save_file({"input_ids_train": torch.from_numpy(train), "input_ids_val": torch.from_numpy(val),
                   "input_ids_test": torch.from_numpy(test), "bytes_train": torch.tensor(200),
                   "bytes_test": torch.tensor(17), "vocab_size": torch.tensor(32)}, path)
    elif suffix == "npz":
        np.savez(path, input_ids_train=train, input_ids_val=val, input_ids_test=test, bytes_train=np.int64(200),
                 bytes_test=np.array(17), vocab_size=np.array(32))
    else:
        torch.save({"input_ids_train": torch.from_numpy(train.astype(np.int64)), "input_ids_val": torch.from_numpy(val),
                    "input_ids_test": torch.from_numpy(test), "bytes_train": 200, "bytes_test": torch.tensor(17),
                    "vocab_size": 32}, path)
    b = load_data(str(path), block_size=3)
    assert (b.task, b.classes, b.num_classes, b.output_dim) == ("causal_lm", None, None, 32)
    assert b.meta["vocab_size"] == 32 and b.meta["block_size"] == 3
    assert b.meta["tokens"] == {"train": 50, "val": 7, "test": 5}
    assert b.meta["bytes"] == {"train": 200, "test": 17}  # val bytes not given
    assert b.meta["format"] == f"tokens-{suffix}"
    assert [len(b.split(s)) for s in ("train", "val", "test")] == [16, 2, 1]
    x, y = b.split("test")[0]
    assert x.tolist() == [1, 2, 3] and y.tolist() == [2, 3, 4] and x.dtype == torch.int64
    x, y = b.split("train")[15]
    assert x.tolist() == [5, 6, 7] and y.tolist() == [6, 7, 8]  # 45..48 % 20
    assert b.input_shape == (3,) and b.input_dtype == torch.int64


def test_val_tail_is_contiguous_and_bytes_pro_rata(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"input_ids_train": torch.arange(100, dtype=torch.int32), "bytes_train": torch.tensor(1000)}, path)
    b = load_data(str(path), block_size=4, val_fraction=0.2)
    assert b.meta["tokens"] == {"train": 80, "val": 20}
    assert b.meta["bytes"] == {"train": 800, "val": 200}
    assert b.meta["bytes_estimated"] == ["train", "val"]
    assert b.meta["vocab_size"] == 100  # max id + 1 when not given
    tr, va = b.splits["train"], b.splits["val"]
    assert tr.inputs.flatten().tolist() == list(range(76)) and tr.targets.max() == 76
    assert va.inputs.flatten().tolist() == list(range(80, 96)) and va.targets.flatten().tolist() == list(range(81, 97))
    # a tiny fraction still holds out one whole window (block_size + 1 tokens)
    b = load_data(str(path), block_size=4, val_fraction=0.01)
    assert b.meta["tokens"] == {"train": 95, "val": 5} and len(b.split("val")) == 1
    b = load_data(str(path), block_size=4, val_fraction=0.0)
    assert list(b.splits) == ["train"] and b.meta["bytes"] == {"train": 1000}
    assert "bytes_estimated" not in b.meta


def test_default_block_size_capped_by_the_model(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"input_ids_train": torch.arange(1000, dtype=torch.int32) % 7}, path)
    assert load_data(str(path)).meta["block_size"] == DEFAULT_BLOCK_SIZE == 128
    assert load_data(str(path), max_block_size=48).meta["block_size"] == 48
    assert load_data(str(path), block_size=16, max_block_size=48).meta["block_size"] == 16
    one_line_error(lambda: load_data(str(path), block_size=64, max_block_size=48), "block_size 64", "48")
    seq = Dim("seq", example=8, alt=5, min=1, max=256)
    spec = InputSpec(inputs=[TensorSpec("input_ids", [Dim("batch", example=2, alt=3, min=1), seq], "int64")])
    assert max_sequence(spec) == 256
    assert max_sequence(InputSpec(inputs=[TensorSpec("x", [1, 3, 32], "float32")])) == 3


# ------------------------------------------------------------------------------------------- text folders

def test_text_folder_tokenizes_documents_with_eos_between(tmp_path):
    train = "the cat sat\non the mat\n\na dog ran .\n\n\n\nthe dog sat\n\n \n\ncafé cat\n"
    d = text_folder(tmp_path, train, val="a cat ran\n\n\nthe mat\n", test="the dog sat\n")
    assert source_kind(str(d)) == "text" and source_kind(str(d / "train.txt")) == "text"
    assert split_documents(train) == ["the cat sat\non the mat\n\na dog ran .", "the dog sat", "café cat\n"]
    b = load_data(str(d), block_size=2, cache_dir=str(tmp_path / "cache"))
    eos = VOCAB["<|endoftext|>"]
    want = ids_of("the cat sat on the mat a dog ran .") + [eos] + ids_of("the dog sat") + [eos] + ids_of("café cat")
    stream = torch.cat([b.splits["train"].inputs.flatten(), b.splits["train"].targets[-1:, -1]])
    assert stream.tolist() == want[: len(stream)] and len(stream) == len(want) - (len(want) - 1) % 2
    assert b.meta["tokens"] == {"train": len(want), "val": 6, "test": 3}
    assert b.meta["bytes"] == {"train": len(train.encode("utf-8")), "val": 20, "test": 12}
    assert b.meta["bytes"]["train"] == len(train) + 1  # é is two bytes
    assert b.meta["vocab_size"] == len(WORDS) and b.meta["eos_id"] == eos and b.output_dim == len(WORDS)
    assert b.split("val")[0][0].tolist() == ids_of("a cat") and b.split("val")[1][0].tolist() == [VOCAB["ran"], eos]
    assert b.kind == "text folder" and b.meta["format"] == "text"


def test_text_folder_without_eos_and_val_tail(tmp_path):
    d = text_folder(tmp_path, "the cat sat\n\n\nthe dog ran\n", eos=False)
    b = load_data(str(d), block_size=2, val_fraction=0.4, cache_dir=str(tmp_path / "c"))
    inv = dict(enumerate(WORDS[1:]))
    assert b.meta["eos_id"] is None and any("no end-of-text" in n for n in b.meta["notes"])
    assert b.meta["tokens"] == {"train": 3, "val": 3}  # 6 tokens, no separator; val = the last 40 % (>= 3)
    assert [inv[i] for i in b.split("val")[0][0].tolist()] == ["the", "dog"]


def test_caching_and_determinism(tmp_path):
    d = text_folder(tmp_path, "the cat sat on the mat\n\n\na dog ran .\n" * 5, val="the cat sat on\n")
    cache = tmp_path / "cache"
    first = load_data(str(d), block_size=3, cache_dir=str(cache))
    assert first.meta["from_cache"] is False and os.path.isfile(first.meta["cache_path"])
    second = load_data(str(d), block_size=3, cache_dir=str(cache))
    assert second.meta["from_cache"] is True and second.digest == first.digest
    assert torch.equal(first.splits["train"].inputs, second.splits["train"].inputs)
    other = load_data(str(d), block_size=3, cache_dir=str(tmp_path / "other"))  # a fresh tokenization
    assert other.meta["from_cache"] is False and other.digest == first.digest
    with open(other.meta["cache_path"], "rb") as a, open(first.meta["cache_path"], "rb") as b:
        assert a.read() == b.read()
    # the key covers the tokenizer and the texts; an unusable cache file is recomputed
    (d / "val.txt").write_text("the dog sat on\n")
    changed = load_data(str(d), block_size=3, cache_dir=str(cache))
    assert changed.meta["from_cache"] is False and changed.digest != first.digest
    with open(changed.meta["cache_path"], "wb") as f:
        f.write(b"garbage")
    again = load_data(str(d), block_size=3, cache_dir=str(cache))
    assert again.meta["from_cache"] is False and torch.equal(again.splits["val"].inputs, changed.splits["val"].inputs)
    assert load_data(str(d), block_size=2, cache_dir=str(cache)).digest != again.digest  # block size counts


def test_describe_and_cast():
    ids = torch.arange(21, dtype=torch.int32)
    tmp = {"input_ids_train": ids, "bytes_train": torch.tensor(84), "vocab_size": torch.tensor(30)}
    import tempfile

    with tempfile.TemporaryDirectory() as t:
        p = os.path.join(t, "tok.safetensors")
        save_file(tmp, p)
        b = load_data(p, block_size=4, val_fraction=0.0)
    text = b.describe()
    assert "causal language modelling, vocabulary 30, blocks of 4 tokens" in text
    assert "splits: train 5 blocks (21 tokens, 84 bytes)" in text
    assert "input: (4,) int64" in text
    ds = TargetCastDataset([(np.array([1, 2], dtype=np.int32), [2, 3])], "causal_lm")
    x, y = ds[0]
    assert x.dtype == y.dtype == torch.int64 and y.tolist() == [2, 3]


# ------------------------------------------------------------------------------------------- errors

def _save(tmp_path, tensors, name="bad.safetensors"):
    p = tmp_path / name
    if name.endswith(".pt"):
        torch.save(tensors, p)
    else:
        save_file(tensors, p)
    return str(p)


@pytest.mark.parametrize("tensors, words", [
    ({"input_ids_train": torch.zeros(0, dtype=torch.int64)}, ["'input_ids_train'", "empty"]),
    ({"input_ids_train": torch.tensor([1, 2, 40]), "vocab_size": torch.tensor(40)}, ["token id 40", "vocab_size 40"]),
    ({"input_ids_train": torch.tensor([1, -2, 3])}, ["negative token ids", "min -2"]),
    ({"input_ids_train": torch.tensor([1.0, 2.0, 3.0])}, ["integer token ids", "float32"]),
    ({"input_ids_train": torch.zeros(2, 5, dtype=torch.int64)}, ["1-D", "(2, 5)"]),
    ({"input_ids_train": torch.arange(9), "targets": torch.arange(9)}, ["mixes token-id keys", "targets"]),
    ({"input_ids_train": torch.arange(9), "bytes_val": torch.tensor(3)}, ["'bytes_val' but not 'input_ids_val'"]),
    ({"input_ids_val": torch.arange(9)}, ["needs 'input_ids_train'"]),
    ({"input_ids_train": torch.arange(9), "vocab_size": torch.tensor(2.5)}, ["'vocab_size' must be one integer"]),
    ({"input_ids_train": torch.arange(9), "input_ids_test": torch.arange(3)}, ["block_size 4", "test split"]),
])
def test_token_file_errors(tmp_path, tensors, words):
    path = _save(tmp_path, tensors)
    one_line_error(lambda: load_data(path, block_size=4, val_fraction=0.0), *words)


def test_more_errors(tmp_path):
    p = _save(tmp_path, {"input_ids_train": torch.arange(9)}, "ok.pt")
    one_line_error(lambda: load_data(p, block_size=1), "block_size must be an integer >= 2")
    one_line_error(lambda: load_data(p, block_size=8, val_fraction=0.2), "too short to hold out val")
    p = _save(tmp_path, {"input_ids_train": torch.arange(9), "classes": ["a", "b"]}, "mixed.pt")
    one_line_error(lambda: load_data(p), "mixes token-id keys", "classes")
    d = text_folder(tmp_path, "the cat sat on the mat\n")
    cache = str(tmp_path / "cache")
    one_line_error(lambda: load_data(str(d), block_size=10, val_fraction=0.0, cache_dir=cache), "block_size 10",
                   "train split allows (6 tokens")
    (d / "tokenizer.json").write_text("{not json")
    one_line_error(lambda: load_data(str(d), block_size=2, cache_dir=cache), "tokenizer.json",
                   "not a readable tokenizers file")
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nope"}}))
    one_line_error(lambda: load_data(str(d), block_size=2, cache_dir=cache), "not a readable tokenizers file")
    os.remove(d / "tokenizer.json")
    one_line_error(lambda: load_data(str(d), block_size=2, cache_dir=cache), "tokenizer.json: not found")
    word_tokenizer(d / "tokenizer.json")
    (d / "val.txt").write_bytes(b"the \xff cat")
    one_line_error(lambda: load_data(str(d), block_size=2, cache_dir=cache), "val.txt: not UTF-8")
    (d / "val.txt").write_text("\n\n")
    one_line_error(lambda: load_data(str(d), block_size=2, cache_dir=cache), "val.txt: holds no token")
    # a folder with labels.csv stays audio
    (d / "labels.csv").write_text("path,label\n")
    assert source_kind(str(d)) == "audio"


# ------------------------------------------------------------------------------------------- options

def test_block_size_option_threads_through(tmp_path):
    assert DataOptions(block_size=64).to_kwargs() == {"block_size": 64}
    assert FinetuneOptions(data="x", block_size=32).data_options.block_size == 32
    assert EvalOptions(data="x", block_size=16).block_size == 16
    assert value_rule(FinetuneOptions, "block_size") == {"ge": 2}
    p = _save(tmp_path, {"input_ids_train": torch.arange(300, dtype=torch.int32)})
    records = [{"pass": "finetune", "params": {"data_options": {"block_size": 5}}}]
    bundle, _, _ = load_eval_data(p, {}, records)
    assert bundle.meta["block_size"] == 5  # as fine-tuned
    bundle, _, _ = load_eval_data(p, {"max_position_embeddings": 12}, [])
    assert bundle.meta["block_size"] == 12  # 128 capped at the model's longest sequence
    bundle, _, _ = load_eval_data(p, {"max_position_embeddings": 12}, records, block_size=7)
    assert bundle.meta["block_size"] == 7
