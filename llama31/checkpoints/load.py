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
from pathlib import Path
from typing import Callable

import torch

from llama31 import parallel
from llama31.checkpoints.hf import HFCheckpoint, is_hf_folder
from llama31.checkpoints.meta import MetaCheckpoint, is_meta_folder

log = logging.getLogger("llama31")


def open_checkpoint(path, *, rank: int = 0, world_size: int = 1) -> HFCheckpoint | MetaCheckpoint:
    """Open a Meta folder (params.json + consolidated.NN.pth) or an HF folder (config.json + safetensors).

    rank, world_size: the model-parallel process that will read it (a Meta folder then opens that rank's file).
    """
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
    pack: store the linear weights in oneDNN's layout for CPU inference (Transformer.pack_weights; 1.3-2x faster
    decoding). None: the layers that gain from it (CPU, float32 / bfloat16, one process, at least 2^19 weights);
    False: none; True: every layer that can be packed, and ValueError if none can.
    layers: how projections are built (llama31.model.layers). None: plain, or INT4 for a quantized checkpoint,
    or, when started by torchrun with several processes, llama31.parallel.ParallelLayers (this sets up the
    process group); each process then reads only its slice of every weight.
    The returned model has .checkpoint_info = {"format": "hf" | "meta", "path", "files"}.
    """
    if layers is None and parallel.world_size() > 1:
        layers = parallel.ParallelLayers()
    world_size = layers.model_parallel_size if layers is not None else 1
    if world_size == 1:
        model = _load_pretrained(path, dtype, device, model_class, layers, max_seq_len, progress)
        pack_as_asked(model, pack)
        return model
    if pack:
        raise ValueError(f"pack=True: a model split over {world_size} processes (fairscale layers) is not packed; "
                         "pass pack=None or False")
    # a rank that fails (a broken file) must not leave the others waiting for it: all raise
    with parallel.all_ranks_succeed(f"to load {path}"):
        model = _load_pretrained(path, dtype, device, model_class, layers, max_seq_len, progress)
    return model


def pack_as_asked(model, pack: bool | None) -> None:
    """The `pack` option of load_pretrained and Llama.build: None packs the layers that gain from it (at least
    2^19 weights), True every layer that can be packed (ValueError if none can), False none."""
    if pack is False:
        return
    packed = model.pack_weights() if pack is None else model.pack_weights(min_weights=0, required=True)
    if packed:
        own_remaining_weights(model)


@torch.no_grad()
def own_remaining_weights(model) -> None:
    """Copy every plain (unpacked) parameter and buffer into memory of its own.

    Weights read in the checkpoint's own dtype are views of the memory-mapped file (no copy at load). Packing
    reads every page of that mapping, and the mapping stays open, its pages counted in the process's memory, as
    long as any tensor still views it: the embedding, the norms (and INT4 tensors), which stay plain. Copying
    those (the embedding: vocab_size x dim; shared parameters stay shared) lets the file be unmapped.
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_mkldnn:
                if id(param) not in copies:
                    copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
                setattr(module, name, copies[id(param)])
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_mkldnn:
                if id(buffer) not in copies:
                    copies[id(buffer)] = buffer.clone()
                module._buffers[name] = copies[id(buffer)]


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
    args = ckpt.args if max_seq_len is None else ckpt.args.replace(max_seq_len=max_seq_len)
    dtype = dtype or torch.float32
    model = model_class(args, dtype=dtype, device="meta", layers=layers)
    load_weights(model, ckpt, dtype=dtype, device=device or "cpu", progress=progress,
                 rank=rank, world_size=world_size)
    model.checkpoint_info = {"format": ckpt.format, "path": str(ckpt.path), "files": [str(f) for f in ckpt.files]}
    log.info("loaded %s checkpoint from %s (%d file(s))", ckpt.format.upper(), ckpt.path, len(ckpt.files))
    return model


def load_weights(model, ckpt, *, dtype: torch.dtype, device, progress=None, rank: int = 0,
                 world_size: int = 1) -> None:
    """Read every parameter of `model` from `ckpt`, check names and shapes, and assign them.

    rank, world_size: for a model split over world_size processes (llama31.parallel), this rank reads only its
    slice of each parameter (ckpt.read_shard); the expected shapes are the model's own, per-rank ones.
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

    missing = sorted(set(expected) - available)
    if missing:
        raise KeyError(f"{ckpt.path}: the checkpoint lacks {len(missing)} parameter(s) the model needs, e.g. "
                       f"{missing[:5]} (expected shape {expected[missing[0]]}). Is the folder complete, and does "
                       "its config describe these weights?")
    unexpected = sorted(available - set(expected))
    if tied and "output.weight" in unexpected:
        unexpected.remove("output.weight")  # checked against the embedding below
    extra = [(ckpt.source_name(n), ckpt.file_of(n)) for n in unexpected] + ckpt.unexpected
    if extra:
        name, file = extra[0]
        raise KeyError(f"{file}: unexpected tensor {name!r} ({len(extra)} in all, e.g. {[n for n, _ in extra[:5]]}); "
                       "the model has no such parameter. Does the config (layers, tied embeddings) match the "
                       "weights?")

    total = sum(_nbytes(shape, dtype) for shape in expected.values())
    done = 0
    state = {}
    for name, shape in expected.items():
        tensor = int4_state[name] if name in int4_state else read(name)
        if tuple(tensor.shape) != shape:
            slice_of = f" (the slice of rank {rank} of {world_size})" if world_size > 1 else ""
            where, what = (ckpt.path, f"INT4 module {name}") if name in int4_state else (file_of(name),
                                                                                          ckpt.source_name(name))
            raise ValueError(f"{where}: {what!r}{slice_of} has shape "
                             f"{tuple(tensor.shape)}, the model expects {shape}. Check that the config matches the "
                             "weights.")
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
        done += _nbytes(shape, dtype)
        if progress:
            progress(done, total)
    if tied and "output.weight" in available:
        output = read("output.weight").to(dtype)
        if output.shape != state["tok_embeddings.weight"].shape or not torch.equal(
                output.to(state["tok_embeddings.weight"].device), state["tok_embeddings.weight"]):
            raise ValueError(f"{file_of('output.weight')}: the config ties the output layer to the embedding, "
                             "but the checkpoint's output weight differs from it; set tie_word_embeddings to false")
    if tied:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if tied:  # assign=True gave the two names separate Parameters; share one again
        model.output.weight = model.tok_embeddings.weight


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()
