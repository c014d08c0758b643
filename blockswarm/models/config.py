"""The numbers that define a Llama-family model, independent of the transformers version that wrote them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")
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
    attention_bias: bool
    sliding_window: int | None
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Read a transformers config: transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
        family = hf_config.model_type
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if getattr(hf_config, "hidden_act", "silu") != "silu" or getattr(hf_config, "mlp_bias", False):
            raise ValueError("only the SwiGLU MLP without biases (hidden_act='silu', mlp_bias=False) is supported")
        num_heads = hf_config.num_attention_heads
        rope_theta, rope_scaling = _read_rope(hf_config)
        return cls(
            family=family,
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
            attention_bias=family == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            sliding_window=_read_sliding_window(hf_config),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=hf_config.max_position_embeddings,
        )

    def fingerprint(self) -> str:
        """A short hex hash of all fields; equal configs give equal fingerprints in every process."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
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


def _read_sliding_window(hf_config: Any) -> int | None:
    if hf_config.model_type == "llama":
        return None
    window = getattr(hf_config, "sliding_window", None)
    if hf_config.model_type == "qwen2" and not getattr(hf_config, "use_sliding_window", False):
        return None
    layer_types = getattr(hf_config, "layer_types", None)
    if window is not None and layer_types and len(set(layer_types)) > 1:
        raise ValueError("models mixing sliding-window and full-attention layers are not supported")
    return window
