"""blockswarm.models.checkpoints: span files, and full checkpoints reassembled from them that transformers loads."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from blockswarm.models import load_blocks
from blockswarm.models.checkpoints import load_span, reassemble, save_span
from blockswarm.models.loading import INDEX_FILE
from blockswarm.models.random_init import init_random_model

NUM_BLOCKS = 8


def _perturbed_blocks(model: str, seed: int) -> list:
    """All blocks of `model` with every weight moved, as training would."""
    blocks = load_blocks(model, 0, NUM_BLOCKS, progress=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks:
            for param in block.parameters():
                param.add_(torch.randn(param.shape, generator=generator))
    return blocks


def _base_tensors(model: str) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model).state_dict()


def _assert_blocks_equal(state: dict[str, torch.Tensor], blocks: list, start: int, end: int) -> None:
    for i in range(start, end):
        for name, tensor in blocks[i].state_dict().items():
            assert torch.equal(state[f"model.layers.{i}.{name}"], tensor), f"block {i} {name}"


def test_save_and_load_span(tiny_model, tmp_path):
    blocks = _perturbed_blocks(tiny_model, seed=1)
    path = tmp_path / "span.safetensors"
    save_span(blocks[2:5], 2, path, {"epoch": "7", "model": "tiny"})
    assert [p.name for p in tmp_path.iterdir()] == ["span.safetensors"]  # no temporary file left behind

    span = load_span(path)
    assert (span.start, span.end, span.epoch) == (2, 5, 7)
    assert span.metadata["model"] == "tiny"
    assert len(span.tensors) == 3 * len(blocks[0].state_dict())
    assert torch.equal(span.tensors["model.layers.4.mlp.up_proj.weight"], blocks[4].mlp.up_proj.weight)

    with pytest.raises(ValueError, match="reserved"):
        save_span(blocks[:1], 0, tmp_path / "bad.safetensors", {"start": "3"})
    with pytest.raises(ValueError, match="strings"):
        save_span(blocks[:1], 0, tmp_path / "bad.safetensors", {"epoch": 3})
    assert not (tmp_path / "bad.safetensors").exists()


def test_reassemble_takes_the_newest_span_of_each_block_and_the_ends(tiny_model, tmp_path):
    trained, stale = _perturbed_blocks(tiny_model, seed=1), _perturbed_blocks(tiny_model, seed=2)
    spans = [tmp_path / "0-3.safetensors", tmp_path / "old-0-3.safetensors", tmp_path / "3-8.safetensors"]
    save_span(trained[0:3], 0, spans[0], {"epoch": "5"})
    save_span(stale[0:3], 0, spans[1], {"epoch": "4"})  # listed later, but older: must lose
    save_span(trained[3:8], 3, spans[2], {})  # no epoch: counts as 0, and nothing else covers these blocks
    base = _base_tensors(tiny_model)
    ends = {"model.embed_tokens.weight": torch.randn_like(base["model.embed_tokens.weight"])}
    save_file(ends, tmp_path / "ends.safetensors")

    out = reassemble(tiny_model, spans, tmp_path / "out", ends_file=tmp_path / "ends.safetensors", progress=False)

    state = AutoModelForCausalLM.from_pretrained(out).state_dict()
    _assert_blocks_equal(state, trained, 0, NUM_BLOCKS)
    assert torch.equal(state["model.embed_tokens.weight"], ends["model.embed_tokens.weight"])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(state[name], base[name])
    assert AutoTokenizer.from_pretrained(out)("hello swarm").input_ids[0] == 1  # tokenizer files came along
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # temporary directory renamed away

    with pytest.raises(FileExistsError):
        reassemble(tiny_model, spans, out, progress=False)


def test_reassemble_refuses_gaps_unless_base_blocks_are_allowed(tiny_model, tmp_path):
    trained = _perturbed_blocks(tiny_model, seed=1)
    spans = [tmp_path / "0-3.safetensors", tmp_path / "5-6.safetensors"]
    save_span(trained[0:3], 0, spans[0], {})
    save_span(trained[5:6], 5, spans[1], {})

    with pytest.raises(ValueError, match="blocks 3-4, 6-7"):
        reassemble(tiny_model, spans, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

    out = reassemble(tiny_model, spans, tmp_path / "out", allow_base_blocks=True, progress=False)
    state, base = AutoModelForCausalLM.from_pretrained(out).state_dict(), _base_tensors(tiny_model)
    _assert_blocks_equal(state, trained, 0, 3)
    _assert_blocks_equal(state, trained, 5, 6)
    for name, tensor in state.items():
        if not any(name.startswith(f"model.layers.{i}.") for i in (0, 1, 2, 5)):
            assert torch.equal(tensor, base[name]), name


def test_reassemble_keeps_a_sharded_base_sharded(tmp_path):
    base = init_random_model(tmp_path / "sharded", preset="tiny", max_shard_size="2MB")
    assert (base / INDEX_FILE).is_file()
    trained = _perturbed_blocks(base, seed=3)
    span = tmp_path / "all.safetensors"
    save_span(trained, 0, span, {"epoch": "1"})

    out = reassemble(base, [span], tmp_path / "out", progress=False)

    assert (out / INDEX_FILE).is_file()
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    _assert_blocks_equal(AutoModelForCausalLM.from_pretrained(out).state_dict(), trained, 0, NUM_BLOCKS)


def test_reassemble_rejects_spans_of_another_model(tiny_model, tmp_path):
    trained = _perturbed_blocks(tiny_model, seed=1)
    good, wrong_shape, beyond = (tmp_path / f"{name}.safetensors" for name in ("good", "wrong_shape", "beyond"))
    save_span(trained, 0, good, {})
    with safe_open(str(good), framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(good)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, wrong_shape, metadata=metadata)
    save_span(trained[:2], 7, beyond, {})

    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight .* shape \(3, 3\)"):
        reassemble(tiny_model, [wrong_shape], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="holds blocks 7:9"):
        reassemble(tiny_model, [good, beyond], tmp_path / "out", progress=False)
    save_file({"lm_head.bias": torch.zeros(3)}, tmp_path / "ends.safetensors")
    with pytest.raises(ValueError, match="not \\['lm_head.bias'\\]"):
        reassemble(tiny_model, [good], tmp_path / "out", ends_file=tmp_path / "ends.safetensors", progress=False)
    assert not (tmp_path / "out").exists()


def test_mixtral_spans_use_the_checkpoint_names_and_reassemble(tmp_path):
    """Mixtral names its experts `block_sparse_moe.experts.E.w1` in checkpoints; span files and the reassembled
    checkpoint keep those names, and load back into the trained blocks (and into transformers)."""
    model = init_random_model(tmp_path / "mixtral", "tiny", "mixtral")
    trained = _perturbed_blocks(model, seed=1)
    spans = [tmp_path / "0-5.safetensors", tmp_path / "5-8.safetensors"]
    save_span(trained[0:5], 0, spans[0], {"epoch": "1"})
    save_span(trained[5:8], 5, spans[1], {"epoch": "1"})
    span = load_span(spans[1])
    assert torch.equal(
        span.tensors["model.layers.6.block_sparse_moe.experts.3.w3.weight"], trained[6].mlp.experts[3].up_proj.weight
    )
    assert not [name for name in span.tensors if ".mlp." in name]

    out = reassemble(model, spans, tmp_path / "out", progress=False)
    for ours, reloaded in zip(trained, load_blocks(out, 0, NUM_BLOCKS, progress=False), strict=True):
        for (name, tensor), reloaded_tensor in zip(
            ours.state_dict().items(), reloaded.state_dict().values(), strict=True
        ):
            assert torch.equal(tensor, reloaded_tensor), name
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == 4
