"""blockswarm.models against transformers' own implementations of every family: Llama, Mistral, Qwen2, Qwen3, Mixtral
and Qwen3-MoE."""

import json
import shutil
import types
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_batched_decode import make_config
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import blockswarm.models.loading as loading
from blockswarm.models import (
    KVCache,
    ModelConfig,
    ModelEnds,
    TransformerBlock,
    load_blocks,
    load_config,
    load_ends,
    resolve_checkpoint,
    weights_fingerprint,
)
from blockswarm.models.config import SUPPORTED_FAMILIES
from blockswarm.models.families import checkpoint_name
from blockswarm.models.random_init import FAMILY_SETTINGS, PRESETS, init_random_model, random_model_config

TOL = 1e-5
SEQ = 12
SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=3,
    vocab_size=128,
    max_position_embeddings=64,
    initializer_range=0.1,  # large weights make differences visible
)
VARIANTS = {
    "llama3": dict(
        model_type="llama",
        rope_theta=10000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "llama-linear-bias": dict(
        model_type="llama",
        attention_bias=True,
        rope_theta=10000.0,
        rope_scaling=dict(rope_type="linear", factor=2.0),
    ),
    "mistral": dict(model_type="mistral", sliding_window=5),  # exceeded by SEQ tokens
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    # q/k norms, biases on q/k/v and o; block 0 attends fully, blocks 1-2 within a window SEQ exceeds
    "qwen3": dict(
        model_type="qwen3", attention_bias=True, use_sliding_window=True, sliding_window=5, max_window_layers=1
    ),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
    # top-2 of 4 experts without renormalizing; block 1 has a dense MLP
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=False,
        mlp_only_layers=[1],
        use_sliding_window=True,
        sliding_window=5,
    ),
}


def make_hf_model(variant, seed=0):
    kwargs = dict(VARIANTS[variant])
    config = AutoConfig.for_model(kwargs.pop("model_type"), **SIZES, **kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def reference(request, tmp_path_factory):
    """(checkpoint dir, transformers model, input ids, transformers outputs with hidden states)."""
    model = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = model(input_ids, output_hidden_states=True)
    return path, model, input_ids, outputs


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_whole_sequence_matches_transformers(reference):
    path, _, input_ids, outputs = reference
    blocks, ends = load_blocks(path, 0, SIZES["num_hidden_layers"], progress=False), load_ends(path)
    with torch.no_grad():
        hidden = ends.embed(input_ids)
        assert max_diff(hidden, outputs.hidden_states[0]) <= TOL
        for i, block in enumerate(blocks):
            hidden = block(hidden)
            if i + 1 < len(blocks):  # transformers' last hidden state is after the final norm
                assert max_diff(hidden, outputs.hidden_states[i + 1]) <= TOL, f"block {i}"
        assert max_diff(ends.norm(hidden), outputs.hidden_states[-1]) <= TOL
        assert max_diff(ends.logits(hidden), outputs.logits) <= TOL


def test_cache_steps_match_full_sequence(reference):
    """Prefill, a chunk after a prefix (explicit mask, window cut for mistral), then single tokens."""
    path, _, input_ids, outputs = reference
    blocks, ends = load_blocks(path, 0, SIZES["num_hidden_layers"], progress=False), load_ends(path)
    config = load_config(path)
    caches = [KVCache.allocate(config, 2, SEQ + 4, torch.float32, "cpu") for _ in blocks]
    steps = [(0, 5), (5, 8)] + [(p, p + 1) for p in range(8, SEQ)]
    per_block = [[] for _ in blocks]
    with torch.no_grad():
        for start, end in steps:
            hidden = ends.embed(input_ids[:, start:end])
            for i, (block, cache) in enumerate(zip(blocks, caches, strict=True)):
                hidden = block(hidden, start, cache)
                per_block[i].append(hidden)
    for i in range(len(blocks) - 1):
        assert max_diff(torch.cat(per_block[i], dim=1), outputs.hidden_states[i + 1]) <= TOL, f"block {i}"
    assert max_diff(ends.logits(torch.cat(per_block[-1], dim=1)), outputs.logits) <= TOL


def test_offset_positions_without_cache(reference):
    path, model, input_ids, _ = reference
    blocks, ends = load_blocks(path, 0, SIZES["num_hidden_layers"], progress=False), load_ends(path)
    with torch.no_grad():
        expected = model(input_ids[:, 3:], position_ids=torch.arange(3, SEQ)[None]).logits
        hidden = ends.embed(input_ids[:, 3:])
        for block in blocks:
            hidden = block(hidden, position=3)
        assert max_diff(ends.logits(hidden), expected) <= TOL


def test_input_gradients_match_transformers(reference):
    """Backward through the first two blocks (no cache) w.r.t. their input hidden states."""
    path, model, _, _ = reference
    blocks = load_blocks(path, 0, 2, progress=False)
    embeds = torch.randn(2, SEQ, SIZES["hidden_size"], generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, SEQ, SIZES["hidden_size"], generator=torch.Generator().manual_seed(2))

    theirs = embeds.clone().requires_grad_()
    (model(inputs_embeds=theirs, output_hidden_states=True).hidden_states[2] * weights).sum().backward()
    ours = embeds.clone().requires_grad_()
    (blocks[1](blocks[0](ours)) * weights).sum().backward()
    assert max_diff(ours.grad, theirs.grad) <= TOL
    assert all(p.grad is None and not p.requires_grad for block in blocks for p in block.parameters())


def test_parameter_names_match_checkpoint(reference):
    path, _, _, _ = reference
    config = load_config(path)
    saved = set(load_file(path / "model.safetensors"))
    for index in range(config.num_blocks):
        prefix = f"model.layers.{index}."
        ours = {prefix + checkpoint_name(config.family, name) for name in TransformerBlock(config, index).state_dict()}
        assert ours == {name for name in saved if name.startswith(prefix)}, f"block {index}"
    ends = ModelEnds(config)
    if config.tie_word_embeddings:
        assert ends.lm_head is None and "lm_head.weight" not in ends.state_dict()
        loaded = load_ends(path)
        assert loaded.lm_head_weight.data_ptr() == loaded.embed_tokens.weight.data_ptr()
    else:
        assert set(ends.state_dict()) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}


# ---------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same llama model saved as one file and as several shards."""
    model = make_hf_model("llama3")
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    return single, sharded


def test_sharded_loads_only_needed_shards(checkpoints, monkeypatch):
    single, sharded = checkpoints
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 2
    opened = []
    real_safe_open = loading.safe_open
    monkeypatch.setattr(loading, "safe_open", lambda path, **kw: opened.append(path) or real_safe_open(path, **kw))

    blocks = load_blocks(sharded, 1, 2, progress=False)
    needed = {weight_map[name] for name in weight_map if name.startswith("model.layers.1.")}
    assert sorted(str(sharded / name) for name in needed) == sorted(opened)
    reference = load_blocks(single, 1, 2, progress=False)
    for (name, ours), theirs in zip(blocks[0].state_dict().items(), reference[0].state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert weights_fingerprint(sharded) != weights_fingerprint(single)


def test_loaded_blocks_are_frozen_and_typed(checkpoints):
    blocks = load_blocks(checkpoints[0], 0, 2, dtype=torch.bfloat16, progress=False)
    assert len(blocks) == 2 and all(not block.training for block in blocks)
    for param in blocks[1].parameters():
        assert param.dtype == torch.bfloat16 and param.device.type == "cpu" and not param.requires_grad


def test_hub_cache_layout(checkpoints, tmp_path, monkeypatch):
    single, _ = checkpoints
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(single, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    assert resolve_checkpoint("org/tiny") == snapshot
    assert load_config("org/tiny") == load_config(single)
    blocks = load_blocks("org/tiny", 2, 3, progress=False)
    assert torch.equal(blocks[0].mlp.up_proj.weight, load_blocks(single, 2, 3, progress=False)[0].mlp.up_proj.weight)
    assert weights_fingerprint("org/tiny") == weights_fingerprint(single)
    with pytest.raises(FileNotFoundError, match="org/missing"):
        resolve_checkpoint("org/missing")


def test_loading_errors(checkpoints, tmp_path):
    single, _ = checkpoints
    with pytest.raises(ValueError, match=r"\[2, 5\)"):
        load_blocks(single, 2, 5, progress=False)
    with pytest.raises(ValueError, match="range"):
        load_blocks(single, 1, 1, progress=False)

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(single / "config.json", broken)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_blocks(broken, 0, 1, progress=False)
    tensors = load_file(single / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    load_blocks(broken, 0, 1, progress=False)  # block 0 is complete
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_blocks(broken, 0, 2, progress=False)
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "nowhere")


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(checkpoints, dtype):
    single, _ = checkpoints
    config = load_config(single)
    hidden = torch.randn(2, 8, config.hidden_size, generator=torch.Generator().manual_seed(3))
    results = {}
    for run_dtype in (torch.float32, dtype):
        out, stepped = hidden.to(run_dtype), hidden.to(run_dtype)
        with torch.no_grad():
            for block in load_blocks(single, 0, config.num_blocks, dtype=run_dtype, progress=False):
                cache = KVCache.allocate(config, 2, 8, run_dtype, "cpu")
                out = block(out)
                stepped = torch.cat(
                    [block(stepped[:, :4], 0, cache)] + [block(stepped[:, p : p + 1], p, cache) for p in range(4, 8)],
                    1,
                )
        assert out.dtype == stepped.dtype == run_dtype
        results[run_dtype] = out.float(), stepped.float()
    scale = results[torch.float32][0].abs().max()
    for ours, full in zip(results[dtype], results[torch.float32], strict=True):
        assert max_diff(ours, full) / scale < 3e-2


# ---------------------------------------------------------------- config


# a transformers 4.x Llama config's fields, as an old config.json would give them
OLD_STYLE_FIELDS = dict(
    model_type="llama",
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    rms_norm_eps=1e-5,
    rope_theta=5e5,
    rope_scaling={"type": "linear", "factor": 2.0},
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def test_config_from_old_style_fields():
    old = types.SimpleNamespace(**OLD_STYLE_FIELDS)
    config = ModelConfig.from_hf(old)
    assert config.head_dim == 16 and config.rope_theta == 5e5
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert not config.attention_bias and config.sliding_window is None
    new = ModelConfig.from_hf(AutoConfig.for_model(**vars(old)))
    assert new == config and new.fingerprint() == config.fingerprint() and hash(new) == hash(config)
    assert ModelConfig.from_hf(types.SimpleNamespace(**{**vars(old), "rope_scaling": None})).rope_scaling is None

    assert (
        len(
            {
                config.fingerprint(),
                ModelConfig.from_hf(types.SimpleNamespace(**{**vars(old), "vocab_size": 101})).fingerprint(),
            }
        )
        == 2
    )
    # the config of test_config_from_old_style_fields hashed as the release before MoE families did: peers and
    # clients of both releases still agree on the models they both serve
    assert config.fingerprint() == "b4115681b3332b2f"
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        ModelConfig.from_hf(types.SimpleNamespace(**{**vars(old), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        ModelConfig.from_hf(
            types.SimpleNamespace(**{**vars(old), "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
        )


def test_config_reads_windows_and_experts_per_layer():
    qwen3 = types.SimpleNamespace(
        **{**OLD_STYLE_FIELDS, "model_type": "qwen3", "num_hidden_layers": 4},
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,  # a 4.x config: no layer_types
    )
    config = ModelConfig.from_hf(qwen3)
    assert config.qk_norm and [config.window_of(i) for i in range(4)] == [None, 8, 8, 8]
    assert (
        ModelConfig.from_hf(types.SimpleNamespace(**{**vars(qwen3), "use_sliding_window": False})).sliding_window
        is None
    )
    chunked = types.SimpleNamespace(**{**vars(qwen3), "layer_types": ["chunked_attention"] * 4})
    with pytest.raises(ValueError, match="chunked_attention"):
        ModelConfig.from_hf(chunked)

    moe = types.SimpleNamespace(
        **{**vars(qwen3), "model_type": "qwen3_moe", "use_sliding_window": False},
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        decoder_sparse_step=2,  # blocks 1 and 3 are sparse ...
        mlp_only_layers=[3],  # ... but 3 is dense anyway
    )
    config = ModelConfig.from_hf(moe)
    assert [config.is_moe(i) for i in range(4)] == [False, True, False, False]
    windowed = ModelConfig.from_hf(types.SimpleNamespace(**{**vars(moe), "use_sliding_window": True}))
    assert [windowed.window_of(i) for i in range(4)] == [8] * 4  # every layer: max_window_layers is Qwen2/3's
    assert (config.expert_intermediate_size, config.normalize_expert_weights) == (32, False)
    with pytest.raises(ValueError, match=r"num_experts_per_tok must be in \[1, 4\], got 5"):
        ModelConfig.from_hf(types.SimpleNamespace(**{**vars(moe), "num_experts_per_tok": 5}))


# ---------------------------------------------------------------- random models


@pytest.mark.parametrize("family", list(FAMILY_SETTINGS))
def test_init_random_model_tiny(tmp_path, family):
    state = torch.random.get_rng_state()
    path = init_random_model(tmp_path / family, "tiny", family, seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    config = load_config(path)
    preset = PRESETS["tiny"]
    assert (config.family, config.hidden_size, config.num_blocks) == (family, 256, 8)
    assert config.num_kv_heads < config.num_heads and config.vocab_size == preset["vocab_size"]
    assert (config.rope_scaling or {}).get("rope_type") == ("llama3" if family == "llama" else None)
    assert (config.sliding_window is not None) == (family in ("mistral", "qwen3"))
    assert config.full_attention_layers == ((0, 1, 2, 3) if family == "qwen3" else ())
    assert config.attention_bias == (family == "qwen2")
    assert config.tie_word_embeddings == (family in ("qwen2", "qwen3"))
    assert config.qk_norm == (family in ("qwen3", "qwen3_moe"))
    moe = family in ("mixtral", "qwen3_moe")
    assert (config.num_experts, config.experts_per_token) == ((4, 2) if moe else (0, 0))
    assert config.normalize_expert_weights == moe and config.dense_layers == ()

    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "Hello, swarm! Ünïcode ☃ and numbers 12345."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id and max(ids) < config.vocab_size
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id is not None and len(tokenizer) <= config.vocab_size

    # greedy decoding must not hinge on near-ties: other tests compare tokens between processes
    blocks, ends = load_blocks(path, 0, config.num_blocks, progress=False), load_ends(path)
    caches = [KVCache.allocate(config, 1, 64, torch.float32, "cpu") for _ in blocks]
    tokens, position = torch.tensor([ids]), 0
    with torch.no_grad():
        for _ in range(8):
            hidden = ends.embed(tokens)
            for block, cache in zip(blocks, caches, strict=True):
                hidden = block(hidden, position, cache)
            top2 = ends.logits(hidden[:, -1]).topk(2).values[0]
            assert top2[0] - top2[1] > 1e-3
            position += tokens.shape[1]
            tokens = ends.logits(hidden[:, -1:]).argmax(-1)


def test_init_random_model_seeds_and_shards(tmp_path):
    a = init_random_model(tmp_path / "a", "tiny", "llama", seed=0, max_shard_size="2MB")
    b = init_random_model(tmp_path / "b", "tiny", "llama", seed=0)
    c = init_random_model(tmp_path / "c", "tiny", "llama", seed=1)
    assert (a / "model.safetensors.index.json").is_file()
    block_a, block_b, block_c = (load_blocks(p, 5, 6, progress=False)[0] for p in (a, b, c))
    assert torch.equal(block_a.self_attn.q_proj.weight, block_b.self_attn.q_proj.weight)
    assert not torch.equal(block_a.self_attn.q_proj.weight, block_c.self_attn.q_proj.weight)
    assert len({weights_fingerprint(a), weights_fingerprint(b), weights_fingerprint(c)}) == 3


@pytest.mark.parametrize("preset", ["small", "medium"])
@pytest.mark.parametrize("family", list(FAMILY_SETTINGS))
def test_larger_preset_configs(preset, family):
    config = ModelConfig.from_hf(random_model_config(preset, family))
    sizes = PRESETS[preset]
    assert config.hidden_size == sizes["hidden_size"] and config.num_blocks == sizes["num_hidden_layers"]
    assert config.num_kv_heads < config.num_heads and config.head_dim * config.num_heads == config.hidden_size
    assert config.family == family
    assert (PRESETS["medium"]["intermediate_size"], PRESETS["medium"]["vocab_size"]) == (2816, 32000)


def test_init_model_command_offers_every_family():
    from blockswarm.cli.parser import build_parser

    assert list(FAMILY_SETTINGS) == list(SUPPORTED_FAMILIES)  # a random model of every family blocks serve
    for family in FAMILY_SETTINGS:
        assert build_parser().parse_args(["init-model", "out", "--family", family]).family == family


# ---------------------------------------------------------------- mixtures of experts


def _copy_experts(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    """transformers' mixture (experts fused into 3-D tensors) into ours (a module per expert)."""
    ours.gate.weight.data.copy_(theirs.gate.weight)
    for index, expert in enumerate(ours.experts):
        gate, up = theirs.experts.gate_up_proj[index].chunk(2)
        expert.gate_proj.weight.data.copy_(gate)
        expert.up_proj.weight.data.copy_(up)
        expert.down_proj.weight.data.copy_(theirs.experts.down_proj[index])
    if ours.shared_expert is not None:
        ours.shared_expert.load_state_dict(theirs.shared_expert.state_dict())
        ours.shared_expert_gate.weight.data.copy_(theirs.shared_expert_gate.weight)


def test_shared_expert_matches_transformers():
    """A shared expert (Qwen-MoE's, when a config has one) against transformers' own Qwen2-MoE MLP."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_config = AutoConfig.for_model(
        "qwen2_moe",
        hidden_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=True,
    )
    torch.manual_seed(0)
    theirs = Qwen2MoeSparseMoeBlock(hf_config)
    for parameter in theirs.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    # 4 experts of 32, top-2, hidden size 64, block 0 sparse: add renormalization and a shared expert
    config = replace(make_config("qwen3_moe"), normalize_expert_weights=True, shared_expert_intermediate_size=48)
    ours = TransformerBlock(config, 0).mlp
    _copy_experts(theirs, ours)
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_diff(ours(hidden), theirs(hidden)) <= TOL


@pytest.mark.parametrize(
    "variant",
    [
        dict(model_type="mixtral", num_local_experts=8, num_experts_per_tok=2),
        dict(model_type="qwen3_moe", num_experts=16, num_experts_per_tok=8, moe_intermediate_size=32),
    ],
)
def test_experts_in_bf16_round_like_transformers(variant):
    """In bf16, routing weights (fp32 for Mixtral, bf16 for Qwen3-MoE) and the fp32 sum of the weighted expert
    outputs give transformers' outputs bit for bit."""
    kwargs = dict(variant)
    hf_config = AutoConfig.for_model(kwargs.pop("model_type"), **SIZES, **kwargs)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(hf_config).model.layers[0].mlp
    for parameter in theirs.parameters():
        torch.nn.init.normal_(parameter, std=0.1)
    ours = TransformerBlock(ModelConfig.from_hf(hf_config), 0).mlp
    _copy_experts(theirs, ours)
    theirs, ours = theirs.to(torch.bfloat16), ours.to(torch.bfloat16)
    hidden = torch.randn(4, 64, SIZES["hidden_size"], generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        assert torch.equal(ours(hidden), theirs(hidden))
