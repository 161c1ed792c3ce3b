"""Meta checkpoint folders: params.json + consolidated.00.pth .. consolidated.NN.pth (one per model-parallel rank).

The .pth files are pickles, loaded with weights_only=True (no code runs) and mmap=True (no copy until used).
A model-parallel checkpoint is split the way fairscale's layers split their weights (sharding.py has the table):
wq, wk, wv, w1, w3, output and tok_embeddings along dim 0, wo and w2 along dim 1, norms in every file.

Files are opened only when a tensor in them is needed: a process of a model-parallel run reads only the files
that hold its slice (with as many processes as files, its own file; see read_shard).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llama31.checkpoints.sharding import shard_dim, shard_range
from llama31.config import ModelArgs, read_json
from llama31.errors import InputError

SHARD_FILE = re.compile(r"^consolidated\.(\d+)\.pth$")


def is_meta_folder(path: Path) -> bool:
    return (path / "params.json").is_file() and any(SHARD_FILE.match(p.name) for p in path.iterdir())


def shard_files(path: Path) -> list[Path]:
    """consolidated.NN.pth files in rank order; an error if the numbering has a gap."""
    numbered = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := SHARD_FILE.match(p.name)))
    for expected, (number, file) in enumerate(numbered):
        if number != expected:
            raise FileNotFoundError(f"{path}: model-parallel files must be consolidated.00.pth .. "
                                    f"consolidated.{numbered[-1][0]:02d}.pth; consolidated.{expected:02d}.pth is "
                                    "missing. Copy every file of the checkpoint into the folder.")
    return [p for _, p in numbered]


def load_shard(file: Path) -> dict[str, torch.Tensor]:
    """One consolidated.NN.pth, safely: weights_only=True refuses pickled code; mmap=True avoids a copy."""
    try:
        shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt file, or a pickle that holds code (refused by weights_only)
        raise InputError(file, None, f"cannot be loaded as a PyTorch state dict with weights_only=True "
                         f"({type(e).__name__}: {e}). Is the download complete?") from None
    # weights_only still allows plain containers and numbers: a state dict is a dict of named tensors
    if not isinstance(shard, dict):
        raise InputError(file, None, f"holds a {type(shard).__name__}, not a state dict (a dict of parameter "
                         "names to tensors)")
    for name, tensor in shard.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(file, repr(name), f"holds a {type(tensor).__name__}, not a tensor; a "
                             "consolidated.NN.pth maps parameter names to tensors (is it a training checkpoint "
                             "with the weights nested inside?)")
    return shard


class MetaCheckpoint:
    """A Meta folder opened for reading: args, the tensor names, read(name) (the files merged) and
    read_shard(name, rank, world_size) (one model-parallel rank's slice, from the files that hold it).

    rank, world_size: the process that will read, so that it opens its own file first (and, with as many
    processes as files, no other).
    """

    format = "meta"

    def __init__(self, path: Path, *, rank: int = 0, world_size: int = 1):
        self.path = path
        params_file = self.config_file = path / "params.json"
        self.params = read_json(params_file)
        self.quantization = self.params.get("quantization_args")
        self._files = shard_files(path)
        self._shards: dict[int, dict[str, torch.Tensor]] = {}  # file index -> its tensors, opened on first use
        self._home = rank * len(self._files) // world_size  # the first file this rank's slices are in
        first = self._shard(self._home)
        if "tie_word_embeddings" not in self.params and "output.weight" not in first:
            # Meta's 3.2 1B/3B files carry no output.weight: the embedding is reused
            self.params = {**self.params, "tie_word_embeddings": True}
        if "vocab_size" in self.params and self.params["vocab_size"] in (-1, None):
            if "tok_embeddings.weight" not in first:
                raise KeyError(f"{self._files[self._home]}: has no 'tok_embeddings.weight' to take the vocabulary "
                               f"size from ({params_file} gives vocab_size {self.params['vocab_size']})")
            self.params = {**self.params, "vocab_size": self.shape("tok_embeddings.weight")[0]}
        self.args = ModelArgs.from_meta_params(self.params, source=str(params_file))
        self.unexpected: list[tuple[str, Path]] = []

    @property
    def files(self) -> list[Path]:
        return list(self._files)

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        """The tensors of file i (opened now if not yet); every file must hold the same names."""
        if i not in self._shards:
            shard = load_shard(self._files[i])
            if self._shards:
                j, other = next(iter(self._shards.items()))
                if set(shard) != set(other):
                    diff = sorted(set(shard) ^ set(other))[:5]
                    raise ValueError(f"{self._files[i]} and {self._files[j]} hold different parameter names (e.g. "
                                     f"{diff}); all files of a model-parallel checkpoint hold the same names")
            self._shards[i] = shard
        return self._shards[i]

    def _part(self, i: int, name: str) -> torch.Tensor:
        """File i's part of `name`; parts are equal in shape in every file (fairscale splits evenly)."""
        part, home = self._shard(i)[name], self._shard(self._home)[name]
        if part.shape != home.shape:
            raise ValueError(f"{self._files[i]}: {name!r} has shape {tuple(part.shape)} but "
                             f"{self._files[self._home].name} has {tuple(home.shape)}; every file of a "
                             "model-parallel checkpoint holds an equal part. Is a file from another model?")
        return part

    def keys(self) -> list[str]:
        return list(self._shard(self._home))

    def file_of(self, name: str, rank: int = 0, world_size: int = 1) -> Path:
        """The file that `name` (or rank's slice of it) is read from; the folder when it spans several."""
        if world_size == 1:
            return self._files[0] if len(self._files) == 1 else self.path
        if self._split_dim(name) is None:  # replicated (the norms): read from the home file, as read_shard does
            return self._files[self._home]
        files = self._files_of(name, rank, world_size)
        return self._files[files.start] if len(files) == 1 else self.path

    def source_name(self, name: str) -> str:
        return name

    def _split_dim(self, name: str) -> int | None:
        dim = shard_dim(name)
        if name == "tok_embeddings.weight" and len(self._files) > 1:
            # Llama 3 splits the vocabulary (dim 0), Llama 2 the embedding width (dim 1): tell by shape
            home = self._shard(self._home)
            embedding, norm = home[name], home.get("norm.weight")
            dim = 1 if embedding.dim() == 2 and norm is not None and norm.dim() == 1 and \
                embedding.shape[1] != norm.shape[0] else 0
        return dim

    def shape_file(self, name: str) -> Path:
        """The file shape(name) is read from (scaled by the number of files where the parameter is split)."""
        return self._files[self._home]

    def shape(self, name: str) -> tuple[int, ...]:
        """The full (merged) shape of `name`."""
        shape = list(self._shard(self._home)[name].shape)
        dim = self._split_dim(name)
        if dim is not None:
            if len(shape) <= dim:
                raise InputError(self._files[self._home], repr(name), f"has shape {tuple(shape)}; a weight matrix "
                                 "has 2 dimensions. Is the file from another model?")
            shape[dim] *= len(self._files)
        return tuple(shape)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor of `name`: the rank files concatenated along the parameter's split dimension."""
        dim = self._split_dim(name)
        if dim is None or len(self._files) == 1:
            return self._shard(self._home)[name]
        return torch.cat([self._part(i, name) for i in range(len(self._files))], dim=dim)

    def _slice(self, name: str, rank: int, world_size: int) -> tuple[int, int, int]:
        """(dim, start, stop): rank's slice of `name` in the merged tensor."""
        dim = self._split_dim(name)
        size = self.shape(name)[dim]
        return (dim, *shard_range(name, size, rank, world_size, self.args.n_kv_heads))

    def _files_of(self, name: str, rank: int, world_size: int) -> range:
        dim, start, stop = self._slice(name, rank, world_size)
        per_file = self._shard(self._home)[name].shape[dim]
        return range(start // per_file, (stop - 1) // per_file + 1)

    def read_shard(self, name: str, rank: int, world_size: int) -> torch.Tensor:
        """Rank `rank`'s slice of `name` for a model split over world_size processes, reading only the files
        that hold it: with as many processes as files, file `rank` alone; with fewer, parts of several files
        are joined; with more, a file's part is cut (and kv heads repeated when processes outnumber them)."""
        if self._split_dim(name) is None:
            return self._shard(self._home)[name]  # replicated: norms
        dim, start, stop = self._slice(name, rank, world_size)
        per_file = self._shard(self._home)[name].shape[dim]
        pieces = []
        for i in self._files_of(name, rank, world_size):
            lo, hi = max(start - i * per_file, 0), min(stop - i * per_file, per_file)
            pieces.append(self._part(i, name).narrow(dim, lo, hi - lo))
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)).contiguous()


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
        # Possible in principle (repeat the kv heads and write a larger n_kv_heads, as Meta's 16-file 405B does),
        # but not needed: llama31 runs any checkpoint on any number of processes, repeating kv heads on load.
        raise ValueError(f"{n_shards} files cannot split {args.n_kv_heads} kv heads evenly (a file would hold part of "
                         f"a head); write a divisor of {args.n_kv_heads} files. llama31 loads such a folder on any "
                         "number of processes (kv heads are repeated on load when processes outnumber them).")
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
