"""A stranger writing to the DHT cannot hide, impersonate or misdescribe the peers of a live swarm.

The attacker is a plain hivemind node joined to the test swarm: it runs none of blockswarm's validators and
writes whatever it likes; the swarm's own nodes (and the client's) must refuse it.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from hivemind.dht import DHT
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.dht import MODEL_INDEX_KEY, ModelInfo, ServerInfo, ServerState, block_key, get_block_servers, get_models
from blockswarm.dht.keys import IndexSubkey
from blockswarm.dht.records import MAX_BLOCKS, MAX_THROUGHPUT, content_digest

ATTACK_TTL = 3600.0  # later than any honest record's expiration: under hivemind's rules, the newest value wins


@contextlib.contextmanager
def _attacker_node(swarm, signer: RSASignatureValidator | None = None):
    node = DHT(
        start=True,
        host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        initial_peers=swarm.initial_peers,
        record_validators=[signer or RSASignatureValidator(RSAPrivateKey())],
    )
    try:
        yield node
    finally:
        node.shutdown()


@pytest.fixture(scope="module")
def attacker(swarm):
    signer = RSASignatureValidator(RSAPrivateKey())
    with _attacker_node(swarm, signer) as node:
        yield node, signer.local_public_key


@pytest.fixture(scope="module")
def client(swarm, tiny_model):
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, codec="none") as model:
        yield model


def _view(client) -> list[dict]:
    remote = client.remote
    blocks = get_block_servers(remote.dht, remote.model_name, 0, client.config.num_blocks, latest=True)
    return [{peer_id: info.state for peer_id, info in block.items()} for block in blocks]


def _generates_like_local(client, tiny_model) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    input_ids = torch.randint(3, 4000, (1, 6), generator=torch.Generator().manual_seed(13))
    expected = reference.generate(input_ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(client.generate(input_ids, max_new_tokens=12), expected)


def test_plain_values_cannot_wipe_a_block(swarm, attacker, client, tiny_model):
    node, _ = attacker
    before = _view(client)
    assert all(before), "every block should be served before the attack"
    expiration = get_dht_time() + ATTACK_TTL
    for index in range(client.config.num_blocks):
        node.store(block_key(client.remote.model_name, index), "wiped", expiration)
    assert _view(client) == before
    _generates_like_local(client, tiny_model)


def test_records_cannot_speak_for_another_peer(swarm, attacker, client, tiny_model):
    node, marker = attacker
    before = _view(client)
    victim = next(iter(before[0]))
    forged = ServerInfo(state=ServerState.OFFLINE, start=0, end=1, throughput=MAX_THROUGHPUT).to_wire()
    # the former layout ("<peer id>[owner:<any key>]"), and the victim's id under the attacker's key
    for subkey in (victim.to_base58().encode() + marker, victim.to_base58().encode()):
        node.store(block_key(client.remote.model_name, 0), forged, get_dht_time() + ATTACK_TTL, subkey=subkey)
    after = _view(client)
    assert after[0][victim] == ServerState.ONLINE
    assert after == before
    _generates_like_local(client, tiny_model)


def test_model_index_entry_cannot_be_overwritten(swarm, attacker, client, tiny_model):
    node, marker = attacker
    name = client.remote.model_name
    [honest] = get_models(client.remote.dht, latest=True)[name]
    lie = ModelInfo(num_blocks=MAX_BLOCKS, family="llama", config_hash="0" * 16, weights_hash="0" * 16).to_wire()
    expiration = get_dht_time() + ATTACK_TTL
    # the former layout, a plain model-name subkey, from a node of its own: hivemind cannot hold str and bytes
    # subkeys of one key in its local storage, so the attacker's own node would fail on the bytes ones below
    with _attacker_node(swarm) as other:
        other.store(MODEL_INDEX_KEY, lie, expiration, subkey=name)
    honest_digest = content_digest(honest.to_wire())
    node.store(MODEL_INDEX_KEY, lie, expiration, subkey=IndexSubkey(name, honest_digest, marker).to_bytes())
    # a well-formed claim of its own is taken, beside the peers' claim, which stays first (more writers)
    assert node.store(
        MODEL_INDEX_KEY, lie, expiration, subkey=IndexSubkey(name, content_digest(lie), marker).to_bytes()
    )
    claims = get_models(client.remote.dht, latest=True)[name]
    assert claims[0] == honest
    assert [claim.config_hash for claim in claims] == [honest.config_hash, "0" * 16]
    # a new client of the real checkpoint starts and generates, finding its claim among the others
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, codec="none") as fresh:
        _generates_like_local(fresh, tiny_model)
