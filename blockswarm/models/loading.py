"""Loading a span of blocks (or the model ends) from a safetensors checkpoint, reading only what is needed.

A checkpoint is a local directory or a Hugging Face hub id. For hub ids only the files that hold the requested
tensors are fetched (or found in the local hub cache when offline), so a peer serving blocks 10..20 of a big
model never downloads the other shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from blockswarm.models.block import TransformerBlock
from blockswarm.models.config import ModelConfig
from blockswarm.models.ends import ModelEnds
from blockswarm.models.families import checkpoint_name

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FINGERPRINT_SAMPLES = 16


def resolve_checkpoint(name_or_path: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """The directory of a checkpoint: a local directory as is, or a hub id's snapshot in the hub cache.

    For hub ids, `allow_patterns` limits what is downloaded when online. Offline (HF_HUB_OFFLINE=1, read at
    call time) or when the hub cannot be reached, the snapshot already in the cache is used.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    kwargs = dict(repo_id=str(name_or_path), allow_patterns=allow_patterns, cache_dir=_hub_cache_dir())
    if not _hub_offline():
        with contextlib.suppress(Exception):  # no network, hub down, gated: the cache may still have it
            return Path(huggingface_hub.snapshot_download(**kwargs))
    try:
        return Path(huggingface_hub.snapshot_download(**kwargs, local_files_only=True))
    except Exception as error:
        cache = kwargs["cache_dir"] or huggingface_hub.constants.HF_HUB_CACHE
        raise FileNotFoundError(
            f"checkpoint {str(name_or_path)!r} is neither a local directory nor a model in the Hugging Face "
            f"cache {cache} ({type(error).__name__}: {error})"
        ) from error


def load_config(name_or_path: str | Path) -> ModelConfig:
    """The ModelConfig of a checkpoint (reads only config.json)."""
    from transformers import AutoConfig  # imported here: importing transformers takes seconds

    root = resolve_checkpoint(name_or_path, [CONFIG_FILE])
    if not (root / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {root}")
    return ModelConfig.from_hf(AutoConfig.from_pretrained(root))


def load_blocks(
    name_or_path: str | Path,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[TransformerBlock]:
    """Blocks [start, end) in eval mode with frozen weights, reading only their tensors (and their shards)."""
    config = load_config(name_or_path)
    if not 0 <= start < end <= config.num_blocks:
        raise ValueError(f"block range [{start}, {end}) is not a non-empty part of [0, {config.num_blocks})")
    with _Checkpoint(name_or_path) as checkpoint:
        prefix = checkpoint.prefix + "layers."
        names_of = {}  # block -> {our name: the checkpoint's name}
        for i in range(start, end):
            with torch.device("meta"):
                ours = TransformerBlock(config, i).state_dict()
            names_of[i] = {name: f"{prefix}{i}.{checkpoint_name(config.family, name)}" for name in ours}
        checkpoint.prepare([name for names in names_of.values() for name in names.values()])
        blocks = []
        for i in tqdm(range(start, end), desc=f"Loading blocks {start}:{end}", unit="block", disable=not progress):
            tensors = checkpoint.read(names_of[i], dtype, device)
            blocks.append(_build(lambda i=i: TransformerBlock(config, i), tensors))
    return blocks


def load_ends(
    name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> ModelEnds:
    """Embeddings, final norm and LM head (frozen, eval mode), reading only those tensors."""
    config = load_config(name_or_path)
    with _Checkpoint(name_or_path) as checkpoint:
        names = {name: checkpoint.prefix + name for name in ("embed_tokens.weight", "norm.weight")}
        if not config.tie_word_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        checkpoint.prepare(list(names.values()))
        return _build(lambda: ModelEnds(config), checkpoint.read(names, dtype, device))


def weights_fingerprint(name_or_path: str | Path) -> str:
    """A short hex hash identifying the weights, cheap and computable from the files everyone has anyway.

    Sharded: the index (tensor names -> shard files, total size), which every peer and client holds; it tells
    layouts apart but not two sharded checkpoints that differ only in values. Single model.safetensors
    (everyone holds the whole file): its header (names, dtypes, shapes, offsets), size and a few small
    evenly spaced samples of the data, so different seeds of a random model differ too.
    """
    root = resolve_checkpoint(name_or_path, [CONFIG_FILE, INDEX_FILE])
    digest = hashlib.sha256()
    if (root / INDEX_FILE).is_file():
        index = json.loads((root / INDEX_FILE).read_text())  # weight map + total size
        digest.update(json.dumps(index, sort_keys=True).encode())
    else:
        single = resolve_checkpoint(name_or_path, [SINGLE_FILE]) / SINGLE_FILE
        if not single.is_file():
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {root}")
        size = single.stat().st_size
        digest.update(str(size).encode())
        with open(single, "rb") as file:
            (header_size,) = struct.unpack("<Q", file.read(8))
            digest.update(file.read(header_size))
            data_start = 8 + header_size
            for k in range(FINGERPRINT_SAMPLES):
                file.seek(data_start + (size - data_start) * k // FINGERPRINT_SAMPLES)
                digest.update(file.read(512))
    return digest.hexdigest()[:16]


class _Checkpoint:
    """Tensor name -> file map of a checkpoint; opens each safetensors file lazily, at most once."""

    def __init__(self, name_or_path: str | Path):
        self.name_or_path = name_or_path
        self.root = resolve_checkpoint(name_or_path, [CONFIG_FILE, INDEX_FILE])
        self._files = contextlib.ExitStack()
        self._open: dict[str, object] = {}
        if (self.root / INDEX_FILE).is_file():
            self.weight_map: dict[str, str] = json.loads((self.root / INDEX_FILE).read_text())["weight_map"]
        else:
            self.root = resolve_checkpoint(name_or_path, [SINGLE_FILE])
            if not (self.root / SINGLE_FILE).is_file():
                raise FileNotFoundError(f"no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {self.root}")
            self.weight_map = dict.fromkeys(self._file(SINGLE_FILE).keys(), SINGLE_FILE)
        # checkpoints saved from a CausalLM prefix the base model's tensors with "model."
        self.prefix = "model." if any(name.startswith("model.") for name in self.weight_map) else ""

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(self, *exc_info) -> None:
        self._files.close()

    def prepare(self, names: list[str]) -> None:
        """Check that all `names` exist and fetch the shards that hold them (no-op for local directories)."""
        missing = [name for name in names if name not in self.weight_map]
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing) - 8} more)" if len(missing) > 8 else "")
            raise ValueError(f"checkpoint {self.name_or_path} lacks tensors: {shown}")
        files = sorted({self.weight_map[name] for name in names})
        self.root = resolve_checkpoint(self.name_or_path, files)

    def read(self, names: dict[str, str], dtype: torch.dtype, device: str | torch.device) -> dict:
        """{our name: tensor} for {our name: checkpoint name}, cast to dtype and moved to device."""
        return {
            ours: self._file(self.weight_map[theirs]).get_tensor(theirs).to(device=device, dtype=dtype)
            for ours, theirs in names.items()
        }

    def _file(self, filename: str):
        if filename not in self._open:
            path = self.root / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but missing")
            self._open[filename] = self._files.enter_context(safe_open(str(path), framework="pt"))
        return self._open[filename]


def _build(make: Callable[[], torch.nn.Module], state_dict: dict) -> torch.nn.Module:
    """Instantiate without allocating or initializing weights, then adopt the loaded tensors."""
    with torch.device("meta"):
        module = make()
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def _hub_offline() -> bool:
    from_env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return from_env or huggingface_hub.constants.HF_HUB_OFFLINE


def _hub_cache_dir() -> str | None:
    """The hub cache as the environment says now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None
