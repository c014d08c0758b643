"""Announcing and reading blockswarm records over a running hivemind DHT.

Each call is one trip to the DHT process (`run_coroutine`), which batches every key into one `store_many` /
`get_many` traversal. The coroutines shipped there are module-level functions because `run_coroutine` pickles
them. Every trip is bounded by `timeout`: a DHT process that died (or hangs) makes the call raise instead of
waiting forever.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from hivemind.dht import DHT, DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from .keys import MODEL_INDEX_KEY, block_key, validate_model_name
from .records import ModelInfo, ServerInfo

DHT_CALL_TIMEOUT = 60.0  # seconds; a traversal with `latest=True` over a big swarm takes a few

_SUBKEY_RE = re.compile(rb"([1-9A-HJ-NP-Za-km-z]+)\[owner:.+\]", re.DOTALL)  # base58 peer id + owner marker


def server_subkey(peer_id: PeerID, local_public_key: bytes) -> bytes:
    """Subkey of a peer's records: its id plus its "[owner:...]" marker, so only that key holder can write it.

    The signature proves which RSA key wrote the record, not that the writer owns `peer_id`; the libp2p
    connection authenticates the peer id when a client actually calls it.
    """
    return peer_id.to_base58().encode() + local_public_key


def peer_id_from_subkey(subkey: Any) -> PeerID | None:
    """Inverse of server_subkey; None for subkeys that server_subkey cannot have made."""
    if not isinstance(subkey, bytes):
        return None
    match = _SUBKEY_RE.fullmatch(subkey)
    if match is None:
        return None
    try:
        return PeerID.from_base58(match.group(1).decode())
    except Exception:  # malformed multihash: whatever the base58 decoder raises
        return None


class DHTUnavailableError(RuntimeError):
    """This process's DHT node is not running (it died or was stopped)."""


def _call(dht: DHT, coroutine: Any, timeout: float) -> Any:
    """Run `coroutine(dht, node)` in the DHT process; TimeoutError after `timeout` seconds."""
    if not dht.is_alive():
        raise DHTUnavailableError("this node's DHT process is not running")
    return dht.run_coroutine(coroutine, return_future=True).result(timeout)


async def _store_all(
    _dht: DHT, node: DHTNode, keys: list[str], subkeys: list[Any], values: list[Any], expiration_time: float
) -> bool:
    results = await node.store_many(keys, values, expiration_time, subkeys=subkeys)
    return len(results) == len(keys) and all(results.values())


async def _announce_server(
    dht: DHT, node: DHTNode, keys: list[str], local_public_key: bytes, value: Any, expiration_time: float
) -> bool:
    # the subkey is built here, where the peer id is at hand, to keep the announcement to one trip
    subkey = server_subkey(node.peer_id, local_public_key)
    return await _store_all(dht, node, keys, [subkey] * len(keys), [value] * len(keys), expiration_time)


async def _get_all(_dht: DHT, node: DHTNode, keys: list[str], latest: bool) -> dict[str, Any]:
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)


def announce_server(
    dht: DHT,
    model: str,
    info: ServerInfo,
    local_public_key: bytes,
    expiration_time: float,
    timeout: float = DHT_CALL_TIMEOUT,
) -> bool:
    """Store `info` under each block key of its span [info.start, info.end); True if all stores succeeded."""
    keys = [block_key(model, index) for index in range(info.start, info.end)]
    announce = partial(
        _announce_server,
        keys=keys,
        local_public_key=local_public_key,
        value=info.to_wire(),
        expiration_time=expiration_time,
    )
    return _call(dht, announce, timeout)


def announce_model(
    dht: DHT, model: str, info: ModelInfo, expiration_time: float, timeout: float = DHT_CALL_TIMEOUT
) -> bool:
    """Publish `info` in the model index under the subkey `model`."""
    store = partial(
        _store_all,
        keys=[MODEL_INDEX_KEY],
        subkeys=[validate_model_name(model)],
        values=[info.to_wire()],
        expiration_time=expiration_time,
    )
    return _call(dht, store, timeout)


def get_block_servers(
    dht: DHT, model: str, start: int, end: int, *, latest: bool = False, timeout: float = DHT_CALL_TIMEOUT
) -> list[dict[PeerID, ServerInfo]]:
    """For each block in [start, end): the peers announcing it and their records.

    Invalid and expired records are dropped. `latest=True` asks more nodes instead of trusting the first
    (possibly cached) copy found: slower, but sees re-announcements at once.
    """
    if end < start:
        raise ValueError(f"invalid block range [{start}, {end})")
    keys = [block_key(model, index) for index in range(start, end)]
    found = _call(dht, partial(_get_all, keys=keys, latest=latest), timeout) if keys else {}
    now = get_dht_time()
    servers = []
    for key in keys:
        entry = found.get(key)
        block: dict[PeerID, ServerInfo] = {}
        if entry is not None and isinstance(entry.value, dict):
            for subkey, item in entry.value.items():
                peer_id = peer_id_from_subkey(subkey)
                info = ServerInfo.from_wire(item.value)
                if peer_id is not None and info is not None and item.expiration_time >= now:
                    block[peer_id] = info
        servers.append(block)
    return servers


def get_models(dht: DHT, *, latest: bool = False, timeout: float = DHT_CALL_TIMEOUT) -> dict[str, ModelInfo]:
    """The model index: model name -> its ModelInfo (invalid and expired entries dropped)."""
    entry = _call(dht, partial(_get_all, keys=[MODEL_INDEX_KEY], latest=latest), timeout).get(MODEL_INDEX_KEY)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    now = get_dht_time()
    models = {}
    for name, item in entry.value.items():
        info = ModelInfo.from_wire(item.value)
        if isinstance(name, str) and info is not None and item.expiration_time >= now:
            models[name] = info
    return models
