"""Loading a checkpoint folder into a Transformer, strictly.

Every parameter the model expects must be in the checkpoint with exactly the expected shape, and every
tensor in the checkpoint must be used: a missing key, an unexpected key or a wrong shape is an error that
names the file, the key and the shapes. Nothing is guessed or silently dropped.

The model is first built on the "meta" device (no memory), then each tensor is read, cast and moved on its
own, so loading an 8B model in bf16 needs its 16 GB once, not twice. Split over N processes (torchrun), each
process builds its 1/N of the model and reads only that slice of each tensor.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch

from llama31 import parallel
from llama31.checkpoints.hf import HFCheckpoint, is_hf_folder
from llama31.checkpoints.meta import MetaCheckpoint, is_meta_folder
from llama31.config import HF_KEYS, META_KEYS, ModelArgs
from llama31.cpu.defaults import choose_kernels
from llama31.errors import InputError, InputTypeError, check_int

log = logging.getLogger("llama31")


def open_checkpoint(path, *, rank: int = 0, world_size: int = 1) -> HFCheckpoint | MetaCheckpoint:
    """Open a Meta folder (params.json + consolidated.NN.pth) or an HF folder (config.json + safetensors).

    rank, world_size: the model-parallel process that will read it (a Meta folder then opens that rank's file).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputTypeError("open_checkpoint", "path", f"must be the path of a checkpoint folder, got "
                             f"{type(path).__name__} {path!r}")
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {path} does not exist (or is not a folder)")
    if is_meta_folder(path):
        return MetaCheckpoint(path, rank=rank, world_size=world_size)
    if is_hf_folder(path):
        return HFCheckpoint(path)
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"{path} is neither a Meta checkpoint (params.json + consolidated.00.pth ...) nor a Hugging Face one "
        f"(config.json + model.safetensors or model.safetensors.index.json). It holds: {found}")


def load_pretrained(path, *, dtype: torch.dtype | None = None, device=None, model_class=None, layers=None,
                    max_seq_len: int | None = None, pack: bool | None = None,
                    progress: Callable[[int, int], None] | None = None):
    """Build a Transformer from a checkpoint folder and load its weights.

    dtype: of the weights (None: float32). device: where they go (None: CPU).
    max_seq_len: shorten the model's context (it sizes the RoPE tables; the default is the checkpoint's).
    progress: called as progress(bytes_loaded, bytes_total) after each tensor.
    pack: which kernel the linear layers get, for faster CPU decoding (llama31/cpu/defaults.py). None: the
    fastest for each dtype, on the layers that gain from it (CPU, float32 / bfloat16, one process, at least 2^19
    weights): float32 our matrix-vector kernel on the plain weights (llama31/cpu/gemv.py, CPUs with AVX512-BF16),
    bf16 (and float32 elsewhere) oneDNN's packed layout (llama31/cpu/packed.py); True: oneDNN's packed layout for
    every layer that can be packed, and ValueError if none can; False: plain nn.Linear.
    layers: how projections are built (llama31.model.layers). None: plain, or INT4 for a quantized checkpoint,
    or, when started by torchrun with several processes, llama31.parallel.ParallelLayers (this sets up the
    process group); each process then reads only its slice of every weight.
    The returned model has .checkpoint_info = {"format": "hf" | "meta", "path", "files"}.
    """
    dtype = check_dtype(dtype, "load_pretrained")
    device = check_device(device, "load_pretrained")
    if max_seq_len is not None:
        check_int(max_seq_len, "max_seq_len", "load_pretrained", minimum=1)
    if pack is not None and not isinstance(pack, bool):
        raise InputTypeError("load_pretrained", "pack", f"must be None, True or False, got {pack!r}")
    if progress is not None and not callable(progress):
        raise InputTypeError("load_pretrained", "progress", f"must be None or a function, got {progress!r}")
    if layers is None and parallel.world_size() > 1:
        layers = parallel.ParallelLayers()
    world_size = layers.model_parallel_size if layers is not None else 1
    if world_size == 1:
        model = _load_pretrained(path, dtype, device, model_class, layers, max_seq_len, progress)
        choose_kernels(model, pack)
        return model
    if pack:
        raise ValueError(f"pack=True: a model split over {world_size} processes (fairscale layers) is not packed; "
                         "pass pack=None or False")
    # a rank that fails (a broken file) must not leave the others waiting for it: all raise
    with parallel.all_ranks_succeed(f"to load {path}"):
        model = _load_pretrained(path, dtype, device, model_class, layers, max_seq_len, progress)
    return model


def _load_pretrained(path, dtype, device, model_class, layers, max_seq_len, progress):
    from llama31.model.transformer import Transformer

    model_class = model_class or Transformer
    rank, world_size = (layers.model_parallel_rank, layers.model_parallel_size) if layers is not None else (0, 1)
    ckpt = open_checkpoint(path, rank=rank, world_size=world_size)
    if ckpt.quantization and layers is None:
        from llama31.quant.checkpoint import layers_for_checkpoint  # only INT4 checkpoints need it
        layers = layers_for_checkpoint(ckpt)
    elif ckpt.quantization and world_size > 1:
        raise NotImplementedError(f"{ckpt.path}: loading a quantized checkpoint on {world_size} processes is not "
                                  "supported; run it in one process, or convert the float weights")
    check_config_fits_tensors(ckpt)
    args = ckpt.args if max_seq_len is None else _with_context(ckpt.args, max_seq_len)
    dtype = dtype or torch.float32
    model = model_class(args, dtype=dtype, device="meta", layers=layers)
    load_weights(model, ckpt, dtype=dtype, device=device or "cpu", progress=progress,
                 rank=rank, world_size=world_size)
    model.checkpoint_info = {"format": ckpt.format, "path": str(ckpt.path), "files": [str(f) for f in ckpt.files]}
    log.info("loaded %s checkpoint from %s (%d file(s))", ckpt.format.upper(), ckpt.path, len(ckpt.files))
    return model


def _with_context(args: ModelArgs, max_seq_len: int) -> ModelArgs:
    try:
        return args.replace(max_seq_len=max_seq_len)
    except InputError as e:
        raise e.renamed("load_pretrained", "max_seq_len") from None


_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")


def check_config_fits_tensors(ckpt) -> None:
    """Check the config's sizes against the shapes of the checkpoint's tensors, before any module is built.

    A config describes the tensors it comes with; a size they contradict is a mistake in the config, and some
    cost time or memory before the strict loader could see it (a model of 10**9 layers is built block by
    block; the RoPE tables hold max_seq_len x head_dim/2 angles). Checked: the number of layers (at most as
    many as the tensors hold; more tensors than layers is reported by the loader as unexpected tensors), the
    embedding (vocab_size, dim), and the output rows of layer 0's wq, wk and w1 (n_heads x head_dim,
    n_kv_heads x head_dim, hidden_dim). InputError names the config file and its key.
    """
    args, names = ckpt.args, set(ckpt.keys())
    keys = HF_KEYS if ckpt.format == "hf" else META_KEYS

    def fail(field: str, problem: str):
        raise InputError(ckpt.config_file, keys.get(field, field), problem + "; check that the config matches "
                         "the weights")

    layers = {int(m.group(1)) for name in names if (m := _LAYER_INDEX.match(name))}
    found = max(layers) + 1 if layers else 0
    if args.n_layers > found:
        fail("n_layers", f"is {args.n_layers}, but the weights hold {found} layer(s)")
    if "tok_embeddings.weight" in names:
        shape = ckpt.shape("tok_embeddings.weight")
        if len(shape) != 2 or shape[0] != args.vocab_size:
            fail("vocab_size", f"is {args.vocab_size}, but the embedding has shape {shape} (vocab_size, dim)")
        if shape[1] != args.dim:
            fail("dim", f"is {args.dim}, but the embedding has shape {shape} (vocab_size, dim)")
    for module, field, rows in (("attention.wq", "n_heads", args.n_heads * args.head_dim),
                                ("attention.wk", "n_kv_heads", args.n_kv_heads * args.head_dim),
                                ("feed_forward.w1", "hidden_dim", args.hidden_dim)):
        found = _output_rows(ckpt, names, f"layers.0.{module}")
        if found is not None and found[0] != rows:
            sizes = f"{args.hidden_dim}" if field == "hidden_dim" else \
                f"{getattr(args, field)} heads x head_dim {args.head_dim} = {rows}"
            fail(field, f"gives {module} {sizes} output rows, but {ckpt.source_name(found[1])} in "
                        f"{ckpt.shape_file(found[1])} has {found[0]}")


def _output_rows(ckpt, names: set[str], module: str) -> tuple[int, str] | None:
    """(the output features of a linear layer as stored, the tensor's name): a float weight (N, K), a packed INT4
    weight_packed (N, K/8) or a GPTQ qweight (K/8, N); None when the module is stored otherwise or not at all."""
    for leaf, axis in (("weight", 0), ("weight_packed", 0), ("qweight", 1)):
        name = f"{module}.{leaf}"
        if name in names:
            shape = ckpt.shape(name)
            return (shape[axis] if len(shape) == 2 else -1), name
    return None


def check_dtype(dtype, source: str, key: str = "dtype") -> torch.dtype | None:
    """dtype, which must be None or a floating-point torch.dtype a Llama runs in."""
    allowed = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if dtype is not None and dtype not in allowed:
        error = InputError if isinstance(dtype, torch.dtype) else InputTypeError
        raise error(source, key, f"must be one of torch.float32, torch.bfloat16, torch.float16, torch.float64 "
                    f"(or None), got {dtype!r}")
    return dtype


def check_device(device, source: str, key: str = "device"):
    """device (None, a str or a torch.device), checked by allocating an empty tensor there: an unknown name or a
    device this machine lacks fails here, naming the argument, not in the middle of loading."""
    if device is None:
        return None
    try:
        torch.empty(0, device=torch.device(device))
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:  # torch raises all of these
        raise InputError(source, key, f"{device!r} cannot be used on this machine ({type(e).__name__}: {e}); use "
                         "'cpu', or 'cuda' where a GPU is available") from None
    return device


def load_weights(model, ckpt, *, dtype: torch.dtype, device, progress=None, rank: int = 0,
                 world_size: int = 1) -> None:
    """Read every parameter of `model` from `ckpt`, check names and shapes, and assign them.

    rank, world_size: for a model split over world_size processes (llama31.parallel), this rank reads only its
    slice of each parameter (ckpt.read_shard); the expected shapes are the model's own, per-rank ones.
    dtype None keeps each tensor's dtype as stored (python -m llama31.convert).
    """
    def read(name: str) -> torch.Tensor:
        return ckpt.read(name) if world_size == 1 else ckpt.read_shard(name, rank, world_size)

    def file_of(name: str):
        return ckpt.file_of(name) if world_size == 1 else ckpt.file_of(name, rank, world_size)

    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = model.args.tie_word_embeddings
    int4_state, consumed = {}, set()
    if ckpt.quantization:  # INT4 modules: their GPTQ / compressed-tensors tensors converted, module by module
        from llama31.quant.checkpoint import read_int4_modules

        int4_state, consumed = read_int4_modules(ckpt, model)
    available = (set(ckpt.keys()) - consumed) | set(int4_state)
    if tied:
        expected.pop("output.weight", None)  # the embedding serves as the output layer

    check_names(ckpt, expected, available, tied)

    def wrong_shape(name: str, found: tuple[int, ...], shape: tuple[int, ...]):
        slice_of = f" (the slice of rank {rank} of {world_size})" if world_size > 1 else ""
        where, what = (ckpt.path, f"INT4 module {name}") if name in int4_state else (file_of(name),
                                                                                      ckpt.source_name(name))
        return InputError(where, None, f"{what!r}{slice_of} has shape {found}, the model expects {shape}. Check "
                          "that the config matches the weights.")

    total = sum(_nbytes(shape, dtype or torch.float32) for shape in expected.values())
    done = 0
    state = {}
    for name, shape in expected.items():
        if name in int4_state:
            tensor = int4_state[name]
        else:
            if world_size == 1 and tuple(ckpt.shape(name)) != shape:  # before reading (or permuting) the tensor
                raise wrong_shape(name, tuple(ckpt.shape(name)), shape)
            tensor = check_floating(ckpt, name, read(name), file_of(name))
        if tuple(tensor.shape) != shape:
            raise wrong_shape(name, tuple(tensor.shape), shape)
        if tensor.is_floating_point() and dtype is not None:
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
        done += _nbytes(shape, dtype or torch.float32)
        if progress:
            progress(done, total)
    if tied and "output.weight" in available:
        output = check_floating(ckpt, "output.weight", read("output.weight"), file_of("output.weight"))
        output = output.to(state["tok_embeddings.weight"].dtype)
        if output.shape != state["tok_embeddings.weight"].shape or not torch.equal(
                output.to(state["tok_embeddings.weight"].device), state["tok_embeddings.weight"]):
            raise ValueError(f"{file_of('output.weight')}: the config ties the output layer to the embedding, "
                             "but the checkpoint's output weight differs from it; set tie_word_embeddings to false")
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True gave the two names separate Parameters; share one again
        model.output.weight = model.tok_embeddings.weight


def check_names(ckpt, expected: dict[str, tuple[int, ...]], available: set[str], tied: bool) -> None:
    """Every parameter the model expects is available, and every available tensor is expected; KeyError naming
    the folder or file and the names otherwise. expected: name -> shape (without output.weight when tied)."""
    missing = sorted(set(expected) - available)
    if missing:
        raise KeyError(f"{ckpt.path}: the checkpoint lacks {len(missing)} parameter(s) the model needs, e.g. "
                       f"{missing[:5]} (expected shape {expected[missing[0]]}). Is the folder complete, and does "
                       "its config describe these weights?")
    unexpected = sorted(available - set(expected))
    if tied and "output.weight" in unexpected:
        unexpected.remove("output.weight")  # load_weights checks that it equals the embedding
    extra = [(ckpt.source_name(n), ckpt.file_of(n)) for n in unexpected] + ckpt.unexpected
    if extra:
        name, file = extra[0]
        raise KeyError(f"{file}: unexpected tensor {name!r} ({len(extra)} in all, e.g. {[n for n, _ in extra[:5]]}); "
                       "the model has no such parameter. Does the config (layers, tied embeddings) match the "
                       "weights?")


def check_floating(ckpt, name: str, tensor: torch.Tensor, file) -> torch.Tensor:
    """tensor, which must be floating point: an integer, boolean or complex tensor where a float weight belongs
    is a broken or foreign file, and casting it would load numbers that mean nothing."""
    if not tensor.is_floating_point():
        raise InputError(file, repr(ckpt.source_name(name)), f"has dtype {tensor.dtype}; weights must be floating "
                         "point (float32, bfloat16, float16). Is the file from another model or format?")
    return tensor


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
