"""Peers serving int8/nf4 weights: announced as such, smaller in memory, outputs close to full precision."""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import PeerID

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.dht import get_block_servers
from blockswarm.models import load_blocks
from blockswarm.wire.messages import PeerStatus
from blockswarm.wire.ping import request_status

# relative L2 error of the final hidden states vs fp32 (measured on the tiny random model: ~0.07 int8, ~0.5 nf4;
# random weights amplify weight noise, see blockswarm/models/quantization.py)
TOLERANCE = {"int8": 0.15, "nf4": 0.8}


def status(model, peer_id: PeerID) -> PeerStatus:
    return model.remote.loop.run(request_status(model.remote.p2p, peer_id))


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_peer_serves_close_to_full_precision(swarm, tiny_model, quant):
    peer = swarm.start_peer("--blocks", "0:8", "--quant", quant, "--throughput", "1")
    full = next(p for p in swarm.processes if p.span == (0, 3))
    try:
        peer_id = PeerID.from_base58(peer.peer_id)
        with DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, allowed_peers=[peer.peer_id], codec="none"
        ) as model:
            info = get_block_servers(model.remote.dht, model.remote.model_name, 0, 1, latest=True)[0][peer_id]
            assert info.quant == quant
            quantized, reference = status(model, peer_id), status(model, PeerID.from_base58(full.peer_id))
            assert quantized.quant == quant
            assert quantized.memory_per_block < {"int8": 0.35, "nf4": 0.2}[quant] * reference.memory_per_block

            input_ids = torch.randint(3, 4000, (1, 10), generator=torch.Generator().manual_seed(0))
            hidden = model.ends.embed(input_ids)
            with torch.no_grad():
                served = model.remote.forward(hidden)
            expected = hidden
            with torch.no_grad():
                for block in load_blocks(tiny_model, 0, 8, progress=False):
                    expected = block(expected)
            error = ((served - expected).norm() / expected.norm()).item()
            print(f"{quant}: relative error of final hidden states {error:.4f}")
            assert error < TOLERANCE[quant]
            assert model.generate(input_ids, max_new_tokens=4).shape == (1, 14)
    finally:
        peer.stop()
