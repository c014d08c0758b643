"""One decoder block in plain torch, for every family of `families.py`: Llama 2/3, Mistral, Qwen2, Qwen3, Mixtral
and Qwen3-MoE.

The families differ in small switches read from `ModelConfig`: biases, q/k norms, the sliding window of each
layer, and a mixture of experts in place of the dense MLP. Submodule names follow the checkpoints' tensor names
(one module per expert, named as Qwen-MoE checkpoints name them), so `model.layers.{i}.*` tensors of a checkpoint
load into a block once the prefix is stripped and, for Mixtral, renamed (`families.checkpoint_name`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockswarm.models.adapters import BlockAdapter, project
from blockswarm.models.config import ModelConfig
from blockswarm.models.rotary import rotate_half, shared_rotary


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

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.sliding_window = config.window_of(index)
        qkv_bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary = shared_rotary(config)

    def forward(
        self, x: torch.Tensor, position: int, cache: KVCache | None, adapter: BlockAdapter | None = None
    ) -> torch.Tensor:
        batch, length, _ = x.shape
        q = project(self.q_proj, x, adapter, "q_proj").view(batch, length, self.num_heads, self.head_dim)
        k = project(self.k_proj, x, adapter, "k_proj").view(batch, length, self.num_kv_heads, self.head_dim)
        v = project(self.v_proj, x, adapter, "v_proj").view(batch, length, self.num_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self.position(q, k, *self.rotary(position, length, x.device, x.dtype))
        return project(self.o_proj, self.attend(q, k, v, position, cache), adapter, "o_proj")

    def position(
        self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k (head_dim last, any layout `cos`/`sin` broadcast to), normed per head where the family does it,
        then rotated to their positions. Shared by one session's pass and a batched tick."""
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

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
    """SwiGLU feed-forward: a dense block's MLP, and each expert of a mixture."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, adapter: BlockAdapter | None = None) -> torch.Tensor:
        gated = F.silu(project(self.gate_proj, x, adapter, "gate_proj")) * project(self.up_proj, x, adapter, "up_proj")
        return project(self.down_proj, gated, adapter, "down_proj")


class SparseMoE(nn.Module):
    """A mixture of SwiGLU experts: a router picks `experts_per_token` experts per token (softmax, top-k, and the
    family's renormalization), and each expert runs once over all the tokens routed to it. A shared expert, if the
    config has one, sees every token, scaled by a sigmoid gate (Qwen-MoE). Weighted expert outputs are summed in
    fp32 and rounded once, as transformers does. It accepts a block's adapter and ignores it: LoRA of experts is
    refused upstream (`adapters.lora_shapes`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.normalize = config.experts_per_token, config.normalize_expert_weights
        self.round_weights = config.round_routing_weights
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.expert_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_expert = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def routers(self) -> list[nn.Linear]:
        """The layers that choose and weigh experts (small; quantization leaves them alone)."""
        return [self.gate] + ([self.shared_expert_gate] if self.shared_expert is not None else [])

    def forward(self, x: torch.Tensor, adapter: BlockAdapter | None = None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        probabilities = F.softmax(self.gate(rows), dim=-1, dtype=torch.float32)
        weights, chosen = probabilities.topk(self.top_k, dim=-1)  # [tokens, top_k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(rows.dtype)
        # (token, choice) pairs sorted by expert: each expert's tokens are one contiguous run
        order = chosen.flatten().argsort(stable=True)
        tokens, pair_weights = order // self.top_k, weights.flatten()[order]
        runs = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        out = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
        start = 0
        for expert, count in zip(self.experts, runs):
            if count:
                mine = tokens[start : start + count]
                weighted = expert(rows[mine]) * pair_weights[start : start + count, None]
                out.index_add_(0, mine, weighted.float())
                start += count
        out = out.to(rows.dtype)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return out.view_as(x)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block `index` of a model: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, index: int):
        super().__init__()
        self.family = config.family  # names its tensors in checkpoints (`families.checkpoint_name`)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoE(config) if config.is_moe(index) else MLP(config.hidden_size, config.intermediate_size)

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
