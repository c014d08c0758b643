"""Many clients at once on a live swarm: concurrent client processes, whose decode steps the peers batch together,
get exactly the tokens they get alone; a peer with no room answers a new session busy and the client goes to
another peer at once instead of waiting."""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
from hivemind.p2p import PeerID
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.local_swarm import LocalSwarm

CLIENTS = 6
NEW_TOKENS = 24


def prompt(seed: int, length: int = 6) -> torch.Tensor:
    return torch.randint(3, 4000, (1, length), generator=torch.Generator().manual_seed(seed))


def generate_at(model_dir: str, initial_peers: list[str], seed: int, start_at: float, results) -> None:
    """A client process: load, warm up, wait for the common start, generate; puts (seed, tokens, finish time) or
    (seed, error) on `results`."""
    torch.set_num_threads(1)  # six clients and two peers share the machine's cores
    try:
        with DistributedModelForCausalLM.from_pretrained(model_dir, initial_peers, codec="none") as model:
            model.generate(prompt(seed), max_new_tokens=2)
            time.sleep(max(0.0, start_at - time.time()))
            tokens = model.generate(prompt(seed), max_new_tokens=NEW_TOKENS)[0, -NEW_TOKENS:].tolist()
            results.put((seed, tokens, time.time()))
    except Exception as e:
        results.put((seed, f"{type(e).__name__}: {e}", None))


class BusyReplies:
    """What the client's router is told of busy peers: the pipeline bans a busy peer for its retry time."""

    def __init__(self, router):
        self.seen: list[tuple[str, float]] = []
        ban = router.ban

        def recording_ban(peer_id: PeerID, seconds: float | None = None) -> None:
            if seconds is not None:
                self.seen.append((peer_id.to_base58(), seconds))
            ban(peer_id, seconds)

        router.ban = recording_ban


@pytest.fixture(scope="module")
def two_peer_swarm(tiny_model, tmp_path_factory):
    with LocalSwarm(tiny_model, tmp_path_factory.mktemp("two-peers")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(["0:4", "4:8"])
        yield swarm


def test_concurrent_clients_get_the_tokens_they_get_alone(two_peer_swarm, tiny_model):
    reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    alone = [
        reference.generate(prompt(seed), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)[
            0, -NEW_TOKENS:
        ].tolist()
        for seed in range(CLIENTS)
    ]
    context = multiprocessing.get_context("spawn")  # not daemonic: a client's DHT starts a process of its own
    results = context.Queue()
    start_at = time.time() + 25.0  # after every client process has loaded and warmed up
    clients = [
        context.Process(target=generate_at, args=(tiny_model, two_peer_swarm.initial_peers, seed, start_at, results))
        for seed in range(CLIENTS)
    ]
    for client in clients:
        client.start()
    try:
        outcomes = sorted(results.get(timeout=180) for _ in clients)
    finally:
        for client in clients:
            client.join(30)
            if client.is_alive():
                client.kill()
    assert all(finished is not None and finished > start_at for _, _, finished in outcomes), outcomes
    assert [tokens for _, tokens, _ in outcomes] == alone


def test_a_busy_peer_sends_a_new_session_to_another_peer(tiny_model, tmp_path):
    """A peer with room for one session serves a client alone. While another client holds that room, a second peer
    joins; the client's next session is answered busy by the first and runs on the second, well before the busy
    reply's retry time, with the same tokens. The first peer announces rarely, so that the client learns that it is
    full from the busy reply, not from its record."""
    with LocalSwarm(tiny_model, tmp_path) as swarm:
        swarm.start_bootstrap()
        full = swarm.start_peer("--blocks", "0:8", "--cache-tokens", "64", "--update-period", "600")
        with (
            DistributedModelForCausalLM.from_pretrained(
                tiny_model, swarm.initial_peers, codec="none", allowed_peers=[full.peer_id]
            ) as holder,
            DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, codec="none") as client,
        ):
            expected = client.generate(prompt(7), max_new_tokens=8)  # on the only peer
            busy = BusyReplies(client.remote.router)
            with holder.inference_session(max_length=64):
                holder.generate(prompt(8), max_new_tokens=4)  # its session now fills that peer's cache
                swarm.start_peer("--blocks", "0:8")
                began = time.monotonic()
                tokens = client.generate(prompt(7), max_new_tokens=8)
                elapsed = time.monotonic() - began
                avoided = not client.remote.router.is_usable(PeerID.from_base58(full.peer_id))
    assert torch.equal(tokens, expected)
    assert busy.seen == [(full.peer_id, 5.0)]
    assert avoided  # for the busy reply's retry time, then used again
    assert elapsed < 5.0, "the client waited out the busy reply instead of going to the other peer"
