"""Parameters a client trains while the peers stay frozen and shared: soft prompts, deep prompts, LoRA.

- soft prompt: `prompt_len` trainable input embeddings put before every sequence;
- deep prompts: one more prompt per block, which the peers add to the hidden states of those first positions;
- LoRA: low-rank (A, B) pairs on the remote blocks' projections, sent with each request (the peer applies them to
  that request or inference session only), and optionally on the local LM head.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from blockswarm.models import ModelConfig, ModelEnds
from blockswarm.models.adapters import check_lora_targets, lora_scaling, lora_shapes
from blockswarm.wire.adapters import AdapterTensors
from blockswarm.wire.messages import AdapterSpec

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class TuningConfig:
    prompt_len: int = 0  # soft prompt tokens before every sequence
    deep_prompts: bool = False  # also a prompt per block over those positions (needs prompt_len)
    lora_rank: int = 0  # 0: no LoRA
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")  # projections of the remote blocks
    lora_head: bool = False  # LoRA on the local LM head too

    def __post_init__(self) -> None:
        if self.prompt_len < 0 or self.lora_rank < 0:
            raise ValueError("prompt_len and lora_rank must be >= 0")
        if self.deep_prompts and not self.prompt_len:
            raise ValueError("deep_prompts need prompt positions: set prompt_len > 0")
        check_lora_targets(self.lora_targets)
        if self.lora_head and not self.lora_rank:
            raise ValueError("lora_head needs lora_rank > 0")

    @property
    def lora_scale(self) -> float:
        """The scale of every LoRA delta, the remote blocks' (AdapterSpec.lora_scale) and the head's alike."""
        return lora_scaling(self.lora_alpha, self.lora_rank)


class Adapters(nn.Module):
    """The trainable parameters of `TuningConfig` for one model."""

    def __init__(self, tuning: TuningConfig, config: ModelConfig):
        super().__init__()
        self.tuning = tuning
        self.num_blocks = config.num_blocks
        hidden, prompt_len = config.hidden_size, tuning.prompt_len
        self.soft_prompt = nn.Parameter(torch.randn(prompt_len, hidden) * 0.02) if prompt_len else None
        self.deep_prompts = (
            nn.Parameter(torch.zeros(config.num_blocks, prompt_len, hidden)) if tuning.deep_prompts else None
        )
        self.lora = nn.ParameterList()
        if tuning.lora_rank:
            for _ in range(config.num_blocks):
                for target in tuning.lora_targets:
                    a_shape, b_shape = lora_shapes(config, target, tuning.lora_rank)
                    self.lora.append(_lora_down(a_shape))
                    self.lora.append(nn.Parameter(torch.zeros(b_shape)))
        if tuning.lora_head:
            self.head_lora_a = _lora_down((tuning.lora_rank, hidden))
            self.head_lora_b = nn.Parameter(torch.zeros(config.vocab_size, tuning.lora_rank))
        else:
            self.head_lora_a = self.head_lora_b = None

    @property
    def spec(self) -> AdapterSpec | None:
        """What the peers receive; None when nothing remote is tuned (soft prompts and head LoRA stay local)."""
        tuning = self.tuning
        if not tuning.deep_prompts and not tuning.lora_rank:
            return None
        return AdapterSpec(
            prompt_len=tuning.prompt_len if tuning.deep_prompts else 0,
            lora_rank=tuning.lora_rank,
            lora_alpha=tuning.lora_alpha,
            lora_targets=tuning.lora_targets if tuning.lora_rank else (),
        )

    def remote_tensors(self) -> list[torch.Tensor]:
        """The tensors sent to the peers, in wire order (differentiable views of the parameters)."""
        prompts = [] if self.deep_prompts is None else [self.deep_prompts.unsqueeze(1)]
        return prompts + list(self.lora)

    def wire(self, tensors: list[torch.Tensor]) -> AdapterTensors:
        return AdapterTensors.from_flat(self.spec, self.num_blocks, tensors)

    def prepend_prompt(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.soft_prompt is None:
            return hidden
        prompt = self.soft_prompt.to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([prompt, hidden], dim=1)

    def logits(self, ends: ModelEnds, hidden: torch.Tensor) -> torch.Tensor:
        logits = ends.logits(hidden)
        if self.head_lora_a is None:
            return logits
        normed = ends.norm(hidden)
        delta = F.linear(F.linear(normed, self.head_lora_a.to(normed.dtype)), self.head_lora_b.to(normed.dtype))
        return logits + self.tuning.lora_scale * delta

    def save(self, path: str | Path) -> Path:
        """A directory with the weights (safetensors) and the tuning config (JSON)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({name: p.detach().contiguous() for name, p in self.named_parameters()}, path / ADAPTER_WEIGHTS)
        (path / ADAPTER_CONFIG).write_text(json.dumps(asdict(self.tuning), indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, config: ModelConfig) -> Adapters:
        path = Path(path)
        if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path} holds no saved adapter: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
        raw = json.loads((path / ADAPTER_CONFIG).read_text())
        tuning = TuningConfig(**{**raw, "lora_targets": tuple(raw.get("lora_targets", ()))})
        adapters = cls(tuning, config)
        weights = load_file(path / ADAPTER_WEIGHTS)
        missing = sorted(set(dict(adapters.named_parameters())) - set(weights))
        if missing:
            raise ValueError(f"{path / ADAPTER_WEIGHTS} lacks {missing}: it was saved for another model or config")
        adapters.load_state_dict(weights)
        return adapters


def _lora_down(shape: tuple[int, int]) -> nn.Parameter:
    """LoRA's A starts like a linear layer's weight and B at zero, so a new adapter changes nothing yet."""
    weight = torch.empty(shape)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return nn.Parameter(weight)
