"""One decoder block of the Llama family (Llama 2/3, Mistral, Qwen2) in plain torch.

Submodule names follow transformers' decoder layers, so `model.layers.{i}.*` tensors of a checkpoint load
into a block with `load_state_dict` once the prefix is stripped.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockswarm.models.adapters import BlockAdapter, project
from blockswarm.models.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm; computed in fp32 and cast back before the weight, exactly like transformers."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


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

    One instance is shared by all blocks with the same rope settings (see `_shared_rotary`): tables are not
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


def _shared_rotary(config: ModelConfig) -> RotaryEmbedding:
    key = (config.head_dim, config.rope_theta, repr(sorted((config.rope_scaling or {}).items())))
    with _rotary_lock:
        if key not in _rotaries:
            _rotaries[key] = RotaryEmbedding(rope_inverse_frequencies(config))
        return _rotaries[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass
class KVCache:
    """Preallocated keys/values of ONE block for one session: [batch, num_kv_heads, max_length, head_dim]."""

    key: torch.Tensor
    value: torch.Tensor

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype,
        device: str | torch.device,
    ) -> KVCache:
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_length(self) -> int:
        return self.key.shape[2]


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions, an optional KV cache and sliding window."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.sliding_window = config.sliding_window
        qkv_bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        # Llama's attention_bias covers o_proj too; Qwen2 biases q/k/v only
        o_bias = config.attention_bias and config.family == "llama"
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        self.rotary = _shared_rotary(config)

    def forward(
        self, x: torch.Tensor, position: int, cache: KVCache | None, adapter: BlockAdapter | None = None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = project(self.q_proj, x, adapter, "q_proj").view(batch, length, self.num_heads, self.head_dim)
        k = project(self.k_proj, x, adapter, "k_proj").view(batch, length, self.num_kv_heads, self.head_dim)
        v = project(self.v_proj, x, adapter, "v_proj").view(batch, length, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

        cos, sin = self.rotary(position, length, x.device, x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        return project(self.o_proj, self.attend(q, k, v, position, cache), adapter, "o_proj")

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int, cache: KVCache | None
    ) -> torch.Tensor:
        """Attention of rotated q [batch, heads, T, head_dim] over this step's k, v (rotated k) and the cache, if
        any, before o_proj: [batch, T, heads * head_dim]. Shared by one session's pass and a batched tick
        (`models/batching.py`), where each session attends over its own cache."""
        batch, _, length, _ = q.shape
        first_key = position  # absolute position of k[:, :, 0]
        if cache is not None:
            end = position + length
            if end > cache.max_length or cache.key.shape[0] != batch:
                raise ValueError(
                    f"cache holds batch {cache.key.shape[0]} x {cache.max_length} tokens, "
                    f"got batch {batch} at positions [{position}, {end})"
                )
            cache.key[:, :, position:end] = k
            cache.value[:, :, position:end] = v
            # keys older than the sliding window of the first query are never attended: skip them
            first_key = 0 if self.sliding_window is None else max(0, position - self.sliding_window + 1)
            k, v = cache.key[:, :, first_key:end], cache.value[:, :, first_key:end]

        mask, is_causal = self._mask(position, length, first_key, k.shape[2], q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        return out.transpose(1, 2).reshape(batch, length, -1)

    def _mask(
        self, position: int, length: int, first_key: int, num_keys: int, device: torch.device
    ) -> tuple[torch.Tensor | None, bool]:
        """The cheapest way to say "causal (and within the window)": nothing, is_causal, or a boolean mask."""
        last_query = position + length - 1
        window_cuts = self.sliding_window is not None and last_query - first_key >= self.sliding_window
        if not window_cuts and length == 1:
            return None, False  # one query sees every key we kept
        if not window_cuts and first_key == position:
            return None, True  # queries and keys are the same tokens
        query_pos = torch.arange(position, position + length, device=device)[:, None]
        key_pos = torch.arange(first_key, first_key + num_keys, device=device)[None, :]
        mask = key_pos <= query_pos
        if self.sliding_window is not None:
            mask &= key_pos > query_pos - self.sliding_window
        return mask, False


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, adapter: BlockAdapter | None = None) -> torch.Tensor:
        gated = F.silu(project(self.gate_proj, x, adapter, "gate_proj")) * project(self.up_proj, x, adapter, "up_proj")
        return project(self.down_proj, gated, adapter, "down_proj")


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,
        position: int = 0,
        cache: KVCache | None = None,
        adapter: BlockAdapter | None = None,
    ) -> torch.Tensor:
        """hidden [B, T, H] holds tokens at absolute positions position..position+T-1 (same for all rows).

        With a cache: writes this step's k/v at [position, position+T) of the cache and attends over
        [0, position+T) (causal; sliding window if configured). Without a cache: causal attention over the T
        tokens only (positions still start at `position` for rotary). An adapter (a client's deep prompt and
        LoRA) applies to this call only.
        """
        if adapter is not None:
            hidden = adapter.add_prompt(hidden, position)
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), position, cache, adapter)
        return hidden + self.mlp(self.post_attention_layernorm(hidden), adapter)
