"""Fine-tuning through frozen peers: soft prompts, deep prompts and LoRA get the gradients a local model gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blockswarm.client import DistributedModelForCausalLM
from blockswarm.client.tuning import TuningConfig
from blockswarm.models import load_blocks, load_ends
from blockswarm.models.adapters import BlockAdapter
from blockswarm.wire.messages import AdapterSpec

TUNINGS = {
    "soft_prompt": TuningConfig(prompt_len=4),
    "deep_prompts": TuningConfig(prompt_len=4, deep_prompts=True),
    "lora": TuningConfig(lora_rank=4, lora_targets=("q_proj", "v_proj", "down_proj"), lora_head=True),
}


@pytest.fixture(scope="module")
def local_parts(tiny_model):
    return load_blocks(tiny_model, 0, 8), load_ends(tiny_model)


def batch(seed: int = 0, size: int = 2, length: int = 10) -> torch.Tensor:
    return torch.randint(3, 4000, (size, length), generator=torch.Generator().manual_seed(seed))


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


def local_logits(blocks, ends, adapters, input_ids: torch.Tensor) -> torch.Tensor:
    """The same model run in this process, adapters applied by hand: the reference for the swarm."""
    tuning = adapters.tuning
    hidden = adapters.prepend_prompt(ends.embed(input_ids))
    per_block = len(tuning.lora_targets) * 2 if tuning.lora_rank else 0
    for index, block in enumerate(blocks):
        lora = adapters.lora[index * per_block : (index + 1) * per_block]
        adapter = BlockAdapter(
            prompt=None if adapters.deep_prompts is None else adapters.deep_prompts[index].unsqueeze(0),
            lora={t: (lora[2 * j], lora[2 * j + 1]) for j, t in enumerate(tuning.lora_targets)} if per_block else {},
            lora_scale=tuning.lora_scale,
        )
        hidden = block(hidden, adapter=adapter)
    return adapters.logits(ends, hidden[:, tuning.prompt_len :])


def randomize(adapters, seed: int) -> None:
    """New adapters start as no-ops (zero B, zero deep prompts): make every parameter matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("kind", list(TUNINGS))
def test_gradients_equal_local(swarm, tiny_model, local_parts, kind):
    blocks, ends = local_parts
    input_ids = batch(seed=1)
    with DistributedModelForCausalLM.from_pretrained(
        tiny_model, swarm.initial_peers, codec="none", tuning=TUNINGS[kind]
    ) as model:
        assert_gradients_equal_local(model, blocks, ends, input_ids, seed=2)


def assert_gradients_equal_local(model, blocks, ends, input_ids: torch.Tensor, seed: int) -> None:
    """Random adapters of `model`: the loss and every adapter gradient through the swarm equal the local model's."""
    randomize(model.adapters, seed)
    swarm_loss = lm_loss(model(input_ids), input_ids)
    swarm_loss.backward()
    swarm_grads = {name: p.grad.clone() for name, p in model.adapters.named_parameters()}
    model.adapters.zero_grad()
    local_loss = lm_loss(local_logits(blocks, ends, model.adapters, input_ids), input_ids)
    local_loss.backward()
    local_grads = {name: p.grad for name, p in model.adapters.named_parameters()}
    assert abs(swarm_loss.item() - local_loss.item()) <= 1e-4
    assert swarm_grads.keys() == local_grads.keys() and swarm_grads
    for name, grad in swarm_grads.items():
        scale = max(1.0, local_grads[name].abs().max().item())
        assert local_grads[name].abs().max() > 0, f"{name} got no gradient: the test would prove nothing"
        assert (grad - local_grads[name]).abs().max().item() <= 1e-4 * scale, name


def test_loss_decreases_with_8bit_wire(swarm, tiny_model, tmp_path, local_parts):
    tuning = TuningConfig(prompt_len=4, deep_prompts=True, lora_rank=4, lora_head=True)
    input_ids = batch(seed=3, size=4, length=12)
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, tuning=tuning) as model:
        assert model.remote.codec == "int8-blockwise"
        optimizer = torch.optim.Adam(model.adapters.parameters(), lr=1e-2)
        losses = []
        for _ in range(6):
            optimizer.zero_grad()
            loss = lm_loss(model(input_ids), input_ids)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        saved = model.save_adapters(tmp_path / "adapter")
    assert losses[-1] < losses[0] * 0.9, losses

    # the saved adapter generates, through the swarm, what the same adapter gives locally
    blocks, ends = local_parts
    with DistributedModelForCausalLM.from_pretrained(tiny_model, swarm.initial_peers, codec="none") as model:
        adapters = model.load_adapters(saved)
        prompt = batch(seed=4, size=1, length=6)
        generated = model.generate(prompt, max_new_tokens=8)
    expected = prompt
    with torch.no_grad():
        for _ in range(8):
            logits = local_logits(blocks, ends, adapters, expected)
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, expected)


def test_new_adapters_change_nothing(swarm, tiny_model):
    """A fresh adapter (zero LoRA B, zero deep prompts) leaves the model's logits as they were."""
    input_ids = batch(seed=5)
    with (
        DistributedModelForCausalLM.from_pretrained(
            tiny_model, swarm.initial_peers, codec="none", tuning=TuningConfig(lora_rank=2, lora_head=True)
        ) as model,
        torch.no_grad(),
    ):
        tuned = model(input_ids)
        model.adapters = None
        plain = model(input_ids)
    assert torch.allclose(tuned, plain, atol=1e-5)


def test_tuning_config_errors():
    with pytest.raises(ValueError, match="prompt_len"):
        TuningConfig(deep_prompts=True)
    with pytest.raises(ValueError, match="lora_targets"):
        TuningConfig(lora_rank=2, lora_targets=("qkv",))


def test_client_and_wire_share_one_lora_definition():
    """TuningConfig and the AdapterSpec peers receive accept the same targets and agree on the scale."""
    for make in (TuningConfig, AdapterSpec):
        with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\] in lora_targets"):
            make(lora_rank=2, lora_targets=("q_proj", "qkv"))
    tuning = TUNINGS["lora"]
    spec = AdapterSpec(lora_rank=tuning.lora_rank, lora_alpha=tuning.lora_alpha, lora_targets=tuning.lora_targets)
    assert spec.lora_scale == tuning.lora_scale == 4.0
