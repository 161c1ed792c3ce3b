"""Weights in 2 MiB pages (Linux transparent huge pages), so that a decode step streams them faster.

Why: a decode step reads every weight once. The CPU translates each address through its TLB, a cache of a few
thousand page-table entries: with the usual 4 KiB pages a read through gigabytes of weights misses it every
4 KiB and walks the page table (in a virtual machine, two page tables); with 2 MiB pages it misses every 2 MiB.
llama.cpp can get large pages without asking: it maps its GGUF file, and recent kernels keep a file's page cache
in large folios where the filesystem supports them. torch allocates in 4 KiB pages (unless
THP_MEM_ALLOC_ENABLE=1 is set before torch starts), so use_huge_pages moves the tensors into memory that asks
the kernel for 2 MiB pages (madvise MADV_HUGEPAGE).

    moved = use_huge_pages(model)   # the model's CPU parameters and buffers, in place: bytes in 2 MiB pages
    t = empty((4096, 4096), torch.bfloat16)   # a new tensor in such memory (zero-filled)

In place means the same Parameter and buffer objects get new storage (tensor.data = ...): tied weights stay
tied, state_dict and the model's modules are unchanged, and the values are the same bits. Linux gives the pages
where /sys/kernel/mm/transparent_hugepage/enabled is "madvise" (the common default) or "always"; where it is
"never", or on other systems, the tensors get torch's memory. The kernel may still fall back to 4 KiB pages
when it finds no free 2 MiB of physical memory; the tensor works the same either way.
"""

from __future__ import annotations

import ctypes
import functools
import math
import mmap
from collections import Counter
from pathlib import Path

import torch
from torch import nn

PAGE_BYTES = 2 << 20  # one huge page; smaller tensors stay in torch's memory
_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def unsupported() -> str | None:
    """None if this system gives huge pages on request, else why not (a sentence)."""
    return _why_not(_MODE_FILE)


@functools.lru_cache(maxsize=None)  # asked for every tensor: the setting is read once
def _why_not(mode_file: Path) -> str | None:
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "this system has no transparent huge pages (a Linux feature)"
    try:
        mode = mode_file.read_text()
    except OSError as error:
        return f"cannot read {mode_file} ({error})"
    if "[never]" in mode:
        return f"transparent huge pages are off ({mode_file} says {mode.strip()!r})"
    return None


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor of ``shape`` and ``dtype`` whose memory starts on a 2 MiB boundary and asks for
    2 MiB pages. Its memory is returned to the system when the tensor (every view of it) is freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # private anonymous memory (a shared mapping would be shmem, which follows another setting), one page more
    # than needed so that the tensor can start on a page boundary
    region = mmap.mmap(-1, nbytes + PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    start = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    # the tensor holds a reference to region (torch.frombuffer), which unmaps it when the last one is gone
    return torch.frombuffer(region, dtype=dtype, count=math.prod(shape), offset=-start % PAGE_BYTES).view(shape)


def worth_moving(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` can and should live in huge-page memory: a contiguous strided CPU tensor (oneDNN's
    packed weights are opaque) of at least PAGE_BYTES, on a system that gives huge pages (unsupported())."""
    return (tensor.device.type == "cpu" and tensor.layout == torch.strided and not tensor.is_mkldnn
            and tensor.nbytes >= PAGE_BYTES and tensor.is_contiguous() and unsupported() is None)


def copy_to_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of ``tensor`` in huge-page memory, or ``tensor`` itself where it is not worth_moving."""
    if not worth_moving(tensor):
        return tensor
    with torch.no_grad():
        return empty(tuple(tensor.shape), tensor.dtype).copy_(tensor)


@torch.no_grad()
def use_huge_pages(module: nn.Module) -> int:
    """Copy every plain CPU parameter and buffer of ``module`` into memory of its own, in place (see the module
    doc): those of at least PAGE_BYTES into huge-page memory, smaller ones (or all, where unsupported() says
    why) into torch's. Returns the bytes now in huge-page memory.

    Why the small ones too: weights loaded in the checkpoint's own dtype are views of its memory-mapped file
    (llama31/checkpoints: no copy at load). The mapping stays open, the file's pages counted in the process's
    memory, as long as any tensor still views it; once every tensor has memory of its own, the file is unmapped.
    Opaque tensors (oneDNN's packed weights, already copies) and tensors that share their storage with another
    one of the module's (views of each other) are left as they are.
    """
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}.values()  # tied ones once
    plain = [t for t in tensors if t.device.type == "cpu" and t.layout == torch.strided and not t.is_mkldnn]
    holders = Counter(t.untyped_storage().data_ptr() for t in plain)  # tensors of the module per storage
    moved = 0
    for tensor in plain:
        if holders[tensor.untyped_storage().data_ptr()] > 1:
            continue
        copy = copy_to_huge_pages(tensor)
        if copy is tensor:
            copy = tensor.clone(memory_format=torch.contiguous_format)
        else:
            moved += tensor.nbytes
        tensor.data = copy
    _return_freed_memory()
    return moved


def _return_freed_memory() -> None:
    """Give the memory of the tensors just replaced back to the system. glibc's malloc keeps freed blocks below
    its mmap threshold (which grows to 32 MiB as large blocks are freed) for reuse, still counted in the
    process's memory; malloc_trim(0) returns them. Elsewhere (no glibc) nothing happens."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
