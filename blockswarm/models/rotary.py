"""Rotary position embeddings: inverse frequencies (with Llama-3 or linear scaling) and shared cos/sin tables."""

from __future__ import annotations

import math
import threading

import torch

from blockswarm.models.config import ModelConfig


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies in fp32, with Llama-3 or linear scaling when the config asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / scaling["low_freq_factor"]
    high_freq_wavelen = old_context / scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - scaling["low_freq_factor"]) / (
        scaling["high_freq_factor"] - scaling["low_freq_factor"]
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding:
    """cos/sin tables per (device, dtype), grown by doubling, so a decoding step only slices them.

    One instance is shared by all blocks with the same rope settings (see `shared_rotary`): tables are not
    parameters and must not be duplicated per block or cast by `module.to(dtype)`.
    """

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq
        self.tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self, start: int, length: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [length, head_dim] for positions start..start+length-1."""
        end = start + length
        cos, sin = self.tables.get((device, dtype), (None, None))
        if cos is None or cos.shape[0] < end:
            size = max(256, 1 << (end - 1).bit_length())
            positions = torch.arange(size, device=device, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq.to(device))
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            self.tables[(device, dtype)] = (cos, sin)  # one assignment: safe for concurrent readers
        return cos[start:end], sin[start:end]


_rotary_lock = threading.Lock()
_rotaries: dict[tuple, RotaryEmbedding] = {}


def shared_rotary(config: ModelConfig) -> RotaryEmbedding:
    key = (config.head_dim, config.rope_theta, repr(sorted((config.rope_scaling or {}).items())))
    with _rotary_lock:
        if key not in _rotaries:
            _rotaries[key] = RotaryEmbedding(rope_inverse_frequencies(config))
        return _rotaries[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
