"""SpeechFormer: statistical-window hierarchical attention (Chen et al., arXiv 2203.03812; SpeechFormer++,
arXiv 2302.14638).

Four stages follow the structure of speech: **frame -> phoneme -> word -> utterance**. In the first three,
each token attends only to a centred window of neighbours whose width comes from statistics of speech; a
merging block (average-pool by the merge scale, Linear to the next width, LayerNorm) turns the tokens of
one stage into the coarser units of the next; the utterance stage uses full attention; the tokens are then
mean-pooled into a linear classifier.

From the papers (their code's ``statistical_information``), in milliseconds and divided by the feature hop:

* ``merge_ms = [50, 250, 1000]``: a token covers a phoneme (50 ms), a word (250 ms), then 1 s after the
  three merges, so the merge scales are 50/hop, 250/50, 1000/250 (5, 5, 4 at the 10 ms hop of edgec's log-mel
  features; ``hop_ms`` is config: 20 for wav2vec-style features);
* ``window_ms = [50, 400, 2000]``: the frame stage attends within a phoneme's duration (50 ms), the phoneme
  stage within a word's (400 ms), the word stage within 2 s; in tokens of each stage 5, 8 and 8, rounded up
  to the next odd number (5, 9, 9) so the window is centred, as the reference code does.
  Integer division as in the reference: ``scale_i = (merge_ms[i] // hop) // (merge_ms[i-1] // hop)``.

Windowed attention is a banded additive mask ``|i - j| <= window // 2`` (0 inside, -inf outside) built with
``arange`` from the sequence length, so fx keeps the length symbolic and the ONNX export has a dynamic time
axis; it is the reference's overlapping (sliding) window mode. Same FLOPs as full attention (the mask
restricts the keys, it does not skip them), a choice: at the lengths of the speech zoo (a few hundred
frames) onnxruntime ran a frame-stage layer about twice as fast this way as with windows gathered from
padded keys (a stack of shifted slices, O(T * window)).

Choices (not from the papers): a Linear embedding of log-mel frames to the first width plus a LayerNorm
and sinusoidal positions once (the reference feeds pre-extracted features and adds positions in every layer
of the first stage); out-of-sequence keys are masked (the reference zero-pads them and keeps them in the
softmax); the last partial pooling window averages only real frames (ceil mode; the reference averages in
zero padding); no repeated input LayerNorm at a stage start (the merge already ends in one); one Linear
head instead of the reference's three-layer MLP; widths, depths, heads and FFN widths (the reference doubles
the width at some merges; here ``dims`` per stage). Layers are post-LN as in the reference:
``x = LN(x + MHSA(x)); x = LN(x + FFN(x))`` with FFN = ``linear2(dropout(act(linear1(x))))``.
``num_classes = 1`` declares a regression task (one output), else classification.
"""
from __future__ import annotations

import torch
from torch import nn

from edgec.models.blocks import FeedForward, MultiHeadSelfAttention, SinusoidalPositionalEncoding, speech_input_spec
from edgec.models.hafformer import Merge


def band_bias(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(T, T) additive attention bias for the tokens of ``x`` (B, T, d): 0 where ``|i - j| <= radius``, else
    -inf. Built from ``arange(T)``, so fx and torch.export keep T symbolic. The diagonal is always inside,
    so no row is fully masked."""
    pos = torch.arange(x.size(1), device=x.device)
    dist = (pos.unsqueeze(1) - pos.unsqueeze(0)).abs()
    return torch.where(dist <= radius, 0.0, float("-inf")).to(x.dtype)


class WindowedSelfAttention(MultiHeadSelfAttention):
    """Multi-head self-attention where each token attends to the keys within ``window // 2`` positions
    (``window`` odd; None: full attention). Same projections (q/k/v/out_proj) as the zoo's attention."""

    def __init__(self, d_model: int, num_heads: int, dropout: float, window: int | None):
        super().__init__(d_model, num_heads, dropout)
        if window is not None and (window < 1 or window % 2 == 0):
            raise ValueError(f"attention window must be a positive odd number of tokens, got {window}")
        self.window = window

    def _mask(self, scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return scores if self.window is None else scores + band_bias(x, self.window // 2)


class SpeechFormerLayer(nn.Module):
    """Post-LN encoder layer with statistical-window attention: ``LN(x + MHSA_w(x))`` then ``LN(x + FFN(x))``."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, window: int | None, dropout: float, act: str):
        super().__init__()
        self.attn = WindowedSelfAttention(d_model, num_heads, dropout, window)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout, act)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.dropout1(self.attn(x)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


def window_statistics(hop_ms: float, merge_ms, window_ms) -> tuple[list[int], list[int]]:
    """(merge scales, attention windows) in tokens of each stage from durations in ms, as the reference code:
    frames = ms // hop; scale_i = merge_i // merge_{i-1}, window_i = window_frames_i // merge_{i-1} (merge_{-1}
    = 1 frame), a window made odd by adding one. Raises ValueError on durations that give an empty scale."""
    merge_ms, window_ms = list(merge_ms), list(window_ms)
    if hop_ms <= 0:
        raise ValueError(f"hop_ms must be positive, got {hop_ms}")
    if len(window_ms) != len(merge_ms):
        raise ValueError(f"need one window per merge (len(window_ms) == len(merge_ms)), got {window_ms}, {merge_ms}")
    scales, windows, last = [], [], 1
    for m, w in zip(merge_ms, window_ms):
        frames, wframes = int(m // hop_ms), int(w // hop_ms)
        scale, window = frames // last, wframes // last
        if scale < 1 or window < 1:
            raise ValueError(f"merge_ms {merge_ms} and window_ms {window_ms} at hop_ms={hop_ms} give a merge scale "
                             f"or window below one token (each duration must be at least the previous merge's)")
        scales.append(scale)
        windows.append(window + 1 - window % 2)
        last = frames
    return scales, windows


class SpeechFormer(nn.Module):
    """Log-mel (B, T, n_mels) -> Linear embed -> LN -> positions -> frame stage (window) -> merge -> phoneme stage
    (window) -> merge -> word stage (window) -> merge -> utterance stage (full attention) -> mean pool -> logits."""

    summary = ("SpeechFormer (arXiv 2203.03812): statistical-window attention, frame/phoneme/word/utterance "
               "stages with merging blocks (~250k params)")

    @staticmethod
    def default_config() -> dict:
        return {
            "n_mels": 40,
            "num_classes": 4,  # 1: a regression output
            "hop_ms": 10,  # frame hop of the input features (edgec log-mel: 10 ms)
            "merge_ms": [50, 250, 1000],  # token duration after each merge: phoneme, word, 1 s (papers' statistics)
            "window_ms": [50, 400, 2000],  # attention span of the frame, phoneme, word stages (papers' statistics)
            "dims": [48, 64, 80, 96],  # width per stage: frame, phoneme, word, utterance (choice)
            "depths": [2, 2, 1, 1],  # layers per stage (choice)
            "num_heads": 4,
            "ffn_mult": 2.0,  # FFN hidden width = ffn_mult * dim (choice)
            "dropout": 0.1,
            "activation": "relu",  # as the reference code
        }

    def __init__(self, n_mels=40, num_classes=4, hop_ms=10, merge_ms=(50, 250, 1000), window_ms=(50, 400, 2000),
                 dims=(48, 64, 80, 96), depths=(2, 2, 1, 1), num_heads=4, ffn_mult=2.0, dropout=0.1,
                 activation="relu"):
        super().__init__()
        dims, depths = list(dims), list(depths)
        scales, windows = window_statistics(hop_ms, merge_ms, window_ms)
        if not (len(dims) == len(depths) == len(scales) + 1):
            raise ValueError(f"need len(dims) == len(depths) == len(merge_ms) + 1, got {dims}, {depths}, "
                             f"{list(merge_ms)}")
        self.n_mels = n_mels
        self.merge_scales = tuple(scales)  # tokens merged between consecutive stages
        self.windows = (*windows, None)  # attention window per stage in its own tokens; None = full
        self.embed = nn.Linear(n_mels, dims[0])
        self.embed_norm = nn.LayerNorm(dims[0])
        self.pos = SinusoidalPositionalEncoding(dims[0])
        self.dropout = nn.Dropout(dropout)
        self.stages = nn.ModuleList(
            nn.Sequential(*(SpeechFormerLayer(d, num_heads, int(round(d * ffn_mult)), w, dropout, activation)
                            for _ in range(n)))
            for d, n, w in zip(dims, depths, self.windows)
        )
        self.merges = nn.ModuleList(Merge(dims[i], dims[i + 1], s) for i, s in enumerate(scales))
        self.classifier = nn.Linear(dims[-1], num_classes)

    def input_spec(self):
        # ceil-mode merges keep at least one token per stage, so even a single frame is valid.
        return speech_input_spec(self.n_mels, time_min=1, time_max=2048, num_classes=self.classifier.out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.stages[0](self.dropout(self.pos(self.embed_norm(self.embed(features)))))
        for merge, stage in zip(self.merges, self.stages[1:]):
            x = stage(merge(x))
        # Every layer ends in LayerNorm, so the pooled vector goes straight to the classifier.
        return self.classifier(x.mean(dim=1))
