"""Random-weight checkpoints (model + tokenizer) for tests, the demo and benchmarks; offline, in seconds."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# transformers is imported inside the functions: importing it costs seconds, and peers never need this module

PRESETS = {
    "tiny": dict(
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=688,
        vocab_size=4096,
        max_position_embeddings=2048,
    ),
    "small": dict(
        hidden_size=512,
        num_hidden_layers=16,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1376,
        vocab_size=8192,
        max_position_embeddings=2048,
    ),
    "medium": dict(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
}

# What makes each family different, so that every code path of the blocks is exercised by some preset.
FAMILY_SETTINGS = {
    "llama": dict(
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=256,
        ),
    ),
    "mistral": dict(rope_theta=10000.0, sliding_window=128),
    "qwen2": dict(rope_theta=1000000.0, tie_word_embeddings=True),
    # q/k norms; windowed attention from block 4 on (blocks 0-3 attend fully), a window generation exceeds
    "qwen3": dict(
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=True, sliding_window=16, max_window_layers=4
    ),
    "mixtral": dict(rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(
        rope_theta=1000000.0, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True
    ),
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
# Large enough that greedy-decoding logits are well separated: tests compare tokens across processes.
INITIALIZER_RANGE = 0.1


def init_random_model(
    out_dir: str | Path,
    preset: str = "tiny",
    family: str = "llama",
    seed: int = 0,
    max_shard_size: str | None = None,
    initializer_range: float = INITIALIZER_RANGE,
) -> Path:
    """Write a random `family` model of size `preset` and a byte-level BPE tokenizer (with a chat template) to
    `out_dir`; return it.

    The same (preset, family, seed) always gives the same weights. `max_shard_size` (e.g. "2MB") splits the
    weights into several safetensors shards with an index. `initializer_range` is the std of the random weights
    (transformers' own default is 0.02).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if family not in FAMILY_SETTINGS:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILY_SETTINGS)}")
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    config = random_model_config(preset, family, initializer_range)
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    with _no_progress_bars():
        model.save_pretrained(out_dir, max_shard_size=max_shard_size or "50GB")
    _make_tokenizer(config.vocab_size, config.max_position_embeddings).save_pretrained(out_dir)
    return out_dir


def random_model_config(preset: str, family: str, initializer_range: float = INITIALIZER_RANGE):
    """The transformers config that `init_random_model` uses (cheap: no weights)."""
    from transformers import AutoConfig

    sizes = PRESETS[preset]
    return AutoConfig.for_model(
        family,
        **sizes,
        **FAMILY_SETTINGS[family],
        head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
        initializer_range=initializer_range,
        unk_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _make_tokenizer(vocab_size: int, max_length: int):
    """A byte-level BPE (any text round-trips) trained on a small built-in corpus; adds <s> like Llama's."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 2048),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
        chat_template=CHAT_TEMPLATE,
    )


# Zephyr's layout: each message after its role's tag and closed by EOS, so a chat answer ends where the model says EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


_CORPUS = """\
A swarm of volunteer machines can run a large language model together. Each peer serves a few
transformer blocks, and a client sends hidden states from one peer to the next. When a peer leaves,
the client finds another one and replays what it sent before, then goes on as if nothing happened.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Once upon a time, in a small village by the sea, there lived an old fisherman and his daughter.
Every morning they rowed out before sunrise and came back at noon with baskets full of silver fish.
def forward(self, hidden, position=0, cache=None): return self.mlp(self.attn(hidden, position, cache))
Numbers, dates and prices: 3.14159, 2024-05-17, $19.99, 100%, 1,000,000 and 42.
Questions? Answers! Lists: first; second; third. Quotes: "hello", 'world', (brackets) [and] {braces}.
"""


def _corpus() -> list[str]:
    lines = _CORPUS.splitlines()
    words = _CORPUS.split()
    # a few thousand deterministic word shuffles so BPE learns merges across the whole vocabulary
    return lines + [" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(12)) for i in range(2000)]
