"""blockswarm.dht: record schemas, keys, validators, and announce/read over real hivemind DHTs on loopback."""

from __future__ import annotations

import time

import pytest
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.protocol import DHTProtocol
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from blockswarm.dht import (
    MODEL_INDEX_KEY,
    BlockswarmRecordValidator,
    ModelInfo,
    PeerReport,
    ReportReason,
    ServerInfo,
    ServerState,
    announce_model,
    announce_server,
    block_key,
    get_block_servers,
    get_models,
    get_reports,
    make_validators,
    peer_id_from_owner_marker,
    report_peer,
    validate_model_name,
)
from blockswarm.dht.identity import forget, new_identity, peer_id_of
from blockswarm.dht.keys import IndexSubkey, parse_index_subkey, report_subkey, reports_key
from blockswarm.dht.records import content_digest

MODEL = "org/tiny-llama"
PEER_ID = PeerID.from_base58("QmTSbxzqxK6TjazUr8GSRDb8n2cpNjD2fhw2ajSvJ3j5eg")


def _server(**overrides) -> ServerInfo:
    fields = dict(state=ServerState.ONLINE, start=2, end=5, throughput=3.5, inference_rps=120.0)
    return ServerInfo(**(fields | overrides))


def _model() -> ModelInfo:
    return ModelInfo(num_blocks=8, family="llama", config_hash="c0ffee", weights_hash="beef")


# ---------------------------------------------------------------- records


def test_server_info_round_trip():
    info = _server(codecs=["8bit", "none"], public_name="alice", next_pings={PEER_ID.to_base58(): 0.02})
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(info.to_wire()))
    assert ServerInfo.from_wire(wire) == info
    assert wire["state"] == "online" and wire["_bs"] == "server"


def test_model_info_round_trip():
    wire = MSGPackSerializer.loads(MSGPackSerializer.dumps(_model().to_wire()))
    assert ModelInfo.from_wire(wire) == _model()


def test_unknown_fields_are_ignored():
    wire = _server().to_wire() | {"record_version": 7, "gpu": "H100", "features": [1, 2]}
    info = ServerInfo.from_wire(wire)
    assert info is not None and info.start == 2 and info.record_version == 7
    assert ModelInfo.from_wire(_model().to_wire() | {"license": "mit"}) == _model()


def test_records_without_using_relay_are_read_as_direct_peers():
    wire = {key: value for key, value in _server(using_relay=True).to_wire().items() if key != "using_relay"}
    assert ServerInfo.from_wire(wire).using_relay is False


@pytest.mark.parametrize(
    "changes",
    [
        {"start": 5, "end": 5},
        {"start": 6, "end": 5},
        {"start": -1},
        {"throughput": -1.0},
        {"throughput": float("nan")},
        {"start": "2"},
        {"end": 5.0},
        {"state": "sleeping"},
        {"state": 1},
        {"codecs": "none"},
        {"training": "yes"},
        {"using_relay": 1},
        {"public_name": "x" * 65},
        {"next_pings": {"peer": -0.1}},
        {"cache_tokens_left": -5},
        {"_bs": "model"},
        # absurd numbers anyone could write: readers size loops and routes by them
        {"start": 10**9, "end": 10**9 + 1},
        {"end": 10**9},
        {"throughput": 1e12},
        {"forward_rps": 1e12},
        {"inference_rps": 1e12},
        {"cache_tokens_left": 2**40},
        {"next_pings": {"peer": 1e6}},
    ],
)
def test_invalid_server_records_are_rejected(changes):
    assert ServerInfo.from_wire(_server().to_wire() | changes) is None


@pytest.mark.parametrize("raw", [None, 3, b"bytes", [1, 2], {"state": "online", "start": 0, "end": 1}])
def test_non_records_are_rejected(raw):
    assert ServerInfo.from_wire(raw) is None
    assert ModelInfo.from_wire(raw) is None


@pytest.mark.parametrize(
    "changes", [{"num_blocks": 0}, {"num_blocks": "8"}, {"num_blocks": 10**9}, {"family": None}, {"_bs": "server"}]
)
def test_invalid_model_records_are_rejected(changes):
    assert ModelInfo.from_wire(_model().to_wire() | changes) is None


# ---------------------------------------------------------------- keys


def test_block_key():
    assert block_key(MODEL, 3) == "org/tiny-llama.3"
    with pytest.raises(ValueError, match="non-negative"):
        block_key(MODEL, -1)


@pytest.mark.parametrize("bad", ["", " llama", "llama 7b", "a\nb", "x" * 201, "_blockswarm", "m[owner:x]", 5])
def test_invalid_model_names(bad):
    with pytest.raises(ValueError, match="model name"):
        validate_model_name(bad)


def test_valid_model_names():
    for name in ["meta-llama/Meta-Llama-3.1-8B", "bigscience/bloom-560m", "local_model+lora@v2"]:
        assert validate_model_name(name) == name


def test_owner_marker_gives_the_signers_peer_id():
    identity = new_identity()
    try:
        with open(identity.path, "rb") as file:
            assert identity.peer_id == PeerID.from_identity(file.read())  # hivemind's own derivation
        _, marker = make_validators(identity.key)
        assert peer_id_from_owner_marker(marker) == identity.peer_id
        assert peer_id_of(identity.key.get_public_key()) == identity.peer_id
    finally:
        forget(identity)
    for bad in [PEER_ID.to_base58().encode() + marker, marker + b"x", b"[owner:not a key]", PEER_ID.to_bytes(), None]:
        assert peer_id_from_owner_marker(bad) is None


def test_index_subkey_round_trip():
    _, marker = make_validators(RSAPrivateKey())
    digest = content_digest(_model().to_wire())
    subkey = IndexSubkey("org/a@b", digest, marker)
    assert parse_index_subkey(subkey.to_bytes()) == subkey
    for bad in [MODEL, MODEL.encode() + marker, f"{MODEL}@{digest}".encode(), f" x@{digest}".encode() + marker]:
        assert parse_index_subkey(bad) is None


# ---------------------------------------------------------------- validator (no network)


def _record(key: str, subkey, value) -> DHTRecord:
    subkey_bytes = DHTProtocol.IS_REGULAR_VALUE if subkey is None else MSGPackSerializer.dumps(subkey)
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        subkey_bytes,
        MSGPackSerializer.dumps(value),
        get_dht_time() + 10,
    )


def _index_subkey(info: dict, marker: bytes, model: str = MODEL) -> bytes:
    return IndexSubkey(model, content_digest(info), marker).to_bytes()


def test_validator_schema_rules():
    validator = BlockswarmRecordValidator()
    _, owned = make_validators(RSAPrivateKey())
    key = block_key(MODEL, 2)
    assert validator.validate(_record(key, owned, _server().to_wire()))
    assert not validator.validate(_record(key, owned, _server().to_wire() | {"end": 1}))
    assert not validator.validate(_record(key, PEER_ID.to_base58(), _server().to_wire()))  # unsigned subkey
    assert not validator.validate(_record(key, PEER_ID.to_base58().encode() + owned, _server().to_wire()))
    assert not validator.validate(_record(key, None, _server().to_wire()))  # no subkey at all
    model = _model().to_wire()
    assert validator.validate(_record(MODEL_INDEX_KEY, _index_subkey(model, owned), model))
    assert not validator.validate(_record(MODEL_INDEX_KEY, MODEL, model))  # not content-addressed, not signed
    altered = model | {"num_blocks": 4096}  # cannot replace the entry another digest names
    assert not validator.validate(_record(MODEL_INDEX_KEY, _index_subkey(model, owned), altered))
    bad = model | {"num_blocks": -1}
    assert not validator.validate(_record(MODEL_INDEX_KEY, _index_subkey(bad, owned), bad))
    assert not validator.validate(_record(key, _index_subkey(model, owned), model))  # model record outside the index
    assert not validator.validate(_record(MODEL_INDEX_KEY, None, {"anything": 1}))  # cannot wipe the index
    assert not validator.validate(_record(MODEL_INDEX_KEY, owned, _server().to_wire()))
    # no plain value anywhere (it would replace a whole dictionary of records)
    assert not validator.validate(_record(key, None, [1, 2, 3]))
    assert not validator.validate(_record("someone.else", None, [1, 2, 3]))
    # other applications' subkeyed values and record kinds from newer versions pass
    assert validator.validate(_record("someone.else", b"peer", True))
    assert validator.validate(_record(key, "sub", {"_bs": "future-kind", "x": 1}))


def test_make_validators_order():
    validators, public_key = make_validators(RSAPrivateKey())
    assert isinstance(validators[0], RSASignatureValidator)
    assert isinstance(validators[1], BlockswarmRecordValidator)
    assert validators[0].priority > validators[1].priority  # signatures are checked and stripped first
    assert public_key == validators[0].local_public_key and public_key.startswith(b"[owner:")


# ---------------------------------------------------------------- live swarm on loopback


class _Node:
    """A DHT node signing with its libp2p identity, as start_dht's listening nodes do."""

    def __init__(self, initial_peers=None, client_mode=False):
        identity = new_identity()
        self.validators, self.public_key = make_validators(identity.key)
        self.dht = DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=initial_peers,
            client_mode=client_mode,
            record_validators=self.validators,
            identity_path=identity.path,
            check_if_identity_free=False,
        )
        forget(identity)


@pytest.fixture(scope="module")
def swarm():
    a = _Node()
    peers = [str(maddr) for maddr in a.dht.get_visible_maddrs()]
    b = _Node(peers)
    client = _Node(peers, client_mode=True)
    yield a, b, client
    for node in (client, b, a):
        node.dht.shutdown()


def test_announce_and_read(swarm):
    a, b, client = swarm
    expiration = get_dht_time() + 60
    assert announce_server(a.dht, MODEL, _server(), a.public_key, expiration)
    assert announce_model(a.dht, MODEL, _model(), a.public_key, expiration)
    for reader in (b, client):
        blocks = get_block_servers(reader.dht, MODEL, 0, 8)
        assert len(blocks) == 8
        assert [bool(block) for block in blocks] == [False, False, True, True, True, False, False, False]
        for block in blocks[2:5]:
            assert block == {a.dht.peer_id: _server()}
        assert get_models(reader.dht)[MODEL] == [_model()]


def test_records_expire(swarm):
    a, b, client = swarm
    model = "org/short-lived"
    assert announce_server(a.dht, model, _server(start=0, end=2), a.public_key, get_dht_time() + 1.5)
    assert a.dht.peer_id in get_block_servers(client.dht, model, 0, 2)[1]
    time.sleep(2)
    assert get_block_servers(client.dht, model, 0, 2) == [{}, {}]
    assert get_block_servers(b.dht, model, 0, 2, latest=True) == [{}, {}]


def test_cannot_overwrite_another_peers_record(swarm):
    a, b, client = swarm
    model = "org/contested"
    assert announce_server(a.dht, model, _server(start=0, end=1), a.public_key, get_dht_time() + 30)
    forged = _server(start=0, end=1, state=ServerState.OFFLINE).to_wire()
    # B cannot sign with A's key, and a subkey naming A's id beside B's own key is refused
    assert not b.dht.store(block_key(model, 0), forged, get_dht_time() + 60, subkey=a.public_key)
    spoofed = a.dht.peer_id.to_base58().encode() + b.public_key
    assert not b.dht.store(block_key(model, 0), forged, get_dht_time() + 60, subkey=spoofed)
    [block] = get_block_servers(client.dht, model, 0, 1, latest=True)
    assert block == {a.dht.peer_id: _server(start=0, end=1)}


def test_cannot_store_invalid_tagged_record(swarm):
    a, b, client = swarm
    model = "org/garbage"
    bad = _server(start=0, end=1).to_wire() | {"start": 3}
    # correctly signed, but fails the schema
    assert not b.dht.store(block_key(model, 0), bad, get_dht_time() + 30, subkey=b.public_key)
    bad_model = _model().to_wire() | {"num_blocks": 0}
    subkey = _index_subkey(bad_model, b.public_key, model)
    assert not b.dht.store(MODEL_INDEX_KEY, bad_model, get_dht_time() + 30, subkey=subkey)
    assert get_block_servers(client.dht, model, 0, 1, latest=True) == [{}]
    assert model not in get_models(client.dht, latest=True)


def test_newer_record_replaces_older(swarm):
    a, b, client = swarm
    model = "org/restarting"
    assert announce_server(a.dht, model, _server(start=0, end=2), a.public_key, get_dht_time() + 30)
    assert get_block_servers(b.dht, model, 0, 2)[0][a.dht.peer_id].state == ServerState.ONLINE
    offline = _server(start=0, end=2, state=ServerState.OFFLINE)
    assert announce_server(a.dht, model, offline, a.public_key, get_dht_time() + 31)
    for block in get_block_servers(b.dht, model, 0, 2, latest=True):
        assert block == {a.dht.peer_id: offline}
    # an older announcement (earlier expiration) does not win back
    assert not announce_server(a.dht, model, _server(start=0, end=2), a.public_key, get_dht_time() + 5)
    assert get_block_servers(client.dht, model, 0, 2, latest=True)[1][a.dht.peer_id].state == ServerState.OFFLINE


def test_two_servers_on_one_block(swarm):
    a, b, client = swarm
    model = "org/shared"
    expiration = get_dht_time() + 30
    assert announce_server(a.dht, model, _server(start=0, end=3), a.public_key, expiration)
    assert announce_server(b.dht, model, _server(start=2, end=4, throughput=1.0), b.public_key, expiration)
    blocks = get_block_servers(client.dht, model, 0, 4, latest=True)
    assert [set(block) for block in blocks] == [
        {a.dht.peer_id},
        {a.dht.peer_id},
        {a.dht.peer_id, b.dht.peer_id},
        {b.dht.peer_id},
    ]
    assert blocks[2][b.dht.peer_id].throughput == 1.0


def test_reports_one_per_reporter_and_peer(swarm):
    a, b, client = swarm
    model = "org/reported"
    report = PeerReport(reason=ReportReason.WRONG_OUTPUT, start=0, end=2, reported_at=time.time())
    expiration = get_dht_time() + 30
    assert report_peer(b.dht, model, a.dht.peer_id, report, b.public_key, expiration)
    assert report_peer(client.dht, model, a.dht.peer_id, report, client.public_key, expiration)
    later = report.model_copy(update={"reported_at": report.reported_at + 1})
    assert report_peer(b.dht, model, a.dht.peer_id, later, b.public_key, expiration + 1)  # replaces b's own
    reports = get_reports(a.dht, model)
    assert list(reports) == [a.dht.peer_id]
    assert sorted(r.reported_at for r in reports[a.dht.peer_id]) == [report.reported_at, later.reported_at]
    # nobody can publish a report under another reporter's marker, nor a malformed one
    assert not a.dht.store(
        reports_key(model), report.to_wire(), expiration + 2, subkey=report_subkey("Qm1", b.public_key)
    )
    bad = report.to_wire() | {"end": 0}
    assert not a.dht.store(reports_key(model), bad, expiration, subkey=report_subkey("Qm1", a.public_key))
    assert len(get_reports(client.dht, model)) == 1
