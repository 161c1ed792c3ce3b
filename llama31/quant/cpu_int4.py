"""Our INT4 CPU kernels (csrc/int4_cpu.cpp), built on first use: W4A16 for decoding, and W4A8, an option.

Why: decoding streams every weight once per token, so INT4 decodes faster than bf16 only if the kernel turns
4-bit weights into products at least as fast as the memory delivers them. torch's own int4 CPU op
(cpu_fused.py) does not keep up on two cores. These kernels read the canonical layout of packing.py directly
(no repacked copy), in tiles of four rows with a prefetch of the next tile, and turn nibbles into numbers with
a few integer instructions; the C++ file's header walks through both:

    W4A16 (matmul)       x rounded to bf16, as torch's op does; each nibble becomes the bf16 number 128 + u and
                         AVX512-BF16's dot product (vdpbf16ps, 32 products an instruction) sums (128 + u) x, from
                         which 136 * sum(x) is taken. Int4Linear's "auto" takes it on the CPU for a decode step.
    W4A8 (matmul_w4a8)   x rounded to int8 per block of 32 (as llama.cpp does for Q4_0), AVX512-VNNI's int8 dot
                         product (vpdpbusd, 64 products an instruction), exact integer sums. A further rounding of
                         x, so never automatic: Int4Linear.backend = "cpu_w4a8", Llama.build(..., w4a8=True),
                         examples/generate.py --w4a8. ``quantize_activations`` is its definition.

Needs an x86-64 CPU with AVX512-BF16 and AVX512-VNNI (Intel since Cooper Lake / Sapphire Rapids, AMD since
Zen 4) and a C++ compiler: the first call compiles the kernels (seconds; torch caches the build under
~/.cache/torch_extensions). Where either is missing, "auto" takes torch's op.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from llama31.cpu.extension import CppKernels

SOURCE = Path(__file__).parent / "csrc" / "int4_cpu.cpp"
BLOCK = 32  # activations per int8 scale in W4A8 (llama.cpp's Q8_0 block)
# Rows of x up to which Int4Linear's "cpu_int4" takes the W4A16 kernel: from 4 rows on its four bf16 dot products
# per weight and row make it slower than torch's op (python examples/bench/bench_int4_stream.py --rows 1,2,3,4)
W4A16_MAX_ROWS = 3


def _mm_shape(x, weight_packed, weight_scale, zero_scale, group_size, int8_activations):
    return x.new_empty(*x.shape[:-1], weight_packed.shape[0])


_kernels = CppKernels("llama31_int4_cpu", SOURCE, "INT4 layers use torch's int4 op instead (slower decoding)",
                      needs="AVX512-BF16 or AVX512-VNNI", fakes={"mm": _mm_shape})
load_extension = _kernels.load  # compile (first call) and load as torch.ops.llama31_int4_cpu


@functools.lru_cache(maxsize=None)  # asked on every forward: answered once per shape
def unsupported(in_features: int, group_size: int) -> str | None:
    """None if the kernels run here for a layer of this shape, else why not (a sentence for an error)."""
    if in_features % 128:
        return f"it needs in_features divisible by 128, got {in_features}"
    if group_size not in (32, 64) and group_size % 128:
        return f"it needs a group size of 32, 64 or a multiple of 128, got {group_size}"
    return _kernels.unsupported()


def _mm(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor, zero_scale: torch.Tensor | None,
        group_size: int, int8_activations: bool) -> torch.Tensor:
    load_extension()
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return torch.ops.llama31_int4_cpu.mm(x.contiguous(), weight_packed, weight_scale, zero_scale, group_size,
                                         int8_activations)


def matmul(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
           zero_scale: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """W4A16: x [..., K] -> bf16(x) @ W.T [..., N] in x's dtype (float32 or bfloat16), W in the canonical layout
    (weight_scale bf16 or fp32); zero_scale = zp * scale, fp32 [N, K/g], for asymmetric layers, else None."""
    return _mm(x, weight_packed, weight_scale, zero_scale, group_size, int8_activations=False)


def matmul_w4a8(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                zero_scale: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """W4A8: as ``matmul``, with quantize_activations(x) in place of bf16(x)."""
    return _mm(x, weight_packed, weight_scale, zero_scale, group_size, int8_activations=True)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """The definition of W4A8's activation rounding, in plain torch (float64 out), for tests and readers:
    per block of 32 values, s = max|x| / 127 and x ~= s * round(x * (127 / max|x|)), half to even, in float32."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))  # (..., K/32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax correctly rounded (a tensor divided by a tensor: torch computes scalar / tensor as a reciprocal
    # times the scalar, which can round differently and move a value that lies on a half step)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse)  # integers in [-127, 127]
    return (q.double() * (amax / 127).double()).flatten(-2)
