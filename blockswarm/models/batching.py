"""One block's step for several sessions at once: the decode ticks of continuous batching.

Decoding one token reads every weight of the block for a few multiply-adds per weight, so a peer serving many
sessions is bound by memory bandwidth. Stacking the sessions' rows makes each projection and the MLP one matmul
over all of them; only attention stays per session, since each one attends over its own KV cache (and its own
sliding window). A session's deep prompt and LoRA apply to its own rows only, so sessions with different
adapters share the base matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blockswarm.models.adapters import BlockAdapter
from blockswarm.models.block import MLP, KVCache, TransformerBlock


@dataclass
class SessionRows:
    """One session's input to one block in a tick: hidden [batch, T, hidden] at positions position..position+T-1."""

    hidden: torch.Tensor
    position: int
    cache: KVCache
    adapter: BlockAdapter | None = None

    @property
    def num_tokens(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]


def step_block(block: TransformerBlock, sessions: list[SessionRows]) -> list[torch.Tensor]:
    """The block's outputs for each session, equal (up to matmul rounding) to running it for each one alone.

    A lone session runs the block's own forward, so a tick of one session is exactly that session's step.
    """
    if len(sessions) == 1:
        only = sessions[0]
        return [block(only.hidden, position=only.position, cache=only.cache, adapter=only.adapter)]
    hiddens = [s.hidden if s.adapter is None else s.adapter.add_prompt(s.hidden, s.position) for s in sessions]
    rows = torch.cat([hidden.reshape(-1, hidden.shape[-1]) for hidden in hiddens])  # [tokens of all, hidden]
    rows = rows + _attention(block, block.input_layernorm(rows), sessions)
    rows = rows + _feed_forward(block.mlp, block.post_attention_layernorm(rows), sessions)
    return [piece.view_as(s.hidden) for piece, s in zip(_split(rows, sessions), sessions)]


def _attention(block: TransformerBlock, normed: torch.Tensor, sessions: list[SessionRows]) -> torch.Tensor:
    """Batched q/k/v and o projections around a per-session attention over each session's own cache."""
    attn = block.self_attn
    q = _project(attn.q_proj, normed, sessions, "q_proj").view(-1, attn.num_heads, attn.head_dim)
    k = _project(attn.k_proj, normed, sessions, "k_proj").view(-1, attn.num_kv_heads, attn.head_dim)
    v = _project(attn.v_proj, normed, sessions, "v_proj").view(-1, attn.num_kv_heads, attn.head_dim)
    positions = torch.cat(
        [
            torch.arange(s.position, s.position + s.hidden.shape[1], device=normed.device).repeat(s.hidden.shape[0])
            for s in sessions
        ]
    )
    end = max(s.position + s.hidden.shape[1] for s in sessions)
    cos, sin = attn.rotary(0, end, normed.device, normed.dtype)
    cos, sin = cos[positions][:, None], sin[positions][:, None]  # [tokens, 1, head_dim]: per-row positions
    q, k = attn.position(q, k, cos, sin)

    outputs = []
    for s, q_s, k_s, v_s in zip(sessions, _split(q, sessions), _split(k, sessions), _split(v, sessions)):
        batch, length = s.hidden.shape[:2]
        q_s, k_s, v_s = (t.reshape(batch, length, *t.shape[1:]).transpose(1, 2) for t in (q_s, k_s, v_s))
        outputs.append(attn.attend(q_s, k_s, v_s, s.position, s.cache).reshape(batch * length, -1))
    return _project(attn.o_proj, torch.cat(outputs), sessions, "o_proj")


def _feed_forward(mlp: nn.Module, normed: torch.Tensor, sessions: list[SessionRows]) -> torch.Tensor:
    """A dense MLP with each session's LoRA on its rows; a mixture of experts (which takes no LoRA) as it is."""
    if not isinstance(mlp, MLP):
        return mlp(normed)
    gated = F.silu(_project(mlp.gate_proj, normed, sessions, "gate_proj")) * _project(
        mlp.up_proj, normed, sessions, "up_proj"
    )
    return _project(mlp.down_proj, gated, sessions, "down_proj")


def _project(linear: nn.Module, rows: torch.Tensor, sessions: list[SessionRows], name: str) -> torch.Tensor:
    """`linear` over all rows in one matmul, plus each session's LoRA delta on its own rows."""
    out = _linear(linear, rows)
    offset = 0
    for s in sessions:
        end = offset + s.num_tokens
        if s.adapter is not None and name in s.adapter.lora:
            down, up = s.adapter.lora[name]
            piece = rows[offset:end]
            delta = F.linear(F.linear(piece, down.to(piece.dtype)), up.to(piece.dtype))
            out[offset:end] = out[offset:end] + s.adapter.lora_scale * delta
        offset = end
    return out


def _linear(linear: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """`linear(rows)`; for 2 to 4 rows of a plain fp32 layer on the CPU, as weight @ rows^T: MKL's kernel for a few
    rows reads the weight once, where `F.linear` takes about twice the time of one row (measured: 6 medium blocks,
    2 rows 41 -> 19 ms, 4 rows 38 -> 25 ms; one row and 8 or more gain nothing)."""
    if (
        2 <= rows.shape[0] <= 4
        and rows.device.type == "cpu"
        and type(linear) is nn.Linear
        and linear.bias is None
        and linear.weight.dtype == torch.float32
    ):
        return torch.mm(linear.weight, rows.t()).t().contiguous()
    return linear(rows)


def _split(rows: torch.Tensor, sessions: list[SessionRows]) -> tuple[torch.Tensor, ...]:
    return rows.split([s.num_tokens for s in sessions])
