"""Weight quantization of blocks (int8 = LLM.int8, nf4 = QLoRA NF4) against the fp32 blocks, on CPU.

Tolerances are relative L2 errors measured on the tiny random checkpoint, asserted with some margin. Random
blocks (init std 0.1) amplify weight noise ~3x: NF4 perturbs each weight matrix by ~9% (int8: ~0.7%), which
gives ~30% error on block 0, whose input (the embeddings, std 0.1) is small next to its output; later blocks,
where the residual stream dominates, see ~10%. That the layers compute exactly what their quantized weights say
is checked separately, against fp32 blocks holding the dequantized weights.
"""

from __future__ import annotations

import pytest
import torch

from blockswarm.models import KVCache, load_blocks, load_config, load_ends
from blockswarm.models.quantization import QUANT_TYPES, block_memory_bytes, projection_names, quantize_block
from blockswarm.models.random_init import init_random_model

NUM_BLOCKS = 4
LINEAR_NAMES = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
# measured on the tiny llama preset, blocks 0..3 (each fed the fp32 input), and chained through all 4
PER_BLOCK_TOLERANCE = {"int8": 0.06, "nf4": 0.4}  # measured max: int8 0.035, nf4 0.30 (both at block 0)
CHAIN_TOLERANCE = {"int8": 0.1, "nf4": 0.7}  # measured: int8 0.069, nf4 0.56
# input gradient of one block (block 1, a residual-dominated one) vs fp32
GRAD_TOLERANCE = {"int8": 0.05, "nf4": 0.3}  # measured: int8 0.020, nf4 0.196
# prefill + single-token steps with a KV cache vs the full sequence, both quantized. nf4: float rounding only.
# int8: LLM.int8 multiplies activation columns with any value above 6.0 *in the batch* in full precision, so
# which columns those are depends on which tokens go together (with threshold 0 the two agree exactly).
CACHE_TOLERANCE = {"int8": 0.04, "nf4": 1e-4}  # measured over 4 blocks: int8 0.023, nf4 1.3e-6


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def run(blocks, hidden: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        hidden = block(hidden)
    return hidden


@pytest.fixture(scope="module")
def hidden(tiny_model) -> torch.Tensor:
    """Embeddings of random tokens: what the first block really gets (std 0.1)."""
    tokens = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    return load_ends(tiny_model).embed(tokens).detach()


@pytest.fixture(scope="module")
def fp32_blocks(tiny_model):
    return load_blocks(tiny_model, 0, NUM_BLOCKS, progress=False)


@pytest.fixture(scope="module", params=["int8", "nf4"])
def quantized(request, tiny_model):
    quant = request.param
    return quant, [quantize_block(block, quant) for block in load_blocks(tiny_model, 0, NUM_BLOCKS, progress=False)]


def test_layers_are_replaced_and_biases_kept(tmp_path_factory):
    model = init_random_model(tmp_path_factory.mktemp("models") / "qwen2", preset="tiny", family="qwen2")
    (reference,) = load_blocks(model, 0, 1, progress=False)
    hidden = load_ends(model).embed(torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0)))
    import bitsandbytes as bnb

    for quant, layer_type in (("int8", bnb.nn.Linear8bitLt), ("nf4", bnb.nn.Linear4bit)):
        (block,) = load_blocks(model, 0, 1, progress=False)
        assert projection_names(block) == LINEAR_NAMES
        biases = {name: block.get_submodule(name).bias for name in LINEAR_NAMES}
        quantize_block(block, quant)
        for name in LINEAR_NAMES:
            layer = block.get_submodule(name)
            assert isinstance(layer, layer_type), name
            assert layer.bias is biases[name]  # qwen2: q/k/v have biases, the others none
        assert sum(bias is not None for bias in biases.values()) == 3
        with torch.no_grad():
            error = relative_error(block(hidden), reference(hidden))
        assert error < PER_BLOCK_TOLERANCE[quant], (quant, error)  # measured: int8 0.032, nf4 0.30


def test_outputs_close_to_fp32(quantized, fp32_blocks, hidden):
    quant, blocks = quantized
    with torch.no_grad():
        inputs = [hidden]
        for block in fp32_blocks:
            inputs.append(block(inputs[-1]))
        per_block = [relative_error(blocks[i](inputs[i]), inputs[i + 1]) for i in range(NUM_BLOCKS)]
        chained = relative_error(run(blocks, hidden), inputs[-1])
    assert max(per_block) < PER_BLOCK_TOLERANCE[quant], per_block
    assert chained < CHAIN_TOLERANCE[quant], chained


def test_nf4_computes_with_its_dequantized_weights(tiny_model, hidden):
    """Checks the layer math (incl. the padding of in_features 688 to whole 64-blocks) without quantization noise."""
    from bitsandbytes.functional import dequantize_4bit

    (block,) = load_blocks(tiny_model, 0, 1, progress=False)
    (dequantized,) = load_blocks(tiny_model, 0, 1, progress=False)
    quantize_block(block, "nf4")
    assert block.mlp.down_proj.in_features == 704  # 688 padded to whole blocks of 64
    for name in LINEAR_NAMES:
        layer, target = block.get_submodule(name), dequantized.get_submodule(name)
        weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert relative_error(weight[:, : target.in_features], target.weight) < 0.1  # NF4 on Gaussian: 0.092
        assert not weight[:, target.in_features :].any()  # the padding columns (down_proj: 688 -> 704)
        target.weight.data = weight[:, : target.in_features].contiguous()
    with torch.no_grad():
        assert relative_error(block(hidden), dequantized(hidden)) < 1e-5  # measured 1.6e-7


def test_kv_cache_steps_match_full_sequence(quantized, fp32_blocks, tiny_model, hidden):
    quant, blocks = quantized
    config = load_config(tiny_model)
    prefill = 10
    with torch.no_grad():
        full = run(blocks, hidden)
        caches = [KVCache.allocate(config, hidden.shape[0], 32, torch.float32, "cpu") for _ in blocks]
        steps = [hidden[:, :prefill]] + [hidden[:, p : p + 1] for p in range(prefill, hidden.shape[1])]
        outputs, position = [], 0
        for step in steps:
            out = step
            for block, cache in zip(blocks, caches):
                out = block(out, position, cache)
            outputs.append(out)
            position += step.shape[1]
        cached = torch.cat(outputs, dim=1)
        expected = run(fp32_blocks, hidden)
    assert relative_error(cached, full) < CACHE_TOLERANCE[quant]
    assert relative_error(cached, expected) < CHAIN_TOLERANCE[quant]


def test_input_gradients_flow_and_are_close(quantized, fp32_blocks, hidden):
    quant, blocks = quantized
    with torch.no_grad():
        block_input = fp32_blocks[0](hidden)
        without_grad = blocks[1](block_input)  # first, as a peer serving inference would: must not break backward
    weights = torch.randn(block_input.shape, generator=torch.Generator().manual_seed(1))

    def forward_backward(block) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = block_input.clone().requires_grad_()
        out = block(inputs)
        (out * weights).sum().backward()
        return out.detach(), inputs.grad

    out, grad = forward_backward(blocks[1])
    assert torch.equal(out, without_grad)
    assert grad is not None and torch.isfinite(grad).all()
    assert relative_error(grad, forward_backward(fp32_blocks[1])[1]) < GRAD_TOLERANCE[quant]


def test_memory_ratios(quantized, fp32_blocks):
    quant, blocks = quantized
    limit = {"int8": 0.35, "nf4": 0.2}[quant]
    for block, reference in zip(blocks, fp32_blocks):
        ratio = block_memory_bytes(block) / block_memory_bytes(reference)
        assert ratio < limit, ratio  # measured: int8 0.254, nf4 0.133


def test_memory_counts_quantization_state(tiny_model):
    (block,) = load_blocks(tiny_model, 0, 1, progress=False)
    fp32 = block_memory_bytes(block)
    assert fp32 == sum(p.numel() * 4 for p in block.parameters())
    quantize_block(block, "int8")
    int8_weights = sum(block.get_submodule(name).weight.numel() for name in LINEAR_NAMES)
    row_scales = sum(block.get_submodule(name).out_features * 4 for name in LINEAR_NAMES)
    norms = sum(p.numel() * 4 for p in block.parameters() if p.dtype == torch.float32)
    assert block_memory_bytes(block) == int8_weights + row_scales + norms


def test_bf16_blocks(tiny_model, hidden, fp32_blocks):
    for quant in ("int8", "nf4"):
        (block,) = load_blocks(tiny_model, 0, 1, dtype=torch.bfloat16, progress=False)
        quantize_block(block, quant)
        with torch.no_grad():
            out = block(hidden.bfloat16())
            assert out.dtype == torch.bfloat16
            assert relative_error(out, fp32_blocks[0](hidden)) < PER_BLOCK_TOLERANCE[quant]  # int8 0.036, nf4 0.30


def test_none_unknown_and_twice(tiny_model):
    (block,) = load_blocks(tiny_model, 0, 1, progress=False)
    assert quantize_block(block, "none") is block
    assert type(block.self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(ValueError, match="unknown weight quantization 'int4'.*none, int8, nf4"):
        quantize_block(block, "int4")
    assert QUANT_TYPES == ("none", "int8", "nf4")
    quantize_block(block, "nf4")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_block(block, "int8")


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_experts_are_quantized_and_routers_kept(tmp_path_factory, quant):
    """A mixture of experts: every expert's projections are quantized; the router stays in full precision."""
    import bitsandbytes as bnb

    model = init_random_model(tmp_path_factory.mktemp("models") / "mixtral", preset="tiny", family="mixtral")
    (reference,) = load_blocks(model, 1, 2, progress=False)
    (block,) = load_blocks(model, 1, 2, progress=False)
    experts = [f"mlp.experts.{e}.{p}_proj" for e in range(4) for p in ("gate", "up", "down")]
    assert projection_names(block) == LINEAR_NAMES[:4] + experts
    quantize_block(block, quant)
    layer_type = bnb.nn.Linear8bitLt if quant == "int8" else bnb.nn.Linear4bit
    assert all(isinstance(block.get_submodule(name), layer_type) for name in LINEAR_NAMES[:4] + experts)
    assert type(block.mlp.gate) is torch.nn.Linear and torch.equal(block.mlp.gate.weight, reference.mlp.gate.weight)
    assert block_memory_bytes(block) < {"int8": 0.35, "nf4": 0.2}[quant] * block_memory_bytes(reference)
    hidden = torch.randn(2, 16, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = relative_error(block(hidden), reference(hidden))
    assert error < PER_BLOCK_TOLERANCE[quant], error
