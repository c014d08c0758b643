"""Proof that a backward pass with `train=True` comes from a trainer of the run, not from any stranger.

Trainers and training peers share a secret run key. A trainer sends, with each training backward, an HMAC of the
key over the two peer ids of the connection (which libp2p authenticates). The receiving peer recomputes it from
its own id and the caller's; a peer that received a proof cannot use it elsewhere, since another peer checks it
against a different pair of ids, and the key never crosses the wire.
"""

from __future__ import annotations

import hashlib
import hmac

from hivemind.p2p import PeerID


def train_proof(run_key: str, server: PeerID, trainer: PeerID) -> str:
    """What `trainer` sends to `server` with a training backward pass."""
    message = b"blockswarm-train|" + server.to_bytes() + b"|" + trainer.to_bytes()
    return hmac.new(run_key.encode(), message, hashlib.sha256).hexdigest()


def is_valid_train_proof(run_key: str | None, server: PeerID, trainer: PeerID | None, proof: str) -> bool:
    """Whether `proof` was made with `run_key` for this server and this (authenticated) caller."""
    if not run_key or trainer is None:
        return False
    return hmac.compare_digest(train_proof(run_key, server, trainer), proof)
