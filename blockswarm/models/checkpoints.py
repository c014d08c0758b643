"""Saving the blocks a stage trained, and reassembling a full Hugging Face checkpoint from such spans.

After SWARM training each stage holds the trained weights of its own span only. `save_span` writes them under the
checkpoint's own tensor names; `reassemble` takes the original checkpoint (config, tokenizer, and the tensors no
stage trained), the span files and optionally the trained model ends, and writes a checkpoint that transformers
loads like any other.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from blockswarm.models.block import TransformerBlock
from blockswarm.models.families import checkpoint_name
from blockswarm.models.loading import CONFIG_FILE, INDEX_FILE, _Checkpoint, load_config, resolve_checkpoint

# files of a checkpoint directory that hold weights: replaced by our own, never copied
_WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)|.*\.index\.json")
# what a hub checkpoint needs besides weights: config, generation config, tokenizer files, chat template
_NON_WEIGHT_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
_END_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_RESERVED_METADATA = ("start", "end", "format")


@dataclass
class SpanCheckpoint:
    """Blocks [start, end) as saved by `save_span`: tensors under the checkpoint's names, and the metadata."""

    start: int
    end: int
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def epoch(self) -> int:
        return _epoch(self.metadata, "span")


def span_tensors(blocks: list[TransformerBlock], start: int) -> dict[str, torch.Tensor]:
    """Copies of blocks start, start+1, ... under the checkpoint's names `model.layers.{i}.<param>` (the family's
    own, e.g. Mixtral's `block_sparse_moe.*`): a snapshot that later updates of the blocks do not change."""
    if not blocks:
        raise ValueError("a span needs at least one block")
    if start < 0:
        raise ValueError(f"start must be non-negative, got {start}")
    return {
        f"model.layers.{start + i}.{checkpoint_name(block.family, name)}": tensor.detach()
        .to("cpu", copy=True)
        .contiguous()
        for i, block in enumerate(blocks)
        for name, tensor in block.state_dict().items()
    }


def save_span(blocks: list[TransformerBlock], start: int, path: Path, metadata: dict[str, str]) -> None:
    """Write blocks start, start+1, ... to the safetensors file `path` (`write_span` of their `span_tensors`)."""
    write_span(span_tensors(blocks, start), start, start + len(blocks), path, metadata)


def write_span(tensors: dict[str, torch.Tensor], start: int, end: int, path: Path, metadata: dict[str, str]) -> None:
    """Write a span's tensors (from `span_tensors`) to the safetensors file `path`.

    `metadata` (string values; an "epoch" decides which of several files covering a block `reassemble` uses) is
    stored along with "start" and "end". The file appears complete or not at all: it is written to a temporary file
    in the same directory, flushed to disk and renamed.
    """
    reserved = [key for key in _RESERVED_METADATA if key in metadata]
    if reserved:
        raise ValueError(f"metadata keys {reserved} are reserved: save_span records them itself")
    not_strings = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if not_strings:
        raise ValueError(f"safetensors metadata must map strings to strings; not so for {not_strings}")
    metadata = {**metadata, "format": "pt", "start": str(start), "end": str(end)}
    _write_atomically(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_span(path: Path) -> SpanCheckpoint:
    """Read a file written by `save_span`, checking that its tensors are those of the blocks it says it holds."""
    path = Path(path)
    start, end, metadata, _ = _read_span_header(path)
    return SpanCheckpoint(start, end, load_file(path), metadata)


def reassemble(
    base: str | Path,
    span_files: list[Path],
    out_dir: Path,
    ends_file: Path | None = None,
    *,
    allow_base_blocks: bool = False,
    progress: bool = True,
) -> Path:
    """Write to `out_dir` the checkpoint `base` with its blocks replaced by those of `span_files`; return `out_dir`.

    Config, generation config and tokenizer files are copied from `base` (a local directory or a hub id); weights
    keep base's shard layout and dtypes (trained tensors are cast to them). Where several span files cover a block,
    the one with the highest metadata "epoch" wins (no epoch counts as 0; on a tie the first listed). A block that no
    span file covers is an error unless `allow_base_blocks`, which keeps base's. `ends_file` (safetensors with
    model.embed_tokens.weight, model.norm.weight and/or lm_head.weight) replaces those tensors. `out_dir` must not
    exist or be empty; it is filled through a temporary directory, so it never holds a partial checkpoint.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; choose another output")
    num_blocks = load_config(base).num_blocks
    with _Checkpoint(base) as checkpoint, contextlib.ExitStack() as files:
        checkpoint.prepare(list(checkpoint.weight_map))  # fetches every shard of a hub checkpoint
        source = _choose_sources(checkpoint, span_files, ends_file, num_blocks, allow_base_blocks)
        paths = {path for path, _ in source.values()}
        opened = {path: files.enter_context(safe_open(str(path), framework="pt")) for path in paths}
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            _copy_non_weight_files(base, tmp_dir)
            _write_weights(checkpoint.root, checkpoint.weight_map, source, opened, tmp_dir, progress)
            tmp_dir.chmod(0o755)  # mkdtemp's 0o700 would keep other users from reading the checkpoint
            os.replace(tmp_dir, out_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    return out_dir


def _choose_sources(
    checkpoint: _Checkpoint,
    span_files: list[Path],
    ends_file: Path | None,
    num_blocks: int,
    allow_base_blocks: bool,
) -> dict[str, tuple[Path, str]]:
    """{base tensor name: (file, name in that file)} for every tensor to replace; the others come from base."""
    winners: dict[int, tuple[int, Path, list[str]]] = {}  # block -> (epoch, file, its names in that file)
    for path in map(Path, span_files):
        start, end, metadata, names = _read_span_header(path)
        if end > num_blocks:
            raise ValueError(f"{path} holds blocks {start}:{end}, but {checkpoint.name_or_path} has {num_blocks}")
        epoch = _epoch(metadata, str(path))
        for block in range(start, end):
            if block not in winners or epoch > winners[block][0]:
                winners[block] = (epoch, path, [name for name in names if _layer_index(name, "model.") == block])
    missing = [block for block in range(num_blocks) if block not in winners]
    if missing and not allow_base_blocks:
        raise ValueError(
            f"no span file covers blocks {_ranges(missing)} of {checkpoint.name_or_path}; pass the spans that hold "
            "them, or allow_base_blocks=True to keep the base checkpoint's weights there"
        )
    source = {}
    for block, (_, path, names) in sorted(winners.items()):
        expected = {name for name in checkpoint.weight_map if _layer_index(name, checkpoint.prefix) == block}
        given = {_base_name(name, checkpoint.prefix): name for name in names}
        if given.keys() != expected:
            lacks, extra = sorted(expected - given.keys()), sorted(given.keys() - expected)
            raise ValueError(
                f"block {block} in {path} does not match {checkpoint.name_or_path}: "
                f"it lacks {lacks or 'nothing'} and has extra {extra or 'nothing'}"
            )
        source.update({base_name: (path, name) for base_name, name in given.items()})
    if ends_file is not None:
        with safe_open(str(ends_file), framework="pt") as file:
            names = list(file.keys())
        unexpected = [
            name
            for name in names
            if name not in _END_NAMES or _base_name(name, checkpoint.prefix) not in checkpoint.weight_map
        ]
        if unexpected:
            raise ValueError(
                f"{ends_file} may hold only those of {', '.join(_END_NAMES)} that the base checkpoint has, "
                f"not {unexpected}"
            )
        source.update({_base_name(name, checkpoint.prefix): (Path(ends_file), name) for name in names})
    return source


def _write_weights(
    root: Path,
    weight_map: dict[str, str],
    source: dict[str, tuple[Path, str]],
    opened: dict,
    out_dir: Path,
    progress: bool,
) -> None:
    """One output file per base weights file, holding the same tensor names; plus the index if base is sharded."""
    shards: dict[str, list[str]] = {}
    for name, filename in weight_map.items():
        shards.setdefault(filename, []).append(name)
    total_size = 0
    with tqdm(total=len(shards), desc="Writing checkpoint", unit="file", disable=not progress) as bar:
        for filename, names in shards.items():
            tensors = {}
            with safe_open(str(root / filename), framework="pt") as base_file:
                for name in names:
                    tensor = base_file.get_tensor(name)
                    if name in source:
                        path, name_there = source[name]
                        trained = opened[path].get_tensor(name_there)
                        if trained.shape != tensor.shape:
                            raise ValueError(
                                f"{name_there} in {path} has shape {tuple(trained.shape)} but {name} in the base "
                                f"checkpoint has {tuple(tensor.shape)}: was it trained from another model?"
                            )
                        tensor = trained.to(tensor.dtype)
                    tensors[name] = tensor
                    total_size += tensor.numel() * tensor.element_size()
            save_file(tensors, out_dir / filename, metadata={"format": "pt"})
            bar.update(1)
    if (root / INDEX_FILE).is_file():
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _copy_non_weight_files(base: str | Path, out_dir: Path) -> None:
    """Config, generation config, tokenizer files, chat template... every top-level file that holds no weights."""
    root = resolve_checkpoint(base, _NON_WEIGHT_PATTERNS)
    for path in root.iterdir():
        if path.is_file() and not path.name.startswith(".") and not _WEIGHT_FILE.fullmatch(path.name):
            shutil.copyfile(path, out_dir / path.name)  # follows the hub cache's symlinks
    if not (out_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no {CONFIG_FILE} in {root}")


def _read_span_header(path: Path) -> tuple[int, int, dict[str, str], list[str]]:
    """start, end, metadata and tensor names of a span file, checked without reading the tensors."""
    with safe_open(str(path), framework="pt") as file:
        metadata, names = file.metadata() or {}, list(file.keys())
    try:
        start, end = int(metadata["start"]), int(metadata["end"])
    except (KeyError, ValueError) as error:
        raise ValueError(f"{path} is not a span checkpoint: its metadata has no integer start and end") from error
    blocks = {_layer_index(name, "model.") for name in names}
    if blocks != set(range(start, end)):
        raise ValueError(
            f"{path} says it holds blocks {start}:{end} but its tensors are those of blocks "
            f"{_ranges(sorted(b for b in blocks if b is not None))}"
            + (" and tensors that belong to no block" if None in blocks else "")
        )
    return start, end, metadata, names


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temporary path) next to `path`, flush the result to disk, and rename it to `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _layer_index(name: str, prefix: str) -> int | None:
    """The block a tensor name belongs to (`{prefix}layers.{i}.*`), or None for the embeddings, norm and head."""
    match = re.match(re.escape(prefix) + r"layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _base_name(name: str, prefix: str) -> str:
    """A span or ends file's name (CausalLM naming: "model.*" and "lm_head.weight") in a base that uses `prefix`."""
    return prefix + name.removeprefix("model.") if name.startswith("model.") else name


def _epoch(metadata: dict[str, str], what: str) -> int:
    try:
        return int(metadata.get("epoch", 0))
    except ValueError as error:
        raise ValueError(f"{what}: metadata epoch {metadata['epoch']!r} is not an integer") from error


def _ranges(blocks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for block in blocks:
        if runs and block == runs[-1][1] + 1:
            runs[-1][1] = block
        else:
            runs.append([block, block])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
