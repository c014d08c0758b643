"""DHT layer: key names, record schemas, validators, and announcing/reading records over hivemind.DHT.

Imports no other blockswarm package: routing, peer and monitor build on it.
"""

from .keys import MODEL_INDEX_KEY, block_key, validate_model_name
from .process import exit_with_parent
from .records import ModelInfo, ServerInfo, ServerState
from .swarm import (
    announce_model,
    announce_server,
    get_block_servers,
    get_models,
    peer_id_from_subkey,
    server_subkey,
)
from .validation import BlockswarmRecordValidator, make_validators

__all__ = [
    "MODEL_INDEX_KEY",
    "BlockswarmRecordValidator",
    "ModelInfo",
    "ServerInfo",
    "ServerState",
    "announce_model",
    "announce_server",
    "block_key",
    "exit_with_parent",
    "get_block_servers",
    "get_models",
    "make_validators",
    "peer_id_from_subkey",
    "server_subkey",
    "validate_model_name",
]
