"""DHT layer: key names, record schemas, validators, starting a node for any role, announcing and reading records.

Imports no other blockswarm package: routing, peer and monitor build on it.
"""

from .identity import peer_id_from_owner_marker
from .keys import MODEL_INDEX_KEY, block_key, validate_model_name
from .node import NodeRole, SwarmJoinError, SwarmNode, start_dht
from .records import ModelInfo, PeerReport, ReportReason, ServerInfo, ServerState
from .swarm import (
    DHTUnavailableError,
    announce_model,
    announce_server,
    get_block_servers,
    get_models,
    get_reports,
    report_peer,
)
from .validation import BlockswarmRecordValidator, make_validators

__all__ = [
    "MODEL_INDEX_KEY",
    "BlockswarmRecordValidator",
    "DHTUnavailableError",
    "ModelInfo",
    "PeerReport",
    "ReportReason",
    "NodeRole",
    "ServerInfo",
    "ServerState",
    "SwarmJoinError",
    "SwarmNode",
    "announce_model",
    "announce_server",
    "block_key",
    "get_block_servers",
    "get_models",
    "get_reports",
    "make_validators",
    "peer_id_from_owner_marker",
    "report_peer",
    "start_dht",
    "validate_model_name",
]
