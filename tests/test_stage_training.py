"""blockswarm.peer.stage_training: stage-mates average gradients through hivemind and stay identical."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from hivemind.dht import DHT
from hivemind.utils.crypto import RSAPrivateKey
from torch import nn

from blockswarm.peer.stage_training import StageOptimizer, StageTrainingOptions, stage_run_id

BATCH = 4
OPTIONS = StageTrainingOptions(
    learning_rate=1e-2, target_batch_size=16 * BATCH, matchmaking_time=2.0, averaging_timeout=20.0
)


def test_stage_run_id_is_a_valid_hivemind_prefix():
    assert stage_run_id("tiny-3f2a1b4c", 0, 3) == "tiny-3f2a1b4c_stage_0-3"
    dotted = stage_run_id("meta-llama/Llama-3.1-8B", 8, 16)
    assert "." not in dotted and "/" not in dotted and dotted.endswith("_stage_8-16")
    assert stage_run_id("org/m.1", 0, 1) != stage_run_id("org_m_1", 0, 1)
    with pytest.raises(ValueError, match="empty"):
        stage_run_id("model", 3, 3)
    with pytest.raises(ValueError, match="positive"):
        StageTrainingOptions(target_batch_size=0)


def _train_until_next_epoch(optimizer: StageOptimizer, module: nn.Module, peer: int, errors: list) -> None:
    """Feed half the target batch, then wait for the stage to step. Peer 0's inputs use only features 0-7, peer 1's
    only 8-15: a weight column gets gradients from one peer only, so it moves only if the peers averaged their
    gradients. Exactly one target batch in all, so exactly one step, however long its averaging round takes."""
    try:
        generator = torch.Generator().manual_seed(peer)
        for _ in range(OPTIONS.target_batch_size // (2 * BATCH)):
            inputs = torch.zeros(BATCH, 16)
            inputs[:, 8 * peer : 8 * peer + 8] = torch.randn(BATCH, 8, generator=generator)
            grads = torch.autograd.grad(module(inputs).pow(2).mean(), list(module.parameters()))
            optimizer.accumulate(list(grads), BATCH)
            time.sleep(0.2)  # a realistic micro-batch rate
        deadline = time.monotonic() + 40
        while optimizer.epoch < 1:
            assert time.monotonic() < deadline, "the stage never stepped"
            time.sleep(0.1)
    except BaseException as error:
        errors.append(error)


def _new_peer_identity(monkeypatch) -> None:
    """Make the next StageOptimizer sign its progress records with a key of its own.

    hivemind's progress tracker publishes each peer's progress under its process-wide RSA key: stage-mates in one
    process would overwrite each other's records and each would think it trains alone. Real peers are processes.
    """
    monkeypatch.setattr(RSAPrivateKey, "_process_wide_key", None)


def test_stage_mates_average_gradients_and_a_late_peer_loads_their_state(monkeypatch):
    torch.manual_seed(0)
    first = nn.Linear(16, 8)
    second = copy.deepcopy(first)
    initial = copy.deepcopy(first.state_dict())
    dhts, optimizers = [], []
    try:
        dhts.append(DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        initial_peers = [str(maddr) for maddr in dhts[0].get_visible_maddrs()]
        for _ in range(3):
            dhts.append(DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers))
        run_id = stage_run_id("tiny", 0, 1)
        for dht, module in zip(dhts[1:], (first, second)):
            _new_peer_identity(monkeypatch)
            optimizers.append(StageOptimizer(dht, run_id, list(module.parameters()), OPTIONS))

        errors = []
        threads = [
            threading.Thread(target=_train_until_next_epoch, args=(optimizer, module, peer, errors))
            for peer, (optimizer, module) in enumerate(zip(optimizers, (first, second)))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors

        for name, value in first.state_dict().items():
            assert torch.allclose(value, second.state_dict()[name], atol=1e-6), f"{name} differs between stage-mates"
            assert (value != initial[name]).all(), f"{name} was not trained with both peers' gradients"

        late = nn.Linear(16, 8)  # different initial weights
        _new_peer_identity(monkeypatch)
        optimizers.append(StageOptimizer(dhts[3], run_id, list(late.parameters()), OPTIONS))
        assert optimizers[-1].load_state_from_peers()
        assert optimizers[-1].epoch == 1
        for name, value in late.state_dict().items():
            assert torch.allclose(value, first.state_dict()[name], atol=1e-6), f"{name} was not loaded"

        _new_peer_identity(monkeypatch)
        alone = StageOptimizer(dhts[3], stage_run_id("tiny", 1, 2), list(nn.Linear(2, 2).parameters()), OPTIONS)
        optimizers.append(alone)
        assert not alone.load_state_from_peers()  # nobody serves that stage
        assert alone.epoch == 0
    finally:
        for optimizer in optimizers:
            optimizer.shutdown()
        for dht in dhts:
            dht.shutdown()


def _micro_batch_grads(module: nn.Module, seed: int) -> list[torch.Tensor]:
    inputs = torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(seed))
    # not .backward(): a stage optimizer accumulates in the parameters' .grad itself
    return list(torch.autograd.grad(module(inputs).pow(2).mean(), list(module.parameters())))


def _wait_for_epoch(optimizers: list[StageOptimizer], epoch: int, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while any(optimizer.epoch < epoch for optimizer in optimizers):
        assert time.monotonic() < deadline, f"epochs {[optimizer.epoch for optimizer in optimizers]}, not {epoch}"
        time.sleep(0.1)


def test_stage_steps_are_local_adam_steps_on_the_batch_mean(monkeypatch):
    """Whichever stage-mates get the micro-batches, each step is the step that local Adam takes on the batch's mean
    gradient: only samples end an epoch (a trainer may pause as long as it likes), a mate without micro-batches
    takes the step too, and a mate that joined late (loading the stage's state) steps like the others."""
    options = StageTrainingOptions(learning_rate=1e-2, target_batch_size=2 * BATCH, matchmaking_time=2.0)
    torch.manual_seed(0)
    reference = nn.Linear(16, 8)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=options.learning_rate)
    modules = [copy.deepcopy(reference), nn.Linear(16, 8)]  # the second one joins late, with other weights
    dhts, optimizers = [], []

    def add_peer(module: nn.Module) -> StageOptimizer:
        dhts.append(DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers))
        _new_peer_identity(monkeypatch)
        optimizers.append(StageOptimizer(dhts[-1], stage_run_id("tiny", 0, 1), list(module.parameters()), options))
        return optimizers[-1]

    def batch(epoch: int, peers: list[int], pause: float = 0.0) -> None:
        reference_optimizer.zero_grad()
        grads = []
        for index, peer in enumerate(peers):
            optimizers[peer].accumulate(_micro_batch_grads(modules[peer], seed=10 * epoch + index), BATCH)
            grads.append(_micro_batch_grads(reference, seed=10 * epoch + index))
            if pause and index == 0:
                time.sleep(pause)  # half a batch, then a pause: no step
                assert [optimizer.epoch for optimizer in optimizers] == [epoch] * len(optimizers)
        for parameter, *micro_batch_grads in zip(reference.parameters(), *grads):
            parameter.grad = sum(micro_batch_grads) / len(micro_batch_grads)
        reference_optimizer.step()
        _wait_for_epoch(optimizers, epoch + 1)
        for peer, module in enumerate(modules):
            for name, value in module.state_dict().items():
                expected = reference.state_dict()[name]
                assert torch.allclose(value, expected, atol=1e-6), f"step {epoch + 1}: peer {peer}'s {name} is off"

    try:
        dhts.append(DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"]))
        initial_peers = [str(maddr) for maddr in dhts[0].get_visible_maddrs()]
        add_peer(modules[0])
        assert add_peer(modules[1]).load_state_from_peers()
        time.sleep(1)  # both have published their progress: neither steps alone

        batch(0, [0, 0], pause=3.0)
        for epoch, peers in enumerate(([1, 1], [1, 0]), start=1):
            batch(epoch, peers)
    finally:
        for optimizer in optimizers:
            optimizer.shutdown()
        for dht in dhts:
            dht.shutdown()
