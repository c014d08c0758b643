"""Qwen3, Mixtral and Qwen3-MoE through a real 3-peer swarm give exactly what transformers gives locally."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_tuning import assert_gradients_equal_local
from transformers import AutoModelForCausalLM

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.client.tuning import TuningConfig
from blockswarm.local_swarm import LocalSwarm
from blockswarm.models import load_blocks, load_config, load_ends
from blockswarm.models.random_init import init_random_model
from blockswarm.peer.adapters import AdapterError, receive_adapter
from blockswarm.wire.messages import AdapterSpec

SPANS = ("0:3", "2:6", "5:8")  # overlapping: routes use sub-spans of peers
NEW_TOKENS = 24  # with a 7-token prompt, past the qwen3 preset's 16-token sliding window


@dataclass
class FamilySwarm:
    checkpoint: Path
    swarm: LocalSwarm
    reference: torch.nn.Module  # the model in transformers, in this process
    model: DistributedModelForCausalLM  # a lossless client of the swarm


@pytest.fixture(scope="module", params=["qwen3", "mixtral", "qwen3_moe"])
def family_swarm(request, tmp_path_factory):
    """A 3-peer swarm with overlapping spans serving a tiny random model of the family."""
    family = request.param
    checkpoint = init_random_model(tmp_path_factory.mktemp("models") / family, preset="tiny", family=family)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with LocalSwarm(checkpoint, tmp_path_factory.mktemp(f"swarm-{family}")) as swarm:
        swarm.start_bootstrap()
        swarm.start_peers(SPANS)
        with DistributedModelForCausalLM.from_pretrained(checkpoint, swarm.initial_peers, codec="none") as model:
            yield FamilySwarm(checkpoint, swarm, reference, model)


def prompt(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 2000, (batch, 7), generator=torch.Generator().manual_seed(seed))


def local_greedy(reference, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return reference.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)


def test_greedy_generation_equals_transformers(family_swarm):
    reference, model = family_swarm.reference, family_swarm.model
    input_ids = prompt(batch=2, seed=0)
    assert torch.equal(
        model.generate(input_ids, max_new_tokens=NEW_TOKENS), local_greedy(reference, input_ids, NEW_TOKENS)
    )


def test_session_over_two_generate_calls_equals_one_local_generation(family_swarm):
    reference, model = family_swarm.reference, family_swarm.model
    input_ids = prompt(batch=1, seed=1)
    expected = local_greedy(reference, input_ids, NEW_TOKENS)
    half = NEW_TOKENS // 2
    with model.inference_session(max_length=input_ids.shape[1] + NEW_TOKENS):
        first = model.generate(input_ids, max_new_tokens=half)
        second = model.generate(None, max_new_tokens=NEW_TOKENS - half)
    assert torch.equal(first, expected[:, : input_ids.shape[1] + half])
    assert torch.equal(second, expected)


def test_lora_gradients_equal_local(family_swarm):
    """LoRA of attention (and of the MLP where it is dense) through the peers gets the local model's gradients."""
    config = load_config(family_swarm.checkpoint)
    targets = ("q_proj", "v_proj", "o_proj") + (() if config.num_experts else ("up_proj",))
    tuning = TuningConfig(lora_rank=4, lora_targets=targets)
    input_ids = torch.randint(3, 2000, (2, 10), generator=torch.Generator().manual_seed(2))
    blocks = load_blocks(family_swarm.checkpoint, 0, config.num_blocks, progress=False)
    ends = load_ends(family_swarm.checkpoint)
    with DistributedModelForCausalLM.from_pretrained(
        family_swarm.checkpoint, family_swarm.swarm.initial_peers, codec="none", tuning=tuning
    ) as model:
        assert_gradients_equal_local(model, blocks, ends, input_ids, seed=3)


def test_lora_of_experts_is_refused_clearly(family_swarm):
    """Clients are told before anything runs; a peer refuses such an adapter from a client that did not ask."""
    config = load_config(family_swarm.checkpoint)
    if not config.num_experts:
        pytest.skip("a dense family: LoRA of its MLP works (test above)")
    tuning = TuningConfig(lora_rank=4, lora_targets=("q_proj", "up_proj"))
    with pytest.raises(ValueError, match="LoRA of experts is not supported; choose from q_proj, k_proj"):
        DistributedModelForCausalLM.from_pretrained(
            family_swarm.checkpoint, family_swarm.swarm.initial_peers, tuning=tuning
        )
    spec = AdapterSpec(lora_rank=2, lora_targets=("up_proj",))
    tensors = [torch.zeros(2, config.hidden_size), torch.zeros(config.intermediate_size, 2)]
    with pytest.raises(AdapterError, match="LoRA of experts is not supported"):
        receive_adapter(spec, tensors, config, 1, 1, torch.device("cpu"))
