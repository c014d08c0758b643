"""A node's libp2p identity doubling as the key that signs its DHT records, so a record proves its peer id.

A libp2p peer id is the sha2-256 multihash of the node's public key, and every connection authenticates it.
hivemind signs DHT records with a separate RSA key, which says nothing about the peer id: anyone could publish
a record naming someone else's id. Here a peer signs with the very RSA key its libp2p daemon uses (hivemind's
identities are RSA), so the "[owner:...]" marker on a record is the peer's public key and the peer id is
derived from it: no record can name an id other than its signer's.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

_OWNER_MARKER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX, re.DOTALL)

# A multihash is <code><digest length><digest>; 0x12 is sha2-256 (libp2p's peer ids of RSA keys).
_SHA2_256_MULTIHASH_PREFIX = bytes([0x12, 32])


class IdentityKey(RSAPrivateKey):
    """hivemind's RSA signing key, loaded from a libp2p identity file instead of freshly generated.

    Its state is the one hivemind's RSAPrivateKey pickles (the DER private key), so it travels to the DHT
    process like any hivemind key.
    """

    def __init__(self, private_key_der: bytes):
        self.__setstate__({"_private_key": private_key_der})


@dataclass(frozen=True)
class Identity:
    """An identity file for p2pd, the same key for signing records, and the peer id both imply."""

    path: str
    key: IdentityKey
    peer_id: PeerID


def load_identity(path: str) -> Identity:
    """Read an identity file written by hivemind (`P2P.generate_identity`); ValueError if it holds no RSA key."""
    with open(path, "rb") as file:
        private_key = crypto_pb2.PrivateKey.FromString(file.read())
    if private_key.key_type != crypto_pb2.KeyType.RSA:
        raise ValueError(f"identity file {path} holds a {crypto_pb2.KeyType.Name(private_key.key_type)} key, not RSA")
    key = IdentityKey(private_key.data)
    return Identity(path, key, peer_id_of(key.get_public_key()))


def new_identity() -> Identity:
    """A fresh identity in a private temporary file (p2pd reads it once, at start; `forget` removes it)."""
    path = os.path.join(tempfile.mkdtemp(prefix="blockswarm-identity-"), "identity.key")
    P2P.generate_identity(path)
    return load_identity(path)


def forget(identity: Identity) -> None:
    """Remove a temporary identity's file and folder once p2pd has read it."""
    os.remove(identity.path)
    os.rmdir(os.path.dirname(identity.path))


def peer_id_of(public_key: RSAPublicKey) -> PeerID:
    """The libp2p peer id of an RSA public key: sha2-256 multihash of its protobuf-wrapped DER encoding."""
    # hivemind's RSAPublicKey gives OpenSSH bytes; libp2p hashes the DER SubjectPublicKeyInfo
    der = serialization.load_ssh_public_key(public_key.to_bytes()).public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der).SerializeToString()
    return PeerID(_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(wrapped).digest())


def peer_id_from_owner_marker(marker: object) -> PeerID | None:
    """The peer id whose key an "[owner:...]" marker holds; None when it holds no RSA public key."""
    if not isinstance(marker, bytes):
        return None
    match = _OWNER_MARKER_RE.fullmatch(marker)
    if match is None:
        return None
    try:
        return peer_id_of(RSAPublicKey.from_bytes(match.group(1)))
    except (ValueError, TypeError, UnsupportedAlgorithm):  # not an OpenSSH RSA public key
        return None
