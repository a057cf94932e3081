"""LW-DETR: a light-weight detection transformer (Chen et al., arXiv 2406.03459).

The paper's parts, written so that torch.fx traces them, the passes see plain Linear/Conv layers and the
graph exports to ONNX (opset >= 16 for GridSample):

* **Encoder**: a plain ViT. A patch-embedding conv (stride = patch), learned position embeddings added once,
  then pre-norm blocks ``x + MHSA(LN x)``, ``x + MLP(LN x)`` with the MLP plain ``Linear -> GELU -> Linear``
  (edgec.models.blocks.FeedForward, so HRF applies). Blocks interleave *window* and *global* attention
  (``global_blocks``: the indices of global blocks; the rest are window blocks).
* **Window-major feature map** (the paper's "efficient" organisation): right after the patch embedding the token
  map is reshaped ONCE into windows, ``(B, nW, h, nW, w, C) -> (B*nW*nW, h*w, C)``. A window block attends
  within each row of that tensor (no reshape at all); a global block views it as ``(B, nW*nW*h*w, C)`` and
  attends across all tokens without permuting back: attention is permutation-invariant once the position
  embeddings are added, so the window-major order gives the same result as raster order, up to the same
  permutation of the output tokens. The layout is undone only where a spatial map is needed (the projector).
* **Multi-level feature aggregation**: the outputs of the encoder blocks in ``out_indices`` are concatenated
  channel-wise, un-permuted into a map and resampled to each of ``scales`` (1.0: as is; 0.5: a stride-2 conv;
  2.0: a stride-2 transposed conv), then a C2f-style projector per scale (1x1 conv -> split in two -> ``n``
  bottlenecks of two 3x3 convs on the second half, each output kept -> concat -> 1x1 conv; every conv followed
  by a LayerNorm over channels and SiLU, as the paper's ConvX) maps it to the decoder width.
* **Decoder**: a shallow DETR decoder (post-norm, ``decoder_layers``) over learned queries: a content
  embedding and a reference box (cx, cy, w, h; stored as logits) per query. Each layer: self-attention
  among the queries *of one group*, multi-scale deformable cross-attention (Zhu et al., arXiv 2010.04159)
  written with ``F.grid_sample`` (sampling points = reference centre + offsets * reference size / (2 points);
  bilinear, zero padding, ``align_corners=False``), an FFN, and iterative box refinement
  (``ref <- sigmoid(box_head_l(x) + logit(ref))``). Heads: ``num_classes`` sigmoid logits (no background
  class) and the last refined boxes (cxcywh in [0, 1]).
* **Group DETR** (Chen et al., arXiv 2207.13085): ``groups`` independent query groups at training time, only
  group 0 at inference. The switch lives in :class:`QueryGroups`, an fx leaf whose forward reads
  ``self.training``; the decoder's self-attention splits the queries into groups by reshaping to
  ``(-1, num_queries, d)``, so the number of groups comes from the tensor, never from a Python bool.

Choices (not the paper's): images are taken in [0, 1] and normalised inside the model with the ImageNet mean/std
(constants, not parameters); the tiny default has one scale (the paper's small models use one as well, its
larger ones two: ``scales`` [2.0, 0.5]); queries are learned (the paper uses two-stage mixed query selection);
the query position embedding is an MLP of the reference box (not of its sine embedding); only the last decoder
layer's outputs are returned (no auxiliary outputs: the contract is two tensors), so, unlike Deformable DETR,
the reference boxes are not detached between layers (it detaches them because every layer has its own loss;
here the last layer's loss must reach the earlier box heads through the refinement chain); one box head and one
query-position MLP per layer (each called once, so passes can rewrite each on its own).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgec.core.graph import Leaf
from edgec.core.spec import Dim, InputSpec, TensorSpec
from edgec.models.blocks import FeedForward, MultiHeadSelfAttention

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- window-major layout --------------------------------------------------------------------------------

def to_windows(x: torch.Tensor, n_win: int) -> torch.Tensor:
    """(B, H, W, C) raster map -> (B*n_win*n_win, h*w, C) window-major tokens (h = H/n_win, w = W/n_win)."""
    _, height, width, c = x.shape
    h, w = height // n_win, width // n_win
    x = x.reshape(-1, n_win, h, n_win, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h * w, c)


def from_windows(x: torch.Tensor, n_win: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`, to a channels-first map: (B*n_win^2, h*w, C) -> (B, C, H, W)."""
    c = x.shape[-1]
    h, w = height // n_win, width // n_win
    x = x.reshape(-1, n_win, n_win, h, w, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(-1, c, height, width)


class ViTBlock(nn.Module):
    """Pre-norm ``x + MHSA(LN x)``, ``x + FFN(LN x)`` over window-major tokens (B*nW^2, h*w, C). A window block
    attends within each row; a global block views the rows of one image as one sequence (no permutation)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, windows: int, is_global: bool, dropout: float):
        super().__init__()
        self.windows = windows
        self.is_global = is_global
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, int(round(dim * mlp_ratio)), dropout, "gelu")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, tokens, c = x.shape
        if self.is_global:  # (B*nW^2, hw, C) -> (B, nW^2*hw, C): all windows of one image, in window-major order
            x = x.reshape(-1, self.windows * self.windows * tokens, c)
        x = x + self.dropout(self.attn(self.norm1(x)))
        x = x + self.dropout(self.ffn(self.norm2(x)))
        if self.is_global:
            x = x.reshape(-1, tokens, c)
        return x


# --- projector ---------------------------------------------------------------------------------------------

class ChannelNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (permute, nn.LayerNorm, permute back: traces and
    exports as a plain LayerNormalization)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvX(nn.Module):
    """Conv2d (no bias) -> LayerNorm over channels -> SiLU (the paper's ConvX)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.norm = ChannelNorm(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Bottleneck(nn.Module):
    """``x + cv2(cv1(x))`` with two 3x3 ConvX."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1 = ConvX(c, c, 3)
        self.cv2 = ConvX(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP bottleneck with two convolutions (YOLOv8's C2f): ``cv1`` (1x1) to 2c, split into halves (a, b), ``n``
    bottlenecks chained on b, then ``cv2`` (1x1) over concat(a, b, every bottleneck output)."""

    def __init__(self, c_in: int, c_out: int, n: int, expansion: float = 0.5):
        super().__init__()
        self.hidden = c = max(1, int(c_out * expansion))
        self.cv1 = ConvX(c_in, 2 * c, 1)
        self.blocks = nn.ModuleList(Bottleneck(c) for _ in range(n))
        self.cv2 = ConvX((2 + n) * c, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        parts = [y[:, : self.hidden], y[:, self.hidden:]]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class Resample(nn.Module):
    """To one output scale of the stride-``patch`` map: 1.0 identity, 0.5 stride-2 conv + LN, 2.0 stride-2
    transposed conv + LN."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        if scale == 1.0:
            self.layer = nn.Identity()
        elif scale == 0.5:
            self.layer = nn.Sequential(nn.Conv2d(channels, channels, 3, 2, 1, bias=False), ChannelNorm(channels))
        elif scale == 2.0:
            self.layer = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, 2, bias=False), ChannelNorm(channels))
        else:
            raise ValueError(f"LW-DETR scales must be 0.5, 1.0 or 2.0, got {scale}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


# --- decoder -------------------------------------------------------------------------------------------------

def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


class QueryGroups(Leaf):
    """Learned queries for ``groups`` Group-DETR groups of ``num_queries`` each: content (G*Q, d) and reference
    box logits (G*Q, 4). One fx node: in training mode it returns every group, in eval mode group 0 only, each
    expanded to the batch of ``like``: ``(content (B, N, d), reference boxes (B, N, 4) in [0, 1])``."""

    def __init__(self, num_queries: int, groups: int, dim: int):
        super().__init__()
        self.num_queries, self.groups = num_queries, groups
        self.content = nn.Parameter(torch.randn(groups * num_queries, dim) * 0.02)
        # Reference boxes: centres uniform in (0.05, 0.95), sizes about 0.2 (stored as logits).
        centres = torch.rand(groups * num_queries, 2) * 0.9 + 0.05
        sizes = torch.full((groups * num_queries, 2), 0.2)
        self.refpoints = nn.Parameter(inverse_sigmoid(torch.cat([centres, sizes], dim=1)))

    def forward(self, like: torch.Tensor):
        n = self.groups * self.num_queries if self.training else self.num_queries
        batch = like.shape[0]
        content = self.content[:n].unsqueeze(0).expand(batch, -1, -1)
        ref = self.refpoints[:n].sigmoid().unsqueeze(0).expand(batch, -1, -1)
        return content, ref


class GroupSelfAttention(nn.Module):
    """Self-attention within each query group: (B, G*Q, d) -> (B*G, Q, d) -> MHSA -> (B, G*Q, d). G comes from
    the tensor's length, so the same graph serves training (G groups) and inference (one)."""

    def __init__(self, dim: int, num_heads: int, num_queries: int, dropout: float):
        super().__init__()
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, G*Q, d) -> (B*G, H, Q, d_head)
        return x.reshape(-1, self.num_queries, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, n, d = value.shape
        q = self._heads(self.q_proj(query))
        k = self._heads(self.k_proj(query))
        v = self._heads(self.v_proj(value))
        attn = self.attn_dropout(torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(batch, n, self.num_heads * self.head_dim)
        return self.out_proj(out)


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention (Zhu et al., arXiv 2010.04159) with ``F.grid_sample``.

    ``value_proj`` over the memory; per query ``sampling_offsets`` (H*L*P*2) and ``attention_weights`` (H*L*P,
    softmax over L*P per head); location = ref centre + offset / P * ref size / 2; grid = 2*location - 1;
    bilinear sampling with zero padding and ``align_corners=False``; weighted sum; ``output_proj``."""

    def __init__(self, dim: int, num_heads: int, levels: list[tuple[int, int]], points: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim, self.points = num_heads, dim // num_heads, points
        self.levels = [tuple(hw) for hw in levels]
        n_lvl = len(self.levels)
        self.sampling_offsets = nn.Linear(dim, num_heads * n_lvl * points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * n_lvl * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        with torch.no_grad():  # Deformable DETR's init: offsets start on rings around the reference, per head
            self.sampling_offsets.weight.zero_()
            theta = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
            grid = torch.stack([theta.cos(), theta.sin()], -1)
            grid = grid / grid.abs().max(-1, keepdim=True)[0]
            grid = grid.view(num_heads, 1, 1, 2).repeat(1, n_lvl, points, 1)
            grid = grid * torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
            self.attention_weights.weight.zero_()
            self.attention_weights.bias.zero_()

    def forward(self, query: torch.Tensor, ref: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        batch, n_q, d = query.shape
        heads, hd, points, n_lvl = self.num_heads, self.head_dim, self.points, len(self.levels)
        value = self.value_proj(memory)  # (B, sum HW, d)
        offsets = self.sampling_offsets(query).reshape(batch, n_q, heads, n_lvl, points, 2)
        weights = self.attention_weights(query).reshape(batch, n_q, heads, n_lvl * points).softmax(-1)
        weights = weights.reshape(batch, n_q, heads, n_lvl, points)
        centre = ref[:, :, None, None, None, :2]
        size = ref[:, :, None, None, None, 2:]
        grids = 2.0 * (centre + offsets * (size * (0.5 / points))) - 1.0  # (B, Nq, H, L, P, 2)
        out = None
        start = 0
        for lvl, (h, w) in enumerate(self.levels):
            v = value[:, start:start + h * w].reshape(batch, h * w, heads, hd).permute(0, 2, 3, 1)
            v = v.reshape(batch * heads, hd, h, w)
            g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(batch * heads, n_q, points, 2)
            sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
            wl = weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(batch * heads, 1, n_q, points)
            part = (sampled * wl).sum(-1)  # (B*H, hd, Nq)
            out = part if out is None else out + part
            start += h * w
        out = out.reshape(batch, heads * hd, n_q).transpose(1, 2)
        return self.output_proj(out)


class DecoderLayer(nn.Module):
    """Post-norm: ``x = LN(x + SA_group(x + pos))``, ``x = LN(x + DeformCA(x + pos, ref, memory))``,
    ``x = LN(x + FFN(x))``."""

    def __init__(self, dim: int, num_heads: int, num_queries: int, ffn_dim: int, levels, points: int,
                 dropout: float):
        super().__init__()
        self.self_attn = GroupSelfAttention(dim, num_heads, num_queries, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = DeformableAttention(dim, num_heads, levels, points)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, dropout, "relu")
        self.norm3 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x, pos, ref, memory):
        x = self.norm1(x + self.dropout1(self.self_attn(x + pos, x)))
        x = self.norm2(x + self.dropout2(self.cross_attn(x + pos, ref, memory)))
        return self.norm3(x + self.dropout3(self.ffn(x)))


class MLP(nn.Module):
    """``Linear -> ReLU -> ... -> Linear`` (DETR's box head)."""

    def __init__(self, d_in: int, hidden: int, d_out: int, layers: int):
        super().__init__()
        dims = [d_in] + [hidden] * (layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.acts = nn.ModuleList(nn.ReLU() for _ in range(layers - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip(self.layers[:-1], self.acts):
            x = act(layer(x))
        return self.layers[-1](x)


# --- the model -------------------------------------------------------------------------------------------------

class LWDETR(nn.Module):
    """Image (B, 3, S, S) in [0, 1] -> ViT (window-major, interleaved window/global attention) -> multi-level
    aggregation -> C2f projector(s) -> DETR decoder with deformable cross-attention -> (logits (B, N, C),
    boxes (B, N, 4) cxcywh in [0, 1]); N = groups * num_queries in training mode, num_queries in eval mode."""

    summary = ("LW-DETR (arXiv 2406.03459): ViT with window-major interleaved window/global attention, C2f "
               "projector, deformable DETR decoder, Group DETR (~0.4M params, 96 px)")

    @staticmethod
    def default_config() -> dict:
        return {
            "image_size": 96,  # static input size S (square)
            "num_classes": 5,  # the detection fixture's shapes
            "patch_size": 8,  # token grid S/patch = 12
            "windows": 2,  # nW: windows per side (12/2 = 6x6 tokens per window)
            "embed_dim": 64,
            "depth": 4,
            "num_heads": 4,
            "mlp_ratio": 2.0,
            "global_blocks": [1, 3],  # global attention in these blocks, window attention in the others
            "out_indices": [1, 3],  # blocks whose outputs are aggregated (concatenated channel-wise)
            "scales": [1.0],  # projector output scales relative to the token grid (0.5, 1.0, 2.0)
            "c2f_blocks": 1,  # bottlenecks per C2f projector
            "dim": 64,  # decoder width
            "decoder_layers": 3,
            "decoder_heads": 4,
            "decoder_ffn": 128,
            "points": 4,  # sampling points per head and level
            "num_queries": 20,
            "groups": 3,  # Group DETR groups at training time
            "dropout": 0.0,
        }

    def __init__(self, image_size=96, num_classes=5, patch_size=8, windows=2, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=2.0, global_blocks=(1, 3), out_indices=(1, 3), scales=(1.0,), c2f_blocks=1, dim=64,
                 decoder_layers=3, decoder_heads=4, decoder_ffn=128, points=4, num_queries=20, groups=3,
                 dropout=0.0):
        super().__init__()
        sizes = {"image_size": image_size, "num_classes": num_classes, "patch_size": patch_size, "windows": windows,
                 "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "dim": dim,
                 "decoder_layers": decoder_layers, "decoder_heads": decoder_heads, "decoder_ffn": decoder_ffn,
                 "points": points, "num_queries": num_queries, "groups": groups}
        bad = [k for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be an integer >= 1")
        grid = image_size // patch_size
        if image_size % patch_size or grid % windows:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}, and the token "
                             f"grid {grid} a multiple of windows {windows}")
        if embed_dim % num_heads or dim % decoder_heads:
            raise ValueError("embed_dim / dim must be divisible by num_heads / decoder_heads")
        out_indices, global_blocks, scales = list(out_indices), list(global_blocks), [float(s) for s in scales]
        if c2f_blocks < 0 or not mlp_ratio > 0.0 or not 0.0 <= dropout < 1.0:
            raise ValueError("c2f_blocks must be >= 0, mlp_ratio > 0 and dropout in [0, 1)")
        if not out_indices or any(not 0 <= i < depth for i in out_indices + global_blocks):
            raise ValueError(f"out_indices {out_indices} and global_blocks {global_blocks} must name encoder blocks "
                             f"0..{depth - 1} (out_indices at least one)")
        if not scales or any(s * grid != int(s * grid) or s * grid < 1 for s in scales):
            raise ValueError(f"scales {scales} must give whole feature maps from the {grid}x{grid} token grid")
        self.image_size, self.patch_size, self.windows, self.grid = image_size, patch_size, windows, grid
        self.num_classes, self.num_queries, self.groups = num_classes, num_queries, groups
        self.out_indices = out_indices
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, grid, grid, embed_dim) * 0.02)
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, windows, i in global_blocks, dropout) for i in range(depth))
        c_cat = embed_dim * len(out_indices)
        self.levels = [(int(s * grid), int(s * grid)) for s in scales]
        self.resample = nn.ModuleList(Resample(c_cat, s) for s in scales)
        self.projector = nn.ModuleList(nn.Sequential(C2f(c_cat, dim, c2f_blocks), ChannelNorm(dim)) for _ in scales)
        self.queries = QueryGroups(num_queries, groups, dim)
        self.query_pos = nn.ModuleList(MLP(4, dim, dim, 2) for _ in range(decoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, decoder_heads, num_queries, decoder_ffn, self.levels, points, dropout)
            for _ in range(decoder_layers))
        self.box_heads = nn.ModuleList(MLP(dim, dim, 4, 3) for _ in range(decoder_layers))
        self.class_head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            nn.init.constant_(self.class_head.bias, -math.log((1 - 0.01) / 0.01))  # prior 0.01 (focal-loss init)
            for head in self.box_heads:
                head.layers[-1].weight.zero_()
                head.layers[-1].bias.zero_()

    def input_spec(self):
        s = self.image_size
        batch = Dim("batch", example=2, alt=3, min=1, max=1024)
        return InputSpec(
            inputs=(TensorSpec("image", (batch, 3, s, s)),),
            outputs=("logits", "boxes"),
            task="detection",
            extra={"image_size": s, "num_classes": self.num_classes, "queries": self.num_queries,
                   "groups": self.groups, "box_format": "cxcywh", "image_range": "[0, 1]"},
        )

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The projector outputs, one (B, dim, h_l, w_l) map per scale."""
        x = self.patch_embed((image - self.mean) / self.std)  # (B, C, g, g)
        x = x.permute(0, 2, 3, 1) + self.pos_embed  # raster (B, g, g, C), positions added once
        x = to_windows(x, self.windows)  # the one reshape into windows
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.out_indices:
                feats.append(x)
        x = from_windows(torch.cat(feats, dim=-1), self.windows, self.grid, self.grid)
        return [proj(res(x)) for res, proj in zip(self.resample, self.projector)]

    def forward(self, image: torch.Tensor):
        maps = self.encode(image)
        memory = torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)  # (B, sum HW, dim)
        queries = self.queries(memory)
        x, ref = queries[0], queries[1]
        for i, layer in enumerate(self.decoder):
            x = layer(x, self.query_pos[i](ref), ref, memory)
            ref = torch.sigmoid(self.box_heads[i](x) + inverse_sigmoid(ref))
        return self.class_head(x), ref
