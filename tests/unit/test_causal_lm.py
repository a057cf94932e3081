"""Causal-LM losses and scores against hand computations: next-token cross-entropy, per-token logits KD,
``edgec eval``'s perplexity / bits per byte / top-1 on a bigram toy (checkpoint and ONNX), the fine-tuning
monitor (lower perplexity wins) and the clear errors for a block longer than the model or a vocabulary too big."""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.data.bundle import DataBundle, TensorPairDataset, check_fits
from edgec.evaluation import build_feed, evaluate_model, inputs_from_onnx
from edgec.models.checkpoint import new_model
from edgec.train import finetune
from edgec.train.loop import MONITOR, evaluate, is_better
from edgec.train.losses import combined_loss, kd_loss, task_loss

# A bigram table: the logits after token i are TABLE[i] (3 tokens).
TABLE = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.5, 3.0]]
X = [[0, 1, 2, 0], [2, 2, 1, 0], [1, 0, 0, 2]]  # 3 blocks of 4 tokens
Y = [[1, 2, 0, 0], [2, 1, 0, 1], [0, 0, 2, 2]]  # the next tokens


def hand_nll(table, xs, ys) -> float:
    """Σ over every position of −log softmax(table[x])[y], with plain floats."""
    total = 0.0
    for xr, yr in zip(xs, ys):
        for x, y in zip(xr, yr):
            row = table[x]
            total += math.log(sum(math.exp(v) for v in row)) - row[y]
    return total


class Bigram(nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a causal LM whose NLL is computable by hand."""

    summary = "bigram test LM"

    @staticmethod
    def default_config() -> dict:
        return {"vocab_size": 3, "max_seq": 8}

    def __init__(self, vocab_size=3, max_seq=8):
        super().__init__()
        self.vocab_size, self.max_seq = vocab_size, max_seq
        self.table = nn.Embedding(vocab_size, vocab_size)

    def input_spec(self):
        seq = Dim("seq", example=4, alt=3, min=1, max=self.max_seq)
        return InputSpec((TensorSpec("input_ids", (Dim("batch", 2, 3, min=1), seq), dtype="int64",
                                     high=self.vocab_size),), outputs=("logits",), task="causal_lm")

    def forward(self, input_ids):
        return self.table(input_ids)


ARCH = f"{__name__}:Bigram"


def bigram(table=TABLE, max_seq=8):
    model = new_model(ARCH, {"vocab_size": len(table), "max_seq": max_seq})
    with torch.no_grad():
        model.gm.table.weight.copy_(torch.tensor(table))
    return model


def bigram_onnx(table=TABLE, kv: bool = False) -> bytes:
    """The same bigram as a hand-built ONNX graph (Gather rows of the table); ``kv`` adds the inputs of a
    KV-cache decoder export (mask, positions, past keys/values: onnxruntime wants them fed, the toy ignores them)."""
    w = numpy_helper.from_array(np.asarray(table, dtype=np.float32), "table")
    batch, seq = ("batch_size", "sequence_length") if kv else ("batch", "seq")
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, seq])]
    if kv:
        inputs += [helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [batch, "total_sequence_length"]),
                   helper.make_tensor_value_info("position_ids", TensorProto.INT64, [batch, seq])]
        inputs += [helper.make_tensor_value_info(f"past_key_values.0.{k}", TensorProto.FLOAT,
                                                 [batch, 2, "past_sequence_length", 4]) for k in ("key", "value")]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["logits"], axis=0)], "bigram", inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, seq, len(table)])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def lm_bundle(xs=X, ys=Y, meta=None, split="test") -> DataBundle:
    ds = TensorPairDataset(torch.tensor(xs), torch.tensor(ys))
    return DataBundle(task="causal_lm", classes=None, num_classes=None, splits={split: ds}, digest="toy",
                      source="toy", kind="test", meta=meta if meta is not None else {})


# ------------------------------------------------------------------------------------------------ losses
def test_task_loss_is_the_per_token_next_token_cross_entropy():
    logits = torch.tensor(TABLE)[torch.tensor(X)]  # [3, 4, 3]
    want = hand_nll(TABLE, X, Y)
    assert task_loss(logits, torch.tensor(Y), "causal_lm", reduction="sum").item() == pytest.approx(want, rel=1e-6)
    assert task_loss(logits, torch.tensor(Y), "causal_lm").item() == pytest.approx(want / 12, rel=1e-6)
    with pytest.raises(EdgecError, match=r"logits \[batch, seq, vocab\]"):
        task_loss(logits[:, 0], torch.tensor(Y), "causal_lm")


def test_kd_loss_per_token_is_hintons_kl_averaged_over_positions():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g) * 2
    temp = 2.5
    total = 0.0
    for b in range(2):
        for i in range(3):
            ps = [math.exp(v / temp) for v in s[b, i].tolist()]
            pt = [math.exp(v / temp) for v in t[b, i].tolist()]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            total += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    want = temp * temp * total / 6
    assert kd_loss(s, t, temp, "causal_lm").item() == pytest.approx(want, rel=1e-5)
    assert kd_loss(t, t, temp, "causal_lm").item() == pytest.approx(0.0, abs=1e-6)
    loss, parts = combined_loss(s, torch.zeros(2, 3, dtype=torch.long), "causal_lm", t, 0.25, temp)
    assert loss.item() == pytest.approx(0.75 * parts["task"].item() + 0.25 * want, rel=1e-5)
    with pytest.raises(EdgecError, match="one shape"):
        kd_loss(s, t[:, :2], temp, "causal_lm")


# ------------------------------------------------------------------------------------------------ eval
@pytest.mark.parametrize("kind", ["checkpoint", "onnx"])
def test_eval_perplexity_bits_per_byte_and_top1_equal_a_hand_computation(kind):
    nll = hand_nll(TABLE, X, Y)
    top1 = sum(max(range(3), key=lambda j: TABLE[x][j]) == y for xr, yr in zip(X, Y) for x, y in zip(xr, yr))
    target = bigram() if kind == "checkpoint" else bigram_onnx()
    res = evaluate_model(target, lm_bundle(meta={"bytes": {"test": 30}, "tokens": {"test": 12}}), latency=False)
    m = res["metrics"]
    assert res["task"] == "causal_lm" and res["n"] == 3 and res["tokens"] == 12 and res["text_bytes"] == 30
    assert list(m) == ["perplexity", "bits_per_byte", "accuracy", "loss"]
    assert m["loss"] == pytest.approx(nll / 12, rel=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(nll / 12), rel=1e-6)
    assert m["bits_per_byte"] == pytest.approx(nll / math.log(2) / 30, rel=1e-6)
    assert m["accuracy"] == pytest.approx(top1 / 12)
    assert res["predictions_by"] == ("torch" if kind == "checkpoint" else "onnxruntime")


def test_uniform_logits_have_perplexity_v_and_bytes_scale_to_the_scored_tokens():
    """All-zero logits: perplexity is exactly V. The split's stream has 13 tokens for 26 bytes but 12 are
    scored (packing drops the first token): 24 bytes are credited, bpb = 12·ln 3 / ln 2 / 24."""
    zeros = [[0.0] * 3 for _ in range(3)]
    res = evaluate_model(bigram(zeros), lm_bundle(meta={"bytes": {"test": 26}, "tokens": {"test": 13}}),
                         latency=False)
    assert res["metrics"]["perplexity"] == pytest.approx(3.0, rel=1e-9)
    assert res["text_bytes"] == pytest.approx(24.0)
    assert res["metrics"]["bits_per_byte"] == pytest.approx(12 * math.log(3) / math.log(2) / 24, rel=1e-9)


def test_bits_per_byte_unavailable_without_bytes_is_said():
    res = evaluate_model(bigram(), lm_bundle(meta={"tokens": {"test": 13}}), latency=False)
    assert "bits_per_byte" not in res["metrics"] and res["text_bytes"] is None
    assert any("bits per byte unavailable" in n for n in res["notes"])


def test_eval_feeds_a_kv_cache_decoder_a_prefill_with_an_empty_past():
    proto = onnx.load_model_from_string(bigram_onnx(kv=True))
    inputs = inputs_from_onnx(proto, None)
    feed = build_feed(inputs, np.asarray(X, dtype=np.int64))
    assert feed["attention_mask"].tolist() == [[1] * 4] * 3
    assert feed["position_ids"].tolist() == [[0, 1, 2, 3]] * 3 and feed["position_ids"].dtype == np.int64
    assert feed["past_key_values.0.key"].shape == (3, 2, 0, 4) == feed["past_key_values.0.value"].shape
    res = evaluate_model(bigram_onnx(kv=True), lm_bundle(), latency=False)
    assert res["metrics"]["loss"] == pytest.approx(hand_nll(TABLE, X, Y) / 12, rel=1e-6)


def test_eval_refuses_token_ids_beyond_the_vocabulary():
    with pytest.raises(EdgecError, match="token id 5 .* 3 logits"):
        evaluate_model(bigram_onnx(), lm_bundle(ys=[[1, 2, 0, 5], [2, 1, 0, 1], [0, 0, 2, 2]]), latency=False)


# ------------------------------------------------------------------------------------------------ training
def test_loop_evaluate_matches_the_eval_protocol_and_lower_perplexity_wins():
    val = evaluate(bigram().gm, lm_bundle().split("test"), "causal_lm", None, 2, torch.device("cpu"))
    nll = hand_nll(TABLE, X, Y)
    assert val["loss"] == pytest.approx(nll / 12, rel=1e-6)
    assert val["perplexity"] == pytest.approx(math.exp(nll / 12), rel=1e-6)
    assert MONITOR["causal_lm"] == "perplexity"
    best = {"score": 5.0, "loss": math.log(5.0)}
    assert is_better(4.0, 1.0, best, lower=True) and not is_better(6.0, 1.0, best, lower=True)
    assert not is_better(4.0, 1.0, best)  # the default direction is unchanged: higher wins


def markov_stream(n: int, seed: int) -> torch.Tensor:
    """Tokens 0..7 where the next token is (3·cur + 1) mod 8 nine times in ten: a bigram is learnable."""
    g = torch.Generator().manual_seed(seed)
    out, cur = [], 0
    for _ in range(n):
        out.append(cur)
        cur = (3 * cur + 1) % 8 if torch.rand(1, generator=g).item() < 0.9 else int(torch.randint(8, (1,), generator=g))
    return torch.tensor(out)


def blocks(stream: torch.Tensor, t: int) -> TensorPairDataset:
    n = (len(stream) - 1) // t
    return TensorPairDataset(stream[: n * t].reshape(n, t), stream[1 : n * t + 1].reshape(n, t))


def test_finetune_lowers_perplexity_and_keeps_the_lowest_epoch():
    data = DataBundle(task="causal_lm", classes=None, num_classes=None, digest="markov", source="markov",
                      splits={"train": blocks(markov_stream(1025, 0), 8), "val": blocks(markov_stream(257, 1), 8)},
                      meta={"vocab_size": 8, "block_size": 8})
    model = bigram([[0.0] * 8 for _ in range(8)])
    out, report = finetune(model, data, epochs=3, batch_size=16, lr=0.1, warmup=0.0, seed=0)
    assert report["monitor"] == "perplexity"
    ppl = [h["val"]["perplexity"] for h in report["history"]]
    assert ppl[0] < 8.0 and report["best"]["perplexity"] == min(ppl) < 3.0
    assert report["best_epoch"] == ppl.index(min(ppl)) + 1


def test_a_block_longer_than_the_model_and_a_vocabulary_too_big_are_clear_errors():
    data = lm_bundle(xs=[[0] * 10], ys=[[0] * 10], split="train")
    with pytest.raises(EdgecError, match="blocks of 10 tokens .* at most 8 positions"):
        check_fits(data, bigram().spec, "the model (bigram)")
    big = DataBundle(task="causal_lm", classes=None, num_classes=None, digest="d", source="d",
                     splits={"train": blocks(markov_stream(65, 0), 4), "val": blocks(markov_stream(65, 1), 4)},
                     meta={"vocab_size": 8})
    with pytest.raises(EdgecError, match="vocabulary has 8 tokens .* 3 logits"):
        finetune(bigram(), big, epochs=1)
    big.meta = {}
    with pytest.raises(EdgecError, match="token id 7 .* vocabulary of 3"):
        finetune(bigram(), big, epochs=1)
    with pytest.raises(EdgecError, match="at most 8 positions"):
        finetune(bigram(), DataBundle(task="causal_lm", classes=None, num_classes=None, digest="d", source="d",
                                      splits={"train": blocks(torch.zeros(41, dtype=torch.long), 10),
                                              "val": blocks(torch.zeros(41, dtype=torch.long), 10)}), epochs=1)


def test_onnx_toy_is_a_valid_model():
    onnx.checker.check_model(onnx.load_model_from_string(bigram_onnx()))


def test_logits_distillation_is_per_token_in_the_loop():
    """Student = teacher (lr 0): the per-token KD term is 0; a different student: it is the hand KL of its logits."""
    data = DataBundle(task="causal_lm", classes=None, num_classes=None, digest="markov", source="markov",
                      splits={"train": blocks(markov_stream(129, 0), 8), "val": blocks(markov_stream(65, 1), 8)},
                      meta={"vocab_size": 8})
    g = torch.Generator().manual_seed(3)
    t_table, s_table = torch.randn(8, 8, generator=g).tolist(), torch.randn(8, 8, generator=g).tolist()
    _, same = finetune(bigram(t_table), data, teacher=bigram(t_table), epochs=1, lr=0.0, kd_temperature=2.0)
    assert same["distill"]["mode"] == "logits" and same["history"][0]["train_kd_loss"] == pytest.approx(0, abs=1e-6)
    _, other = finetune(bigram(s_table), data, teacher=bigram(t_table), epochs=1, lr=0.0, batch_size=64,
                        kd_temperature=2.0)
    x = data.splits["train"].inputs
    want = kd_loss(torch.tensor(s_table)[x], torch.tensor(t_table)[x], 2.0, "causal_lm").item()
    assert other["history"][0]["train_kd_loss"] == pytest.approx(want, rel=1e-5) and want > 0.1
