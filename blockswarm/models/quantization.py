"""Weight quantization of the blocks a peer serves, with bitsandbytes: LLM.int8 ("int8") or QLoRA's NF4 ("nf4").

The projections of a block are quantized (attention, the MLP or every expert of a mixture: ~all of its bytes); norms
and the routers of a mixture of experts stay in the block's dtype (few bytes, and they decide which experts run).
Both types run forward (with or without a KV cache, with or without grad) and backward w.r.t. the input hidden
states, on CPU and CUDA. The quantized weights themselves are frozen: bitsandbytes has no gradient for them.

How bitsandbytes 0.50 behaves here, and why the code below is shaped the way it is:
- Quantization happens when `Int8Params` / `Params4bit` are moved with `.to(device)`, "cpu" included. `Int8Params`
  only quantizes when its data is on the CPU (moving CUDA data returns it unquantized), so weights go through the
  CPU first. Load blocks on the CPU and quantize straight to "cuda": the fp32 weights never occupy the GPU.
- int8 on CPU: a block in eval mode takes the LLM.int8 path (activations quantized per token through fp16,
  columns above the 6.0 outlier threshold kept in full precision; fp32 output). Backward for the input
  dequantizes the int8 weight. bitsandbytes logs a warning about the fp16 cast on every call; we drop that one
  message (it is the algorithm, not a problem) so peers' logs stay readable.
- nf4 on CPUs with AVX512-BF16: the first forward without grad would repack the weight into a bf16 inference
  layout, for good. After that, forward with grad goes through a kernel without autograd and the input gradient
  is silently None. We turn that repacking off (`support_avx512bf16_for_cpu = False`): a peer runs inference and
  backward on the same block, and results must not depend on the CPU model or the order of calls. The cost is
  speed (each call dequantizes the weight to the compute dtype), not memory.
- nf4 on CPU: the 4-bit dequantization kernel (forward and backward) is only right when in_features is a
  multiple of the block size; layers where it is not get zero columns up to whole blocks (see `_nf4_layer`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from blockswarm.models.block import SparseMoE, TransformerBlock

QUANT_TYPES = ("none", "int8", "nf4")
INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8's default: activation columns above it are multiplied in full precision
NF4_BLOCKSIZE = 64  # QLoRA's block size (one absmax per 64 weights), with QLoRA's double quantization of absmax


def quantize_block(block: TransformerBlock, quant: str, device: torch.device | str = "cpu") -> TransformerBlock:
    """Replace the block's linear layers (biases kept) with bitsandbytes layers on `device`; return the block.

    "none" returns the block as it is (same object, not moved). Otherwise the block is modified in place: its
    projections are quantized on `device` and its other parameters moved there. Raises ValueError for an unknown
    quant type or a block whose projections are not plain `nn.Linear` (e.g. quantized already).
    """
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown weight quantization {quant!r}; valid types: {', '.join(QUANT_TYPES)}")
    if quant == "none":
        return block
    device = torch.device(device)
    names = projection_names(block)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not a plain nn.Linear: quantized already?")
        setattr(parent, attr, _int8_layer(linear) if quant == "int8" else _nf4_layer(linear))
    block.to(device)  # bitsandbytes quantizes the weights here, on `device`; the norms just move
    quantized_weights = set()
    for name in names:
        layer = block.get_submodule(name)
        if hasattr(layer, "init_8bit_state"):
            layer.init_8bit_state()  # what the first forward would do: now, so that forward never changes state
        quantized_weights.add(id(layer.weight))
    # Loaded tensors view the checkpoint's mmapped safetensors file: one small survivor (a norm, a bias) keeps
    # the whole mapping alive, with every page that quantization read still resident. Give them their own memory.
    for tensor in (*block.parameters(), *block.buffers()):
        if id(tensor) not in quantized_weights:
            tensor.data = tensor.data.clone()
    return block


def projection_names(block: TransformerBlock) -> list[str]:
    """The names of the block's linear layers that quantization replaces: all but the routers of experts."""
    routers = {id(layer) for module in block.modules() if isinstance(module, SparseMoE) for layer in module.routers()}
    return [
        name for name, module in block.named_modules() if isinstance(module, nn.Linear) and id(module) not in routers
    ]


def block_memory_bytes(block: nn.Module) -> int:
    """Bytes the block keeps resident: parameters, buffers and bitsandbytes' quantization state (int8 row scales,
    4-bit absmax and codebooks), each storage counted once."""
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for tensor in _resident_tensors(block):
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if tensor.device.type == "meta" or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _int8_layer(linear: nn.Linear) -> nn.Module:
    """An LLM.int8 layer holding `linear`'s weight unquantized, on the CPU: it quantizes when moved."""
    import bitsandbytes as bnb

    _silence_fp16_cast_warning()
    # built on "meta" so that nn.Linear's random init allocates nothing; the real tensors are assigned below
    layer = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=INT8_OUTLIER_THRESHOLD,
        device="meta",
    )
    # Int8Params only quantizes when it moves from the CPU (CUDA data would stay unquantized)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False, has_fp16_weights=False)
    layer.bias = linear.bias
    return layer.train(linear.training)


def _nf4_layer(linear: nn.Linear) -> nn.Module:
    """A QLoRA NF4 layer holding `linear`'s weight unquantized: it quantizes when moved."""
    import bitsandbytes as bnb

    # bitsandbytes' CPU 4-bit dequantization (forward and backward) assumes whole blocks per weight row: with
    # in_features % 64 != 0 (688, 1376 in our presets) it scales weights with the wrong absmax (24% error instead
    # of 9%). Zero columns up to a whole block, and zeros appended to the input, keep every row block-aligned.
    pad = -linear.in_features % NF4_BLOCKSIZE
    layer = bnb.nn.Linear4bit(
        linear.in_features + pad,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=linear.weight.dtype,  # fixed now: otherwise the first input's dtype would decide, for good
        compress_statistics=True,
        quant_type="nf4",
        device="meta",
    )
    layer.support_avx512bf16_for_cpu = False  # see the module docstring: the repacked layout breaks backward
    layer.weight = bnb.nn.Params4bit(
        F.pad(linear.weight.detach(), (0, pad)) if pad else linear.weight.detach(),
        requires_grad=False,
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=True,
        quant_type="nf4",
        module=layer,
    )
    layer.bias = linear.bias
    if pad:
        layer.register_forward_pre_hook(functools.partial(_pad_input, pad))
    return layer.train(linear.training)


def _pad_input(pad: int, layer: nn.Module, args: tuple) -> tuple:
    return (F.pad(args[0], (0, pad)), *args[1:])


def _resident_tensors(block: nn.Module) -> Iterator[torch.Tensor]:
    yield from block.parameters()
    yield from block.buffers()
    for module in block.modules():
        # LLM.int8 keeps CB/SCB in `module.state` (and in the weight until the first forward); 4-bit layers keep
        # absmax, codebooks and the nested state in `weight.quant_state`, referenced from the module too
        for holder in (getattr(module, "state", None), getattr(module, "quant_state", None)):
            yield from _tensors_of(holder)
        for param in module.parameters(recurse=False):
            yield from _tensors_of(param)


def _tensors_of(holder: object, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors among the attributes of a bitsandbytes state object, and of the state objects it nests."""
    if not hasattr(holder, "__dict__") or depth > 3:
        return
    for value in vars(holder).values():
        if isinstance(value, torch.Tensor):
            yield value
            if type(value) is not torch.Tensor:  # a tensor subclass holding more state (Int8Params.SCB ...)
                yield from _tensors_of(value, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, nn.Module | type | logging.Logger):
            yield from _tensors_of(value, depth + 1)


class _DropFp16CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast from" not in record.getMessage()


def _silence_fp16_cast_warning() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropFp16CastWarning) for f in logger.filters):
        logger.addFilter(_DropFp16CastWarning())
