"""The numbers that define a model the blocks serve, independent of the transformers version that wrote them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from blockswarm.models.families import FAMILIES, Family

SUPPORTED_FAMILIES = tuple(FAMILIES)
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything a block, the model ends and a peer need to know about a model.

    Peers and clients exchange `fingerprint()` to make sure they run the same architecture.
    """

    family: str
    num_blocks: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    attention_bias: bool  # q, k and v projections have biases
    sliding_window: int | None
    tie_word_embeddings: bool
    max_position_embeddings: int
    o_proj_bias: bool = False
    qk_norm: bool = False
    full_attention_layers: tuple[int, ...] = ()  # layers that attend beyond sliding_window
    num_experts: int = 0  # 0: every block has a dense MLP
    experts_per_token: int = 0
    expert_intermediate_size: int = 0
    normalize_expert_weights: bool = False  # top-k routing weights renormalized to sum to 1
    round_routing_weights: bool = False  # routing weights in the hidden states' dtype, not fp32, when weighting
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    dense_layers: tuple[int, ...] = ()  # layers of a mixture-of-experts model with a dense MLP

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Read a transformers config: transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
        name = hf_config.model_type
        if name not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model_type {name!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        family = FAMILIES[name]
        if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "mlp_bias", False):
            raise ValueError("only the SwiGLU MLP without biases (hidden_act='silu', mlp_bias=False) is supported")
        num_heads = hf_config.num_attention_heads
        rope_theta, rope_scaling = _read_rope(hf_config)
        config_bias = bool(getattr(hf_config, "attention_bias", False))
        sliding_window, full_attention_layers = _read_sliding_window(hf_config, family)
        return cls(
            family=name,
            num_blocks=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads,
            vocab_size=hf_config.vocab_size,
            rms_norm_eps=float(hf_config.rms_norm_eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias={"never": False, "always": True, "config": config_bias}[family.qkv_bias],
            sliding_window=sliding_window,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=hf_config.max_position_embeddings,
            o_proj_bias=family.o_proj_bias and config_bias,
            qk_norm=family.qk_norm,
            full_attention_layers=full_attention_layers,
            **_read_experts(hf_config, family),
        )

    def window_of(self, block: int) -> int | None:
        """The sliding window of block `block` (None: it attends to every earlier token)."""
        return None if block in self.full_attention_layers else self.sliding_window

    def is_moe(self, block: int) -> bool:
        """Whether block `block` has a mixture of experts as its MLP."""
        return self.num_experts > 0 and block not in self.dense_layers

    def fingerprint(self) -> str:
        """A short hex hash of the fields; equal configs give equal fingerprints in every process. Fields at their
        defaults are left out, so fields added for new families keep older models' fingerprints."""
        fields = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.default is dataclasses.MISSING or getattr(self, field.name) != field.default
        }
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __hash__(self) -> int:  # the generated hash would fail on the rope_scaling dict
        return hash(self.fingerprint())


def _read_rope(hf_config: Any) -> tuple[float, dict | None]:
    # transformers >= 5 keeps theta and scaling in `rope_parameters`; 4.x has `rope_theta` + `rope_scaling`
    scaling = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    theta = scaling.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    return float(theta), _normalize_rope_scaling(scaling, hf_config.max_position_embeddings)


def _normalize_rope_scaling(scaling: dict, max_position_embeddings: int) -> dict | None:
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor != 1) are not supported")
    if rope_type == "default":
        return None
    if rope_type not in _ROPE_KEYS:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, {', '.join(_ROPE_KEYS)}")
    scaling = {"original_max_position_embeddings": max_position_embeddings, **scaling}
    return {"rope_type": rope_type, **{key: scaling[key] for key in _ROPE_KEYS[rope_type]}}


def _read_sliding_window(hf_config: Any, family: Family) -> tuple[int | None, tuple[int, ...]]:
    """The window and the layers exempt from it: none, or for families with windows per layer, those transformers'
    `layer_types` say attend fully (in a 4.x config without them, the layers before Qwen's `max_window_layers`)."""
    window = getattr(hf_config, "sliding_window", None)
    if family.sliding_window == "opt_in" and not getattr(hf_config, "use_sliding_window", False):
        window = None
    if family.sliding_window == "never" or not window:
        return None, ()
    if not family.window_per_layer:
        return int(window), ()
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is None and hasattr(hf_config, "max_window_layers"):
        first_windowed = hf_config.max_window_layers
        layer_types = [
            "sliding_attention" if i >= first_windowed else "full_attention" for i in range(hf_config.num_hidden_layers)
        ]
    unknown = set(layer_types or ()) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported layer types {sorted(unknown)}; supported: sliding_attention, full_attention")
    return int(window), tuple(i for i, kind in enumerate(layer_types or ()) if kind == "full_attention")


def _read_experts(hf_config: Any, family: Family) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig (none for a dense family)."""
    num_experts = getattr(hf_config, family.num_experts_field, 0) if family.num_experts_field else 0
    if not num_experts:
        return {}
    if not 0 < hf_config.num_experts_per_tok <= num_experts:
        raise ValueError(f"num_experts_per_tok must be in [1, {num_experts}], got {hf_config.num_experts_per_tok}")
    normalize = family.normalize_field
    sparse_step = getattr(hf_config, "decoder_sparse_step", 1) or 1
    dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
    dense |= {i for i in range(hf_config.num_hidden_layers) if (i + 1) % sparse_step}
    return dict(
        num_experts=num_experts,
        experts_per_token=hf_config.num_experts_per_tok,
        expert_intermediate_size=getattr(hf_config, family.expert_size_field),
        normalize_expert_weights=normalize is None or bool(getattr(hf_config, normalize)),
        round_routing_weights=family.round_routing_weights,
        shared_expert_intermediate_size=getattr(hf_config, "shared_expert_intermediate_size", 0) or 0,
        dense_layers=tuple(sorted(dense)),
    )
