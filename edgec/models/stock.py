"""Traceable stand-ins for torch's stock attention and transformer layers, with the same weights.

torch.fx keeps ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers as single opaque nodes (and their
code does not trace), so no pass could see their linears, FFNs or heads. :func:`rewrite_stock` swaps them,
anywhere in a module tree, for the classes below: same math (checked numerically by
``edgec.models.capture``), same attribute names, written in the style of :mod:`edgec.models.blocks`
(separate ``q_proj``/``k_proj``/``v_proj``/``out_proj``, scores by hand, FFN exactly
``linear2(dropout(activation(linear1(x))))`` so HRF finds it). Only ``in_proj_*`` parameters are renamed.

Padding and the stock encoder's fast path: in eval mode, without autograd, with only a key padding mask
that is left aligned, ``nn.TransformerEncoder`` runs on nested tensors and returns zeros at padded
positions (before its final norm); in training mode it does not. :class:`PaddingZero` (an edgec leaf, so it
reads its own ``training`` flag at run time) reproduces exactly that, so the rewrite matches the stock
encoder in both modes. Inputs must be batched (3-D); unbatched 2-D attention inputs are not supported.
"""
from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from edgec.core.errors import EdgecError
from edgec.core.graph import Leaf


def attention_bias(attn_mask, key_padding_mask, num_heads: int, scores=None):
    """Additive float bias for (batch, heads, L, S) scores from stock-style masks, or None.

    Bool masks mean "masked out" (True → -inf), float masks are added as they are (torch's convention).
    ``attn_mask``: (L, S) or (batch * heads, L, S); ``key_padding_mask``: (batch, S). ``scores`` only for a
    causal mask without ``attn_mask``. Wrapped for fx: the dtype and rank branches run at run time.
    """
    bias = None
    if attn_mask is not None:
        bias = _as_float(attn_mask)
        if bias.dim() == 3:
            bias = bias.unsqueeze(0) if bias.size(0) == 1 else bias.view(-1, num_heads, bias.size(1), bias.size(2))
    elif scores is not None:
        length, source = scores.size(-2), scores.size(-1)
        bias = torch.full((length, source), float("-inf"), dtype=scores.dtype, device=scores.device).triu(1)
    if key_padding_mask is not None:
        pad = _as_float(key_padding_mask)
        pad = pad.view(pad.size(0), 1, 1, pad.size(1))
        bias = pad if bias is None else bias + pad
    return bias


def _as_float(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(mask, float("-inf"))
    return mask


torch.fx.wrap("attention_bias")


class MultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (no bias_kv, no zero_attn) with separate projections; same forward signature."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, batch_first
        self.head_dim = embed_dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def from_stock(cls, m: nn.MultiheadAttention, path: str = "") -> MultiheadAttention:
        if m.bias_k is not None or m.add_zero_attn:
            what = "add_bias_kv=True" if m.bias_k is not None else "add_zero_attn=True"
            raise EdgecError(f"{path or 'model'}: nn.MultiheadAttention with {what} is not supported by the "
                             "capture rewrite; build the layer without it")
        new = cls(m.embed_dim, m.num_heads, m.dropout, m.in_proj_bias is not None, m.kdim, m.vdim, m.batch_first)
        with torch.no_grad():
            if m._qkv_same_embed_dim:
                weights = m.in_proj_weight.chunk(3)
            else:
                weights = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
            biases = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None,) * 3
            for proj, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(w)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.load_state_dict(m.out_proj.state_dict())
        return new.train(m.training).to(m.out_proj.weight.device)

    def _heads(self, x: torch.Tensor, batch) -> torch.Tensor:
        return x.view(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch = query.size(0)
        q = self._heads(self.q_proj(query), batch)
        k = self._heads(self.k_proj(key), batch)
        v = self._heads(self.v_proj(value), batch)
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        if attn_mask is not None or key_padding_mask is not None or is_causal:
            causal_ref = scores if (is_causal and attn_mask is None) else None
            scores = scores + attention_bias(attn_mask, key_padding_mask, self.num_heads, causal_ref)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, -1, self.embed_dim)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        # As the stock layer: the weights after dropout, averaged over heads unless asked otherwise.
        return out, probs.mean(dim=1) if average_attn_weights else probs


def _ff_block(layer, x):
    return layer.linear2(layer.dropout(layer.activation(layer.linear1(x))))


def _copy_common(new: nn.Module, m: nn.Module, path: str, memo: dict, rewrites: list) -> None:
    """Move the stock layer's shared submodules (linears, norms, dropouts, activation) onto ``new``."""
    for name in ("linear1", "dropout", "linear2", "norm1", "norm2", "norm3", "dropout1", "dropout2", "dropout3"):
        if hasattr(m, name):
            setattr(new, name, getattr(m, name))
    new.activation = m.activation  # a function (F.relu/F.gelu from a string) or a module, as in the stock layer
    new.norm_first = m.norm_first
    new.self_attn = convert(m.self_attn, f"{path}.self_attn", memo, rewrites)
    if hasattr(m, "multihead_attn"):
        new.multihead_attn = convert(m.multihead_attn, f"{path}.multihead_attn", memo, rewrites)


class EncoderLayer(nn.Module):
    """``nn.TransformerEncoderLayer`` with a traceable attention; same attribute names and forward signature."""

    @classmethod
    def from_stock(cls, m, path="", memo=None, rewrites=None) -> EncoderLayer:
        new = cls()
        _copy_common(new, m, path, {} if memo is None else memo, [] if rewrites is None else rewrites)
        return new.train(m.training)

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False):
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self.dropout2(_ff_block(self, self.norm2(x)))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self.dropout2(_ff_block(self, x)))


class DecoderLayer(nn.Module):
    """``nn.TransformerDecoderLayer`` with traceable attentions; same attribute names and forward signature."""

    @classmethod
    def from_stock(cls, m, path="", memo=None, rewrites=None) -> DecoderLayer:
        new = cls()
        _copy_common(new, m, path, {} if memo is None else memo, [] if rewrites is None else rewrites)
        return new.train(m.training)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False):
        def sa(x):
            return self.dropout1(self.self_attn(x, x, x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                                need_weights=False, is_causal=tgt_is_causal)[0])

        def mha(x):
            return self.dropout2(self.multihead_attn(x, memory, memory, attn_mask=memory_mask,
                                                     key_padding_mask=memory_key_padding_mask,
                                                     need_weights=False, is_causal=memory_is_causal)[0])

        x = tgt
        if self.norm_first:
            x = x + sa(self.norm1(x))
            x = x + mha(self.norm2(x))
            return x + self.dropout3(_ff_block(self, self.norm3(x)))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + mha(x))
        return self.norm3(x + self.dropout3(_ff_block(self, x)))


class PaddingZero(Leaf):
    """The stock encoder's nested-tensor fast path, as a value: zeros at padded positions, in eval mode only.

    Applies when the stock encoder would take that path (module docstring): not training, no autograd
    through the output, fast path enabled, and (with ``mask_check``) every row's padding at its end.
    """

    def __init__(self, batch_first: bool, mask_check: bool):
        super().__init__()
        self.batch_first, self.mask_check = batch_first, mask_check

    def forward(self, output, key_padding_mask):
        if self.training or (torch.is_grad_enabled() and output.requires_grad):
            return output
        if not torch.backends.mha.get_fastpath_enabled():
            return output
        padded = key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask != 0
        keep = ~padded
        if self.mask_check:  # left aligned: no kept position after a padded one, in any row
            aligned = ~(keep[:, 1:] & ~keep[:, :-1]).any()
            padded = padded & aligned
        padded = padded.unsqueeze(-1) if self.batch_first else padded.transpose(0, 1).unsqueeze(-1)
        return output.masked_fill(padded, 0.0)


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` over :class:`EncoderLayer` s; ``layers`` and ``norm`` keep their names."""

    @classmethod
    def from_stock(cls, m, path="", memo=None, rewrites=None) -> Encoder:
        new, memo, rewrites = cls(), {} if memo is None else memo, [] if rewrites is None else rewrites
        new.layers = nn.ModuleList(convert(layer, f"{path}.layers.{i}", memo, rewrites)
                                   for i, layer in enumerate(m.layers))
        new.num_layers, new.norm = m.num_layers, m.norm
        first = m.layers[0]
        new.pad_zero = None
        if getattr(m, "use_nested_tensor", False):
            new.pad_zero = PaddingZero(first.self_attn.batch_first, getattr(m, "mask_check", True))
        return new.train(m.training)

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                         is_causal=bool(is_causal))
        if self.pad_zero is not None and src_key_padding_mask is not None and mask is None:
            output = self.pad_zero(output, src_key_padding_mask)
        if self.norm is not None:
            output = self.norm(output)
        return output


class Decoder(nn.Module):
    """``nn.TransformerDecoder`` over :class:`DecoderLayer` s; ``layers`` and ``norm`` keep their names."""

    @classmethod
    def from_stock(cls, m, path="", memo=None, rewrites=None) -> Decoder:
        new, memo, rewrites = cls(), {} if memo is None else memo, [] if rewrites is None else rewrites
        new.layers = nn.ModuleList(convert(layer, f"{path}.layers.{i}", memo, rewrites)
                                   for i, layer in enumerate(m.layers))
        new.num_layers, new.norm = m.num_layers, m.norm
        return new.train(m.training)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal: bool = False):
        output = tgt
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return self.norm(output) if self.norm is not None else output


STOCK = {
    nn.MultiheadAttention: MultiheadAttention,
    nn.TransformerEncoderLayer: EncoderLayer,
    nn.TransformerEncoder: Encoder,
    nn.TransformerDecoderLayer: DecoderLayer,
    nn.TransformerDecoder: Decoder,
}


def convert(m: nn.Module, path: str, memo: dict, rewrites: list) -> nn.Module:
    """``m`` itself, or its stand-in when it is exactly a stock layer (shared layers converted once)."""
    new_cls = STOCK.get(type(m))
    if new_cls is None:
        return m
    if id(m) not in memo:
        if new_cls is MultiheadAttention:
            memo[id(m)] = new_cls.from_stock(m, path)
        else:
            memo[id(m)] = new_cls.from_stock(m, path, memo, rewrites)
        rewrites.append({"module": path, "from": type(m).__name__, "to": f"{__name__}.{new_cls.__name__}"})
    return memo[id(m)]


def rewrite_stock(root: nn.Module) -> tuple[nn.Module, list, dict]:
    """Replace every stock layer under ``root`` in place; ``(root, rewrites, name_map)``.

    ``name_map``: old parameter name → new names, only for renamed parameters (``in_proj_*``, ``*_proj_weight``).
    """
    if type(root) in STOCK:
        raise EdgecError(f"the model itself is a stock {type(root).__name__}; wrap it in your own nn.Module "
                         "(its forward says which inputs it takes) and capture that")
    memo, rewrites = {}, []
    before = {name for name, _ in root.named_parameters(remove_duplicate=False)}
    _rewrite_children(root, "", memo, rewrites)
    rewrites.sort(key=lambda r: r["module"])
    return root, rewrites, _name_map(before, rewrites)


def _rewrite_children(module: nn.Module, prefix: str, memo: dict, rewrites: list) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        if type(child) in STOCK:
            setattr(module, name, convert(child, path, memo, rewrites))
        else:
            _rewrite_children(child, f"{path}.", memo, rewrites)


def _name_map(before: set, rewrites: list) -> dict:
    renamed = {"in_proj_weight": ("weight", "qkv"), "in_proj_bias": ("bias", "qkv"),
               "q_proj_weight": ("weight", "q"), "k_proj_weight": ("weight", "k"), "v_proj_weight": ("weight", "v")}
    out = {}
    for r in rewrites:
        if r["from"] != "MultiheadAttention":
            continue
        for old, (kind, which) in renamed.items():
            if f"{r['module']}.{old}" in before:
                out[f"{r['module']}.{old}"] = [f"{r['module']}.{p}_proj.{kind}" for p in which]
    return dict(sorted(out.items()))
