"""Announcing and reading blockswarm records over a running hivemind DHT.

Each call is one trip to the DHT process (`run_coroutine`), which batches every key into one `store_many` /
`get_many` traversal. The coroutines shipped there are module-level functions because `run_coroutine` pickles
them. Every trip is bounded by `timeout`: a DHT process that died (or hangs) makes the call raise instead of
waiting forever.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any

from hivemind.dht import DHT, DHTNode
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from .identity import peer_id_from_owner_marker
from .keys import (
    MODEL_INDEX_KEY,
    IndexSubkey,
    block_key,
    parse_index_subkey,
    parse_report_subkey,
    report_subkey,
    reports_key,
)
from .records import ModelInfo, PeerReport, ServerInfo, content_digest

DHT_CALL_TIMEOUT = 60.0  # seconds; a traversal with `latest=True` over a big swarm takes a few


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


async def _get_all(_dht: DHT, node: DHTNode, keys: list[str], latest: bool) -> dict[str, Any]:
    return await node.get_many(keys, sufficient_expiration_time=float("inf") if latest else None)


def announce_server(
    dht: DHT,
    model: str,
    info: ServerInfo,
    owner_marker: bytes,
    expiration_time: float,
    timeout: float = DHT_CALL_TIMEOUT,
) -> bool:
    """Store `info` under each block key of its span [info.start, info.end); True if all stores succeeded.

    The subkey is the node's "[owner:...]" marker: the record is signed with that key, and readers take the
    peer id from it, so it must be the node's libp2p identity key (see identity.py).
    """
    keys = [block_key(model, index) for index in range(info.start, info.end)]
    store = partial(
        _store_all,
        keys=keys,
        subkeys=[owner_marker] * len(keys),
        values=[info.to_wire()] * len(keys),
        expiration_time=expiration_time,
    )
    return _call(dht, store, timeout)


def announce_model(
    dht: DHT,
    model: str,
    info: ModelInfo,
    owner_marker: bytes,
    expiration_time: float,
    timeout: float = DHT_CALL_TIMEOUT,
) -> bool:
    """Add this node's claim that `model` is `info` to the model index (content-addressed, see ModelInfo)."""
    wire = info.to_wire()
    subkey = IndexSubkey(model, content_digest(wire), owner_marker).to_bytes()
    store = partial(
        _store_all, keys=[MODEL_INDEX_KEY], subkeys=[subkey], values=[wire], expiration_time=expiration_time
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
                peer_id = peer_id_from_owner_marker(subkey)
                info = ServerInfo.from_wire(item.value)
                if peer_id is not None and info is not None and item.expiration_time >= now:
                    block[peer_id] = info
        servers.append(block)
    return servers


def get_models(dht: DHT, *, latest: bool = False, timeout: float = DHT_CALL_TIMEOUT) -> dict[str, list[ModelInfo]]:
    """The model index: model name -> the distinct claims about it, the one made by most writers first.

    Anyone can add a claim, so a reader that knows what it expects (a client with its checkpoint's config)
    looks for its own among them; the order is only a hint for readers that do not (the monitor).
    Invalid and expired entries are dropped.
    """
    entry = _call(dht, partial(_get_all, keys=[MODEL_INDEX_KEY], latest=latest), timeout).get(MODEL_INDEX_KEY)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    now = get_dht_time()
    claims: dict[tuple[str, str], ModelInfo] = {}
    writers: Counter[tuple[str, str]] = Counter()
    for subkey, item in entry.value.items():
        parsed = parse_index_subkey(subkey)
        info = ModelInfo.from_wire(item.value)
        if parsed is None or info is None or item.expiration_time < now:
            continue
        if parsed.digest != content_digest(item.value):
            continue
        claims[parsed.model, parsed.digest] = info
        writers[parsed.model, parsed.digest] += 1
    models: dict[str, list[ModelInfo]] = {}
    for claim, _ in writers.most_common():
        models.setdefault(claim[0], []).append(claims[claim])
    return models


def report_peer(
    dht: DHT,
    model: str,
    peer_id: PeerID,
    report: PeerReport,
    owner_marker: bytes,
    expiration_time: float,
    timeout: float = DHT_CALL_TIMEOUT,
) -> bool:
    """Publish this node's report about `peer_id` (replacing its earlier one about that peer)."""
    store = partial(
        _store_all,
        keys=[reports_key(model)],
        subkeys=[report_subkey(peer_id.to_base58(), owner_marker)],
        values=[report.to_wire()],
        expiration_time=expiration_time,
    )
    return _call(dht, store, timeout)


def get_reports(dht: DHT, model: str, *, timeout: float = DHT_CALL_TIMEOUT) -> dict[PeerID, list[PeerReport]]:
    """The unexpired reports about `model`'s peers: reported peer -> one report per distinct reporter."""
    key = reports_key(model)
    entry = _call(dht, partial(_get_all, keys=[key], latest=True), timeout).get(key)
    if entry is None or not isinstance(entry.value, dict):
        return {}
    now = get_dht_time()
    reports: dict[PeerID, list[PeerReport]] = {}
    for subkey, item in entry.value.items():
        parsed = parse_report_subkey(subkey)
        report = PeerReport.from_wire(item.value)
        if parsed is None or report is None or item.expiration_time < now:
            continue
        reports.setdefault(PeerID.from_base58(parsed[0]), []).append(report)
    return reports
