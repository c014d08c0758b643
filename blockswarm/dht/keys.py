"""DHT key names, so every package agrees on where blocks and models are announced."""

from __future__ import annotations

import re
from dataclasses import dataclass

MODEL_INDEX_KEY = "_blockswarm.models"
"""Key of the model index: subkeys are IndexSubkey ("{model}@{digest}[owner:...]"), values ModelInfo records."""

MAX_MODEL_NAME_LENGTH = 200

# Hugging Face repo ids ("org/name", dots, dashes, underscores) fit; whitespace, control characters and
# brackets (which could spoof hivemind's "[owner:...]" marker) do not.
# A leading "_" is reserved for our own keys (MODEL_INDEX_KEY).
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-/+@]*")


def validate_model_name(model: str) -> str:
    """Return `model` unchanged if it can name a model in DHT keys; else raise a ValueError saying why."""
    if not isinstance(model, str):
        raise ValueError(f"model name must be a string, got {type(model).__name__}")
    if not model:
        raise ValueError("model name must not be empty")
    if len(model) > MAX_MODEL_NAME_LENGTH:
        raise ValueError(f"model name is {len(model)} characters long, the limit is {MAX_MODEL_NAME_LENGTH}")
    if _MODEL_NAME_RE.fullmatch(model) is None:
        raise ValueError(
            f"model name {model!r} must start with a letter or digit and contain only letters, digits "
            "and the characters . _ - / + @ (no whitespace or brackets)"
        )
    return model


def block_key(model: str, index: int) -> str:
    """DHT key under which the peers serving block `index` of `model` announce themselves."""
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"block index must be a non-negative int, got {index!r}")
    return f"{validate_model_name(model)}.{index}"


@dataclass(frozen=True)
class IndexSubkey:
    """Where one writer's claim about a model sits in MODEL_INDEX_KEY: "{model}@{digest}[owner:...]"."""

    model: str
    digest: str  # content_digest of the ModelInfo stored there
    owner_marker: bytes

    def to_bytes(self) -> bytes:
        return f"{validate_model_name(self.model)}@{self.digest}".encode() + self.owner_marker


_INDEX_SUBKEY_RE = re.compile(rb"(.+)@([0-9a-f]{32})(\[owner:.+\])", re.DOTALL)


def parse_index_subkey(subkey: object) -> IndexSubkey | None:
    """Inverse of IndexSubkey.to_bytes; None for subkeys it cannot have made."""
    if not isinstance(subkey, bytes):
        return None
    match = _INDEX_SUBKEY_RE.fullmatch(subkey)
    if match is None:
        return None
    try:
        model = validate_model_name(match.group(1).decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return IndexSubkey(model, match.group(2).decode(), match.group(3))


def reports_key(model: str) -> str:
    """DHT key of the reports about `model`'s peers (block keys end in a number, this one cannot)."""
    return f"{validate_model_name(model)}.reports"


_REPORT_SUBKEY_RE = re.compile(rb"([1-9A-HJ-NP-Za-km-z]{1,128})(\[owner:.+\])", re.DOTALL)  # base58 id + marker


def report_subkey(peer_id_base58: str, owner_marker: bytes) -> bytes:
    """Subkey of one reporter's report about one peer: the peer's id followed by the reporter's marker."""
    return peer_id_base58.encode() + owner_marker


def parse_report_subkey(subkey: object) -> tuple[str, bytes] | None:
    """(reported peer id in base58, reporter's marker), or None for subkeys report_subkey cannot have made."""
    if not isinstance(subkey, bytes):
        return None
    match = _REPORT_SUBKEY_RE.fullmatch(subkey)
    return None if match is None else (match.group(1).decode(), match.group(2))
