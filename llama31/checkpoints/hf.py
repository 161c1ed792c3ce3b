"""Hugging Face checkpoint folders: config.json + model.safetensors (or model-0000N-of-0000M.safetensors
with model.safetensors.index.json).

Reading yields tensors under Meta's names with wq/wk rows back in Meta's interleaved order, one tensor at a
time, so that a model never needs two copies of its weights in memory; a model-parallel rank reads only its
slice of each tensor (read_shard).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llama31.checkpoints.names import hf_rows_to_meta, hf_to_meta, meta_rows_to_hf, meta_to_hf, permuted_heads
from llama31.checkpoints.sharding import shard_dim, shard_range
from llama31.config import ModelArgs, read_json
from llama31.errors import InputError, check_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Present in some older exports; derived from the config, never loaded.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file())


class HFCheckpoint:
    """An HF folder opened for reading: args, the tensor names (Meta's), and read(name)."""

    format = "hf"

    def __init__(self, path: Path):
        self.path = path
        config_file = path / "config.json"
        self.config_file = config_file
        self.config = read_json(config_file)
        self.args = ModelArgs.from_hf_config(self.config, source=str(config_file))
        self.quantization = self.config.get("quantization_config")
        if self.quantization is not None:
            check_object(self.quantization, "quantization_config", config_file)
        self._handles: dict[Path, object] = {}
        self._file_of: dict[str, Path] = {}  # HF name -> file
        if (path / INDEX_FILE).is_file():
            index_file = path / INDEX_FILE
            index = read_json(index_file)
            if "weight_map" not in index:
                raise InputError(index_file, None, "has no 'weight_map'; is it a safetensors index?")
            for hf_name, file in check_object(index["weight_map"], "weight_map", index_file).items():
                if not isinstance(file, str) or not file or Path(file).name != file:
                    raise InputError(index_file, f"weight_map[{hf_name!r}]", f"must be the name of a file in "
                                     f"{path}, got {file!r}")
                if not (path / file).is_file():
                    raise FileNotFoundError(f"{index_file} names {file} for {hf_name}, but {path / file} "
                                            "does not exist; download the missing shard")
                self._file_of[hf_name] = path / file
        else:
            names = _safetensors(path / SINGLE_FILE, lambda: self._handle(path / SINGLE_FILE).keys())
            self._file_of = {name: path / SINGLE_FILE for name in names}
        self._meta_to_hf: dict[str, str] = {}
        self.unexpected: list[tuple[str, Path]] = []  # names that are not Llama parameters
        for hf_name, file in self._file_of.items():
            if hf_name.endswith(IGNORED_SUFFIXES):
                continue
            try:
                self._meta_to_hf[hf_to_meta(hf_name)] = hf_name
            except KeyError:
                self.unexpected.append((hf_name, file))

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._file_of.values()))

    def keys(self) -> list[str]:
        """The parameter names in the folder, as Meta names."""
        return list(self._meta_to_hf)

    def file_of(self, name: str, rank: int = 0, world_size: int = 1) -> Path:
        """The file that holds `name` (every rank's slice of it is in the same file)."""
        return self._file_of[self._meta_to_hf[name]]

    def source_name(self, name: str) -> str:
        return self._meta_to_hf[name]

    def shape_file(self, name: str) -> Path:
        """The file shape(name) is read from."""
        return self.file_of(name)

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _safetensors(file, lambda: safe_open(file, framework="pt"))
        return self._handles[file]

    def _slice(self, name: str):
        """The lazily read tensor `name` (Meta name) of its file: get_shape(), slicing, [:]."""
        file, hf_name = self.file_of(name), self._meta_to_hf[name]
        return _safetensors(file, lambda: self._handle(file).get_slice(hf_name), hf_name)

    def read_raw(self, name: str) -> torch.Tensor:
        """The tensor stored under Meta name `name`, exactly as in the file (no row reordering)."""
        file, hf_name = self.file_of(name), self._meta_to_hf[name]
        return _safetensors(file, lambda: self._handle(file).get_tensor(hf_name), hf_name)

    def read(self, name: str) -> torch.Tensor:
        """The full tensor of Meta parameter `name`, in Meta's layout (wq/wk rows un-permuted)."""
        tensor = self.read_raw(name)
        n = permuted_heads(name, self.args.n_heads, self.args.n_kv_heads)
        if n:
            self._check_heads(name, tuple(tensor.shape), n)
        return hf_rows_to_meta(tensor, n) if n else tensor

    def _check_heads(self, name: str, shape: tuple[int, ...], n: int) -> None:
        """The q/k row permutation acts within each of n heads of head_dim rows: the rows must be exactly that."""
        if not shape or shape[0] != n * self.args.head_dim:
            raise InputError(self.file_of(name), repr(self._meta_to_hf[name]), f"has shape {shape}, but the config "
                             f"gives {n} heads of head_dim {self.args.head_dim} = {n * self.args.head_dim} rows; "
                             "check that the config matches the weights")

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(_safetensors(self.file_of(name), lambda: self._slice(name).get_shape()))

    def read_shard(self, name: str, rank: int, world_size: int) -> torch.Tensor:
        """Rank `rank`'s slice of `name` for a model split over world_size processes (sharding.py), in Meta's
        layout. Only the slice is read from the file (safetensors slicing), never the whole tensor."""
        dim = shard_dim(name)
        file, tensor = self.file_of(name), self._slice(name)
        if dim is None:
            return _safetensors(file, lambda: tensor[:])  # replicated: norms
        shape = self.shape(name)
        if len(shape) <= dim:
            raise InputError(file, repr(self._meta_to_hf[name]), f"has shape {shape}; a weight matrix has 2 "
                             "dimensions. Check that the config matches the weights")
        size = shape[dim]
        start, stop = shard_range(name, size, rank, world_size, self.args.n_kv_heads)
        part = _safetensors(file, lambda: tensor[start:stop] if dim == 0 else tensor[:, start:stop])
        n = permuted_heads(name, self.args.n_heads, self.args.n_kv_heads)
        if n:
            self._check_heads(name, shape, n)
            # HF's q/k row permutation acts within each head and the slice holds whole heads: un-permute the
            # slice's own heads
            head_rows = size // n
            if (stop - start) % head_rows:
                raise ValueError(f"{self.file_of(name)}: rank {rank} of {world_size} would hold part of a head of "
                                 f"{self._meta_to_hf[name]!r}; use a number of processes that divides the heads")
            part = hf_rows_to_meta(part, (stop - start) // head_rows)
        return part


def _safetensors(file: Path, read, tensor: str | None = None):
    """read() of a safetensors file, its errors (a damaged or truncated file, a tensor missing from it, a dtype
    torch does not know) re-raised as InputError naming the file, and the tensor if one was asked for."""
    try:
        return read()
    except SafetensorError as e:
        if tensor is not None and "does not contain tensor" in str(e):
            raise InputError(file, None, f"has no tensor {tensor!r}, though the safetensors index places it "
                             "there; the index and the files disagree (re-download the checkpoint)") from None
        what = f" (reading {tensor!r})" if tensor is not None else ""
        raise InputError(file, None, f"cannot be read as safetensors{what}: {e}. Is the download complete?"
                         ) from None
    except (OSError, TypeError, ValueError, RuntimeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(file, None, f"cannot be read as safetensors ({type(e).__name__}: {e})") from None


def save_hf(path, args: ModelArgs, state_dict: dict[str, torch.Tensor], *, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 * 2**30, extra_config: dict | None = None) -> None:
    """Write an HF folder that transformers' LlamaForCausalLM loads. state_dict: Meta names and layout.

    Tied embeddings write no lm_head (as HF does). Files over max_shard_bytes are split with an index.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if args.tie_word_embeddings and name.startswith("output."):
            continue
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        n = permuted_heads(name, args.n_heads, args.n_kv_heads)
        tensor = meta_rows_to_hf(tensor, n) if n else tensor
        tensors[meta_to_hf(name)] = tensor.contiguous()

    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    dtype_name = str(dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)).split(".")[-1]
    config = args.to_hf_config(dtype_name)
    config.update(extra_config or {})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2) + "\n")
