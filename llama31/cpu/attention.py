"""Decode attention on the CPU as one kernel call per layer (csrc/decode_attention.cpp).

Why: for one new token, attention is two small batched matrix products (q k^T, then p v) around a softmax
(llama31/model/attention.py, decode_attention). ATen's CPU kernels for them cost tens of microseconds a call
however short the context, and read a long cache below the memory's speed; the kernel computes the same formula
(every sum in float32) in one call per layer that reads the keys and values once.

    use_decode_kernel(model)   # each Attention's decode_attention -> the kernel (a no-op where it cannot run)

Compiled decoding (compiled.py) does this for the models it compiles, so the compiled graph calls the kernel
where it would call two matrix products and a softmax. Needs an x86-64 CPU with AVX512-BF16 and a C++ compiler
(the first use compiles it, seconds, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from llama31.cpu.extension import CppKernels


def _decode_shape(q, k, v, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_kernels = CppKernels("llama31_attention_cpu", Path(__file__).parent / "csrc" / "decode_attention.cpp",
                      "decode attention keeps ATen's matrix products", needs="AVX512-BF16",
                      fakes={"decode": _decode_shape})


def unsupported() -> str | None:
    """None if the kernel runs on this machine, else why not (a sentence for an error message)."""
    return _kernels.unsupported()


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """llama31.model.attention.decode_attention by the kernel: q (bs, n_heads, 1, head_dim); k, v (bs,
    n_kv_heads, T, head_dim), float32 or bfloat16 alike, head_dim a multiple of 32. Returns (bs, n_heads, 1,
    head_dim) in q's dtype."""
    _kernels.load()
    return torch.ops.llama31_attention_cpu.decode(q, k, v, 1 / math.sqrt(q.shape[-1]))


def use_decode_kernel(model: nn.Module) -> int:
    """Give every attention layer of ``model`` the kernel as its decode_attention, where it can run: on the CPU,
    float32 or bfloat16, head_dim a multiple of 32, at most 16 query heads per kv head. Returns how many layers
    took it (0: unsupported() says why, or the model is not one of those)."""
    from llama31.model.attention import Attention

    layers = [m for m in model.modules() if isinstance(m, Attention)]
    weight = next(model.parameters())
    if (unsupported() or not layers or weight.device.type != "cpu"
            or weight.dtype not in (torch.float32, torch.bfloat16) or layers[0].head_dim % 32
            or layers[0].n_heads > 16 * layers[0].n_kv_heads):
        return 0
    for layer in layers:
        layer.decode_attention = decode_attention
    return len(layers)
