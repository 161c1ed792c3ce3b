"""Meta checkpoint folders: params.json + consolidated.00.pth .. consolidated.NN.pth (one per model-parallel rank).

The .pth files are pickles, loaded with weights_only=True (no code runs) and mmap=True (no copy until used).
A model-parallel checkpoint is split the way fairscale's layers split their weights:

    column-parallel (output rows split):  wq, wk, wv, w1, w3, output    -> dim 0
    row-parallel (input columns split):   wo, w2                         -> dim 1
    vocab-parallel embedding:             tok_embeddings                 -> dim 0 (Llama 2 split dim 1)
    norms:                                replicated in every file       -> None
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llama31.config import ModelArgs

SHARD_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")


def shard_dim(name: str) -> int | None:
    """The dimension along which Meta's model-parallel files split parameter `name` (None: replicated)."""
    module = name.rsplit(".", 1)[0]
    if module.endswith(("attention.wo", "feed_forward.w2")):
        return 1
    if module.endswith(("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")) \
            or module in ("output", "tok_embeddings"):
        return 0
    return None


def is_meta_folder(path: Path) -> bool:
    return (path / "params.json").is_file() and any(SHARD_FILE.match(p.name) for p in path.iterdir())


def shard_files(path: Path) -> list[Path]:
    """consolidated.NN.pth files in rank order; an error if the numbering has a gap."""
    numbered = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := SHARD_FILE.match(p.name)))
    for expected, (number, file) in enumerate(numbered):
        if number != expected:
            raise FileNotFoundError(f"{path}: model-parallel files must be consolidated.00.pth .. "
                                    f"consolidated.{len(numbered) - 1:02d}.pth; consolidated.{expected:02d}.pth is "
                                    "missing. Copy every file of the checkpoint into the folder.")
    return [p for _, p in numbered]


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    """One consolidated.NN.pth, safely: weights_only=True refuses pickled code; mmap=True avoids a copy."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt file, or a pickle that holds code (refused by weights_only)
        raise ValueError(f"{file}: cannot be loaded as a PyTorch state dict with weights_only=True "
                         f"({type(e).__name__}: {e}). Is the download complete?") from None


class MetaCheckpoint:
    """A Meta folder opened for reading: args, the tensor names, and read(name) (shards merged)."""

    format = "meta"

    def __init__(self, path: Path):
        self.path = path
        params_file = path / "params.json"
        try:
            self.params = json.loads(params_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{params_file}: not valid JSON ({e})") from None
        self.quantization = self.params.get("quantization_args")
        self._files = shard_files(path)
        self._shards = [load_shard(f) for f in self._files]
        first = self._shards[0]
        for file, shard in zip(self._files[1:], self._shards[1:]):
            if set(shard) != set(first):
                diff = sorted(set(shard) ^ set(first))[:5]
                raise ValueError(f"{file} and {self._files[0]} hold different parameter names (e.g. {diff}); "
                                 "all files of a model-parallel checkpoint hold the same names")
        if "tie_word_embeddings" not in self.params and "output.weight" not in first:
            # Meta's 3.2 1B/3B files carry no output.weight: the embedding is reused
            self.params = {**self.params, "tie_word_embeddings": True}
        if "vocab_size" in self.params and self.params["vocab_size"] in (-1, None):
            self.params = {**self.params, "vocab_size": self._full_shape("tok_embeddings.weight")[0]}
        self.args = ModelArgs.from_meta_params(self.params, source=str(params_file))
        self.unexpected: list[tuple[str, Path]] = []

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def keys(self) -> list[str]:
        return list(self._shards[0])

    def file_of(self, name: str) -> Path:
        return self._files[0] if len(self._files) == 1 else self.path

    def source_name(self, name: str) -> str:
        return name

    def _split_dim(self, name: str) -> int | None:
        dim = shard_dim(name)
        if name == "tok_embeddings.weight" and len(self._shards) > 1:
            # Llama 3 splits the vocabulary (dim 0), Llama 2 the embedding width (dim 1): tell by shape
            dim = 0 if self._shards[0][name].shape[1] == self._shards[0]["norm.weight"].shape[0] else 1
        return dim

    def _full_shape(self, name: str) -> tuple[int, ...]:
        shape = list(self._shards[0][name].shape)
        dim = self._split_dim(name)
        if dim is not None:
            shape[dim] = sum(s[name].shape[dim] for s in self._shards)
        return tuple(shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._full_shape(name)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor of `name`: the rank files concatenated along the parameter's split dimension."""
        parts = [s[name] for s in self._shards]
        dim = self._split_dim(name)
        if dim is None or len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=dim)


def save_meta(path, args: ModelArgs, state_dict: dict[str, torch.Tensor], *, n_shards: int = 1,
              dtype: torch.dtype | None = None) -> None:
    """Write params.json and n_shards consolidated.NN.pth files, split as fairscale splits them."""
    path = Path(path)
    for name, tensor in state_dict.items():
        dim = shard_dim(name)
        if dim is not None and tensor.shape[dim] % n_shards:
            raise ValueError(f"cannot split {name} of shape {tuple(tensor.shape)} into {n_shards} files along "
                             f"dim {dim}; choose a number of shards that divides it")
    if args.n_kv_heads % n_shards:
        raise ValueError(f"{n_shards} shards cannot split {args.n_kv_heads} kv heads evenly; use a divisor of "
                         f"{args.n_kv_heads}")
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(args.to_meta_params(), indent=2) + "\n")
    for rank in range(n_shards):
        shard = {}
        for name, tensor in state_dict.items():
            if args.tie_word_embeddings and name.startswith("output."):
                continue  # as Meta's 3.2 files: the output layer is the embedding
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            dim = shard_dim(name)
            if dim is not None:
                tensor = tensor.chunk(n_shards, dim=dim)[rank]
            shard[name] = tensor.contiguous().clone()
        torch.save(shard, path / f"consolidated.{rank:02d}.pth")
