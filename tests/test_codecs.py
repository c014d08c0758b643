"""Codecs: round trips, int8-blockwise accuracy, wire size, determinism, NaN/inf policy and corrupt payloads."""

from __future__ import annotations

import struct

import pytest
import torch

from blockswarm.compression import int8_blockwise
from blockswarm.compression.codecs import CODECS, WireFormatError, decode_tensor, encode_tensor, get_codec

INT8 = "int8-blockwise"
BIG = (1, 2048, 4096)


def rel_l2(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return ((approx.double() - reference.double()).norm() / reference.double().norm()).item()


def with_outlier_channels(shape, channels: int = 6, factor: float = 100.0, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(shape, generator=generator)
    hidden[..., torch.randperm(shape[-1], generator=generator)[:channels]] *= factor
    return hidden


def header_size(tensor: torch.Tensor) -> int:
    return 5 + 4 * tensor.dim()


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Runs a test with the fused C kernels and again with the torch ops that CUDA tensors (and builds without a C
    compiler) use."""
    if request.param == "torch":
        monkeypatch.setattr(int8_blockwise, "_NATIVE", None)
    return request.param


def test_codec_registry_keeps_ids_and_lossless_flags():
    assert {name: (codec.id, codec.lossless) for name, codec in CODECS.items()} == {
        "none": (0, True),
        "fp16": (1, False),
        "bf16": (2, False),
        INT8: (3, False),
    }
    assert get_codec(INT8) is CODECS[INT8]


@pytest.mark.parametrize("codec", sorted(CODECS))
@pytest.mark.parametrize("shape", [(2, 3, 5), (1, 1, 256), (3, 257), (1,), (), (0, 4)])
def test_every_codec_knows_its_exact_payload_size(codec, shape):
    tensor = torch.randn(shape)
    spec = get_codec(codec)
    assert len(encode_tensor(tensor, codec)) == header_size(tensor) + spec.payload_size(tensor.numel(), tensor.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 7, 256), (3, 257), (2, 3, 5), (1000,), (1,), ()])
def test_int8_round_trip_keeps_dtype_shape_and_accuracy(dtype, shape, kernels):
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    decoded = decode_tensor(encode_tensor(tensor, INT8))
    assert decoded.dtype == dtype and decoded.shape == tensor.shape and decoded.device.type == "cpu"
    # worst case per element: the square-law step at the block's absmax (2*127 - 1 steps of absmax / 127**2),
    # plus rounding the step up to bf16 and the output cast
    absmax = tensor.double().abs().max()
    tolerance = absmax * (254 / 127**2 / 2 * 1.01 + 2 * torch.finfo(dtype).eps)
    assert (decoded.double() - tensor.double()).abs().max() <= tolerance


def test_int8_handles_empty_zero_and_tiny_tensors(kernels):
    for shape in [(0,), (0, 4), (2, 0, 3)]:
        empty = torch.empty(shape, dtype=torch.bfloat16)
        decoded = decode_tensor(encode_tensor(empty, INT8))
        assert decoded.shape == empty.shape and decoded.dtype == torch.bfloat16
    zeros = torch.zeros(3, 300)
    assert torch.equal(decode_tensor(encode_tensor(zeros, INT8)), zeros)
    smallest_step = torch.finfo(torch.bfloat16).tiny  # steps never go below it, so 1 / step stays finite
    for value in [3.5, -1e-30, 1e30, 2e-38, -7.25e-41]:  # one element each, down to a subnormal
        decoded = decode_tensor(encode_tensor(torch.tensor([value]), INT8))
        assert decoded.shape == (1,)
        assert abs(decoded.item() - value) <= max(abs(value) * 0.01, smallest_step)


def test_int8_error_on_gaussian_and_outlier_activations():
    gaussian = torch.randn(BIG, generator=torch.Generator().manual_seed(0))
    gaussian_error = rel_l2(gaussian, decode_tensor(encode_tensor(gaussian, INT8)))
    outliers = with_outlier_channels(BIG)
    outlier_error = rel_l2(outliers, decode_tensor(encode_tensor(outliers, INT8)))
    small = outliers[..., :4095] / 100  # odd size; values that share blocks with outliers keep their precision
    small_error = rel_l2(small, decode_tensor(encode_tensor(small, INT8)))
    print(f"int8-blockwise rel L2: gaussian {gaussian_error:.4%}, outlier channels {outlier_error:.4%}")
    assert gaussian_error <= 0.015
    assert outlier_error <= 0.015 and small_error <= 0.015


def test_native_kernels_are_built():
    assert int8_blockwise.native_kernels(), (
        "blockswarm/compression/int8_native.c was not built: install a C compiler with OpenMP (gcc) and reinstall"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_native_and_torch_kernels_give_the_same_bytes_and_bits(dtype, monkeypatch):
    tensors = [
        with_outlier_channels((3, 5, 1000), seed=2),
        torch.randn(2, 257) * 1e-36,  # subnormal codes' neighbours and the smallest step
        torch.cat([torch.zeros(300), torch.full((10,), -2.5), torch.linspace(-1, 1, 301) ** 3]),
        torch.tensor([7.0]),
    ]
    native_wires = [encode_tensor(tensor.to(dtype), INT8) for tensor in tensors]
    native_decoded = [decode_tensor(wire) for wire in native_wires]
    monkeypatch.setattr(int8_blockwise, "_NATIVE", None)
    for tensor, wire, decoded in zip(tensors, native_wires, native_decoded):
        assert encode_tensor(tensor.to(dtype), INT8) == wire
        assert torch.equal(decode_tensor(wire).view(torch.uint8), decoded.view(torch.uint8))


def test_int8_wire_size_for_a_big_activation():
    tensor = torch.randn(BIG)
    assert len(encode_tensor(tensor, INT8)) / tensor.numel() <= 1.01
    assert len(encode_tensor(tensor.half(), INT8)) == len(encode_tensor(tensor, INT8))


@pytest.mark.parametrize("codec", list(CODECS))
def test_decoded_tensors_carry_exact_gradients_through_autograd(codec, kernels):
    """A trainer's chain returns decoded outputs from an autograd Function, and its final norm backpropagates
    through them. Inference-mode tensors silently dropped part of that gradient (the norm's scale term)."""

    class Wire(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden: torch.Tensor) -> torch.Tensor:
            return decode_tensor(encode_tensor(hidden.detach(), codec))

        @staticmethod
        def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
            return grad

    def loss_of(hidden: torch.Tensor) -> torch.Tensor:
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (normed * torch.linspace(-1, 1, hidden.shape[-1])).sum()

    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    decoded = Wire.apply(hidden)
    assert not decoded.is_inference()
    loss_of(decoded).backward()
    reference = decoded.detach().clone().requires_grad_(True)
    loss_of(reference).backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-6, atol=1e-7)


def test_int8_is_deterministic():
    tensor = with_outlier_channels((4, 33, 130))
    wire = encode_tensor(tensor, INT8)
    assert encode_tensor(tensor.clone(), INT8) == wire
    first, second = decode_tensor(wire), decode_tensor(bytearray(wire))
    assert torch.equal(first.view(torch.int32), second.view(torch.int32))


def test_int8_decode_is_exactly_code_times_abs_code_times_step(kernels):
    tensor = torch.randn(2, 300)
    wire = encode_tensor(tensor, INT8)
    blocks = int8_blockwise.num_blocks(tensor.numel())
    payload = wire[header_size(tensor) :]
    steps = torch.frombuffer(bytearray(payload[: 2 * blocks]), dtype=torch.bfloat16).double()
    codes = torch.frombuffer(bytearray(payload[2 * blocks :]), dtype=torch.int8).double()
    assert codes.abs().max() == 127 and codes.min() >= -127  # each block's absmax uses the top code
    block_of = torch.arange(tensor.numel()) // int8_blockwise.BLOCK_SIZE
    expected = (codes * codes.abs() * steps[block_of]).float()  # exact in fp64, then one rounding
    assert torch.equal(decode_tensor(wire).reshape(-1), expected)


def test_int8_keeps_a_small_block_next_to_an_outlier_block(kernels):
    tensor = torch.cat([torch.full((256,), 1000.0), torch.linspace(-1e-3, 1e-3, 256)])
    decoded = decode_tensor(encode_tensor(tensor, INT8))
    assert torch.allclose(decoded[256:], tensor[256:], rtol=0, atol=1e-3 / 127)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int8_rejects_nan_and_inf_naming_the_codec(bad, dtype, kernels):
    tensor = torch.randn(3, 300).to(dtype)
    tensor[1, 100] = bad  # element 400: block 1
    with pytest.raises(ValueError, match=r"int8-blockwise.*NaN or inf \(block 1, elements 256\.\.511\)"):
        encode_tensor(tensor, INT8)
    assert torch.equal(decode_tensor(encode_tensor(tensor, "none")).isnan(), tensor.isnan())


def test_int8_refuses_integer_tensors():
    with pytest.raises(ValueError, match="'int8-blockwise' cannot encode torch.int64"):
        encode_tensor(torch.arange(10), INT8)
    wire = bytearray(encode_tensor(torch.randn(10), INT8))
    wire[3] = 4  # dtype id of int64
    with pytest.raises(WireFormatError, match="cannot carry torch.int64"):
        decode_tensor(wire)


def _int8_wire(shape=(3, 300)) -> bytearray:
    return bytearray(encode_tensor(torch.randn(shape), INT8))


def _set_step(wire: bytearray, block: int, value: float) -> bytearray:
    offset = header_size(torch.empty(3, 300)) + 2 * block
    wire[offset : offset + 2] = torch.tensor([value], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    return wire


@pytest.mark.parametrize(
    "wire, message",
    [
        (_int8_wire()[:-1], "bytes were sent"),
        (_int8_wire()[:20], "bytes were sent"),
        (_int8_wire() + b"\x00", "bytes were sent"),
        (_int8_wire()[:5] + struct.pack("<2I", 3, 301) + _int8_wire()[13:], r"claims shape \[3, 301\]"),
        (_int8_wire()[:5] + struct.pack("<2I", 2**31, 2**31) + _int8_wire()[13:], "bytes were sent"),
        (_set_step(_int8_wire(), 2, float("nan")), "scale nan for block 2"),
        (_set_step(_int8_wire(), 0, float("inf")), "scale inf for block 0"),
        (_set_step(_int8_wire(), 3, -0.5), "scale -0.5 for block 3"),
    ],
)
def test_int8_rejects_corrupt_payloads(wire, message):
    with pytest.raises(WireFormatError, match=message):
        decode_tensor(wire)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_cuda_tensors_encode_like_cpu_ones():
    tensor = with_outlier_channels((2, 64, 1000))
    for dtype in (torch.float32, torch.float16):
        on_gpu, on_cpu = encode_tensor(tensor.cuda().to(dtype), INT8), encode_tensor(tensor.to(dtype), INT8)
        assert len(on_gpu) == len(on_cpu)
        decoded = decode_tensor(on_gpu)
        assert decoded.dtype == dtype and rel_l2(decode_tensor(on_cpu), decoded) < 1e-3  # codes may differ at ties
