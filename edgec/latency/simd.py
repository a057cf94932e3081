"""SIMD-structured (ALCS 1×N) sparsity and its execution path in ONNX ("gathered blocks").

N consecutive output channels at one input channel form a vector that is kept or removed whole; a masked
Linear / 1×1 conv runs as one Gather plus one batched MatMul of dense blocks, so it can be timed in
onnxruntime rather than assumed faster. Pattern, graph and cost: see docs/methods.md#simd-1xn.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgec.core.errors import EdgecError

DEFAULT_OPSET = 20


def parse_pattern(pattern: str) -> tuple[str, int | None]:
    """``"channel"`` → ("channel", None); ``"simd:8"`` → ("simd", 8). Anything else is bad input."""
    text = str(pattern).strip().lower()
    if text == "channel":
        return "channel", None
    if text.startswith("simd:"):
        try:
            n = int(text[5:])
        except ValueError:
            n = 0
        if n >= 2:
            return "simd", n
    raise EdgecError(f"unknown pruning pattern '{pattern}'; use 'channel' or 'simd:N' with N >= 2 (e.g. simd:8)")


def pattern_name(kind: str, n: int | None = None) -> str:
    return "channel" if kind == "channel" else f"simd:{int(n)}"


def n_blocks(out_features: int, n: int) -> int:
    return -(-int(out_features) // int(n))


def kept_vectors(in_features: int, density: float) -> int:
    """Vectors kept per block at ``density`` (at least one)."""
    return max(1, min(int(in_features), int(np.floor(in_features * float(density) + 0.5))))


def vector_norms(weight, n: int) -> np.ndarray:
    """``‖W[bN:(b+1)N, i]‖²`` per (block, input), shape ``(n_blocks, in)``; a 1×1 conv weight may keep its 1s."""
    w = _as_matrix(weight)
    out, inp = w.shape
    nb = n_blocks(out, n)
    padded = np.zeros((nb * n, inp), dtype=np.float64)
    padded[:out] = w
    return (padded.reshape(nb, n, inp) ** 2).sum(axis=1)


def vector_mask(weight, density: float, n: int, balanced: bool = True) -> np.ndarray:
    """Keep the vectors of largest L2 norm: ``balanced`` keeps the same count in every block (what the gathered
    execution path runs fastest), otherwise the globally largest ones. Returns bool ``(n_blocks, in)``."""
    norms = vector_norms(weight, n)
    nb, inp = norms.shape
    k = kept_vectors(inp, density)
    mask = np.zeros((nb, inp), dtype=bool)
    if balanced:
        order = np.argsort(-norms, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, order, True, axis=1)
    else:
        flat = np.argsort(-norms.reshape(-1), kind="stable")[: k * nb]
        mask.reshape(-1)[flat] = True
    return mask


def random_mask(out_features: int, in_features: int, n: int, density: float, seed: int = 0) -> np.ndarray:
    """A balanced random mask (every block keeps ``kept_vectors(in, density)`` inputs), for profiling."""
    rng = np.random.default_rng(seed)
    nb = n_blocks(out_features, n)
    k = kept_vectors(in_features, density)
    mask = np.zeros((nb, in_features), dtype=bool)
    for b in range(nb):
        mask[b, rng.choice(in_features, size=k, replace=False)] = True
    return mask


def expand_mask(mask: np.ndarray, n: int, out_features: int) -> np.ndarray:
    """The element mask ``(out, in)`` of a vector mask ``(n_blocks, in)``."""
    return np.repeat(np.asarray(mask, dtype=bool), n, axis=0)[:out_features]


def masked_weight(weight, mask: np.ndarray, n: int) -> np.ndarray:
    """The dense weight with removed vectors zeroed (the reference the execution path must equal)."""
    w = np.asarray(weight, dtype=np.float32)
    m = expand_mask(mask, n, w.shape[0]).reshape(w.shape[:2] + (1,) * (w.ndim - 2))
    return w * m


def density_of(mask: np.ndarray) -> float:
    mask = np.asarray(mask, dtype=bool)
    return float(mask.sum()) / max(1, mask.size)


def _as_matrix(weight) -> np.ndarray:
    if hasattr(weight, "detach"):
        weight = weight.detach().cpu().numpy()
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim > 2:
        if any(s != 1 for s in w.shape[2:]):
            raise EdgecError(f"SIMD-structured sparsity needs a Linear or 1x1 conv weight, got shape {list(w.shape)}")
        w = w.reshape(w.shape[0], w.shape[1])
    if w.ndim != 2:
        raise EdgecError(f"expected a 2-D weight (out, in), got shape {list(w.shape)}")
    return w


def gathered_blocks(weight, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(idx (nb, k) int64, wb (nb, N, k) float32)`` of the gathered-blocks path; exact for any mask."""
    w = _as_matrix(weight)
    out, inp = w.shape
    mask = np.asarray(mask, dtype=bool)
    nb = n_blocks(out, n)
    if mask.shape != (nb, inp):
        raise EdgecError(f"vector mask shape {list(mask.shape)} does not match a ({out}, {inp}) weight with N={n} "
                         f"(expected [{nb}, {inp}])")
    k = max(1, int(mask.sum(axis=1).max()) if mask.size else 1)
    padded = np.zeros((nb * n, inp), dtype=np.float32)
    padded[:out] = w
    blocks = padded.reshape(nb, n, inp)
    idx = np.zeros((nb, k), dtype=np.int64)
    wb = np.zeros((nb, n, k), dtype=np.float32)
    for b in range(nb):
        kept = np.flatnonzero(mask[b])
        idx[b, : len(kept)] = kept
        wb[b, :, : len(kept)] = blocks[b][:, kept]
    return idx, wb


def simd_nodes(x: str, y: str, weight, mask: np.ndarray, n: int, bias=None, layout: str = "linear",
               prefix: str = "simd"):
    """ONNX nodes and initializers computing ``y = layer(x)`` with the SIMD-masked weight (docs/methods.md#simd-1xn).

    ``layout``: "linear" (x ``(..., in)``, any rank >= 2) or "conv" (1×1 conv, x ``(B, C, *spatial)``, stride 1,
    no padding). Returns ``(nodes, initializers)``; names are made unique with ``prefix``. Meant both for the
    standalone :func:`simd_layer_onnx` and for rewriting a layer inside an exported model.
    """
    w = _as_matrix(weight)
    out, _ = w.shape
    idx, wb = gathered_blocks(w, mask, n)
    nb, k = idx.shape
    p = prefix
    inits = [numpy_helper.from_array(idx, f"{p}.idx"), numpy_helper.from_array(wb, f"{p}.wb")]

    def const(name, values):
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), f"{p}.{name}"))
        return f"{p}.{name}"

    nodes = []
    padded = nb * n != out
    if bias is not None:
        b = bias.detach().cpu().numpy() if hasattr(bias, "detach") else np.asarray(bias)
        b = np.asarray(b, dtype=np.float32).reshape(-1)
        if b.shape != (out,):
            raise EdgecError(f"bias has {b.size} values, the layer has {out} outputs")
    else:
        b = None
    if layout == "linear":
        in_shape = const("in_shape", [-1, w.shape[1]])
        nodes += [
            helper.make_node("Shape", [x], [f"{p}.xshape"], end=-1),
            helper.make_node("Concat", [f"{p}.xshape", const("out_last", [out])], [f"{p}.yshape"], axis=0),
            helper.make_node("Reshape", [x, in_shape], [f"{p}.x2"]),
            helper.make_node("Transpose", [f"{p}.x2"], [f"{p}.xt"], perm=[1, 0]),
            helper.make_node("Gather", [f"{p}.xt", f"{p}.idx"], [f"{p}.xg"], axis=0),  # (nb, k, M)
            helper.make_node("MatMul", [f"{p}.wb", f"{p}.xg"], [f"{p}.yb"]),  # (nb, N, M)
            helper.make_node("Reshape", [f"{p}.yb", const("rows", [nb * n, -1])], [f"{p}.yr"]),
        ]
        last = f"{p}.yr"
        if padded:
            nodes.append(helper.make_node("Slice", [last, const("zero", [0]), const("out", [out]),
                                                    const("axis0", [0])], [f"{p}.ys"]))
            last = f"{p}.ys"
        nodes.append(helper.make_node("Transpose", [last], [f"{p}.yt"], perm=[1, 0]))
        last = f"{p}.yt"
        if b is not None:
            inits.append(numpy_helper.from_array(b, f"{p}.bias"))
            nodes.append(helper.make_node("Add", [last, f"{p}.bias"], [f"{p}.yb2"]))
            last = f"{p}.yb2"
        nodes.append(helper.make_node("Reshape", [last, f"{p}.yshape"], [y]))
    elif layout == "conv":
        nodes += [
            helper.make_node("Shape", [x], [f"{p}.xshape"]),
            helper.make_node("Slice", [f"{p}.xshape", const("s0", [0]), const("s1", [1])], [f"{p}.bdim"]),
            helper.make_node("Slice", [f"{p}.xshape", const("s2", [2]), const("big", [2**62])], [f"{p}.sdims"]),
            helper.make_node("Concat", [f"{p}.bdim", const("out_c", [out]), f"{p}.sdims"], [f"{p}.yshape"], axis=0),
            helper.make_node("Gather", [x, f"{p}.idx"], [f"{p}.xg"], axis=1),  # (B, nb, k, *S)
            helper.make_node("Reshape", [f"{p}.xg", const("g_shape", [0, nb, k, -1])], [f"{p}.xg2"]),
            helper.make_node("MatMul", [f"{p}.wb", f"{p}.xg2"], [f"{p}.yb"]),  # (B, nb, N, S)
            helper.make_node("Reshape", [f"{p}.yb", const("rows", [0, nb * n, -1])], [f"{p}.yr"]),
        ]
        last = f"{p}.yr"
        if padded:
            nodes.append(helper.make_node("Slice", [last, const("zero", [0]), const("out", [out]),
                                                    const("axis1", [1])], [f"{p}.ys"]))
            last = f"{p}.ys"
        if b is not None:
            inits.append(numpy_helper.from_array(b.reshape(out, 1), f"{p}.bias"))
            nodes.append(helper.make_node("Add", [last, f"{p}.bias"], [f"{p}.yb2"]))
            last = f"{p}.yb2"
        nodes.append(helper.make_node("Reshape", [last, f"{p}.yshape"], [y]))
    else:
        raise EdgecError(f"unknown SIMD layout '{layout}' (use 'linear' or 'conv')")
    return nodes, inits


def simd_layer_onnx(weight, mask_vectors: np.ndarray, n: int, bias=None, layout: str | None = None,
                    input_shape=None, opset: int = DEFAULT_OPSET):
    """A one-layer ONNX model ``y = layer(x)`` whose weight has the SIMD mask applied, by the gathered-blocks path.

    ``weight``: ``(out, in)`` (Linear) or ``(out, in, 1[, 1])`` (1×1 conv; ``layout`` defaults from the rank).
    ``mask_vectors``: bool ``(ceil(out / n), in)``. ``input_shape``: the declared input shape (ints, or None
    for a symbolic axis); default ``(None, in)`` / ``(None, in, None)``. Numerically equal (fp32 summation
    order aside) to the dense layer with :func:`masked_weight`.
    """
    w = weight.detach().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight)
    if layout is None:
        layout = "linear" if w.ndim == 2 else "conv"
    inp = w.shape[1]
    if input_shape is None:
        input_shape = (None, inp) if layout == "linear" else (None, inp) + (None,) * max(1, w.ndim - 2)
    nodes, inits = simd_nodes("x", "y", w, mask_vectors, n, bias=bias, layout=layout)
    graph = helper.make_graph(nodes, "simd_layer",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(input_shape))],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgec")
    model.ir_version = min(model.ir_version, 10)
    onnx.checker.check_model(model)
    return model
