"""Log-mel features, written in plain torch (no torchaudio, no librosa), computed in float64.

25 ms Hann window, 10 ms hop, HTK mel filterbank, ``log(E + 1e-6)``, per-utterance normalisation and a fixed
frame count, so every audio folder becomes ``(frames, n_mels)`` float32 tensors. Every parameter: see
docs/methods.md#log-mel-features. ``FEATURE_VERSION`` is part of every cache key: bump it when they change.
"""
from __future__ import annotations

import functools
import math

import torch

FEATURE_VERSION = 2
WIN_MS = 25.0
HOP_MS = 10.0
N_FFT = 512
LOG_EPS = 1e-6
NORM_EPS = 1e-5
NORMALIZE_CHOICES = ("utterance", "bin", "none")


def hz_to_mel(f):
    """HTK mel scale."""
    if isinstance(f, torch.Tensor):
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    return 2595.0 * math.log10(1.0 + f / 700.0)


def mel_to_hz(m):
    if isinstance(m, torch.Tensor):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def frame_params(sample_rate: int) -> tuple[int, int, int]:
    """(win_length, hop_length, n_fft) in samples for a sample rate."""
    win = int(round(WIN_MS / 1000.0 * sample_rate))
    hop = int(round(HOP_MS / 1000.0 * sample_rate))
    n_fft = N_FFT
    while n_fft < win:
        n_fft *= 2
    return win, hop, n_fft


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float64 matrix of triangular HTK-mel filters over 0..sr/2."""
    n_bins = n_fft // 2 + 1
    bin_hz = torch.arange(n_bins, dtype=torch.float64) * sample_rate / n_fft
    mel_pts = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), n_mels + 2, dtype=torch.float64)
    hz_pts = mel_to_hz(mel_pts)
    lower = hz_pts[:-2][None, :]
    centre = hz_pts[1:-1][None, :]
    upper = hz_pts[2:][None, :]
    f = bin_hz[:, None]
    rising = (f - lower) / (centre - lower)
    falling = (upper - f) / (upper - centre)
    fb = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return fb


def mel_centres_hz(sample_rate: int, n_mels: int) -> torch.Tensor:
    """Centre frequency (Hz) of each mel filter."""
    mel_pts = torch.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), n_mels + 2, dtype=torch.float64)
    return mel_to_hz(mel_pts)[1:-1]


def log_mel(wave: torch.Tensor, sample_rate: int = 16000, n_mels: int = 40) -> torch.Tensor:
    """Raw log-mel energies (T, n_mels) float64 of a 1-D waveform (no normalisation, no fixed length)."""
    x = torch.as_tensor(wave, dtype=torch.float64).reshape(-1)
    win, hop, n_fft = frame_params(sample_rate)
    if x.numel() < win:
        x = torch.nn.functional.pad(x, (0, win - x.numel()))
    frames = x.unfold(0, win, hop)  # (T, win)
    window = torch.hann_window(win, periodic=True, dtype=torch.float64)
    spec = torch.fft.rfft(frames * window, n=n_fft, dim=-1)
    power = spec.real**2 + spec.imag**2  # (T, n_fft//2+1)
    mel = power @ mel_filterbank(sample_rate, n_fft, n_mels)
    return torch.log(mel + LOG_EPS)


def normalize_utterance(feat: torch.Tensor, mode: str = "utterance") -> torch.Tensor:
    """Per-utterance normalisation of (T, n_mels) log-mel: "utterance" (scalar), "bin" (CMVN) or "none"."""
    if mode == "none":
        return feat
    if mode == "utterance":
        mean, std = feat.mean(), feat.std(unbiased=False)
    elif mode == "bin":
        mean = feat.mean(dim=0, keepdim=True)
        std = feat.std(dim=0, unbiased=False, keepdim=True)
    else:
        raise ValueError(f"normalize must be one of {NORMALIZE_CHOICES}, not {mode!r}")
    return (feat - mean) / (std + NORM_EPS)


def fix_length(feat: torch.Tensor, frames: int) -> torch.Tensor:
    """Centre-crop, or pad at the end with the utterance's minimum, to exactly `frames` rows."""
    t = feat.shape[0]
    if t > frames:
        start = (t - frames) // 2
        return feat[start : start + frames]
    if t < frames:
        pad = feat.new_full((frames - t, feat.shape[1]), float(feat.min()))
        return torch.cat([feat, pad], dim=0)
    return feat


def compute_features(
    wave: torch.Tensor,
    sample_rate: int = 16000,
    n_mels: int = 40,
    frames: int = 200,
    normalize: str = "utterance",
) -> torch.Tensor:
    """The model input for one utterance: float32 (frames, n_mels)."""
    feat = normalize_utterance(log_mel(wave, sample_rate, n_mels), normalize)
    return fix_length(feat, frames).to(torch.float32).contiguous()


def feature_params(sample_rate: int, n_mels: int, frames: int, normalize: str) -> dict:
    """Every parameter that decides the features, as plain data (for digests and provenance)."""
    win, hop, n_fft = frame_params(sample_rate)
    return {
        "version": FEATURE_VERSION,
        "kind": "log-mel",
        "sample_rate": int(sample_rate),
        "win_length": win,
        "hop_length": hop,
        "n_fft": n_fft,
        "window": "hann(periodic)",
        "n_mels": int(n_mels),
        "mel_scale": "htk",
        "fmin": 0.0,
        "fmax": sample_rate / 2.0,
        "log_eps": LOG_EPS,
        "normalize": normalize,
        "frames": int(frames),
        "crop": "center",
        "pad": "end,utterance-min",
    }
