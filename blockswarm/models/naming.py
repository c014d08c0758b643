"""The name a model goes by on the DHT, computed the same way by peers and clients."""

from __future__ import annotations

from pathlib import Path


def swarm_model_name(name_or_path: str | Path, weights_fingerprint: str) -> str:
    """A hub id names itself; a local directory is named by its basename plus a weights fingerprint,
    so two different local checkpoints that share a folder name never mix on one swarm."""
    path = Path(name_or_path)
    if path.is_dir():
        base = path.resolve().name
        return f"{base}-{weights_fingerprint[:8]}"
    return str(name_or_path)
