"""The CPU fast path: torch's fused int4 matmul (``_weight_int4pack_mm_for_cpu``, torch >= 2.6) for a few rows,
dequantize-then-matmul in blocks for many.

torch's op uses its own blocked packing and a float zero per group:
    W[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n]       u in [0, 15]
Our canonical layout stores u = q + 8 already, so the conversion is:
    u      = the nibbles of weight_packed, unchanged
    zero   = -zp * scale            (0 for symmetric layers)
The op wants N % 16 == 0, so rows are padded with u = 8 (weight 0) and the extra outputs dropped.
It is fast only with bf16 activations (fp32 ones take a path 30-40x slower), so activations are cast to
bf16 and the result cast back: that rounding (relative 2**-9 per value) is the price of this path.
The repacked copy is built once per layer (``repack``) and kept beside the canonical tensors.

The op is a matrix-vector kernel: its time grows with the rows as if each row were a separate product, so
for a prompt it is slower than the bf16 matmul. From ``DEQUANTIZE_MIN_ROWS`` rows on (a prompt, not a decode
step), ``matmul`` takes the route the CUDA path takes above its GEMV: it rebuilds W in bf16, one block of output
rows at a time (small enough that the block is still in the cache when the matmul reads it), and multiplies by
oneDNN's bf16 matmul, at bf16 speed plus the rebuild. Those weights are the canonical dequantization rounded to
bf16 (relative 2**-9, like the activations): (q - zp) * scale needs up to 12 significant bits and bf16 has 8,
where the op keeps them exact; both errors are far below INT4's own (tests/test_int4_model.py). The timings
are in docs/benchmarks.md (``python examples/bench/bench_int4.py --no-model``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from llama31.quant.packing import OFFSET, unpack_int4

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)  # what the op accepts (it checks qGroupSize)
_N_MULTIPLE = 16
_INNER_K_TILES = 2  # a layout parameter of the conversion; the CPU op accepts any of 1, 2, 4, 8
# Rows from which dequantize-then-matmul beats the op: where the rebuild's fixed cost equals the op's extra time
# per row (between 64 and 96 rows on every 1B and 8B shape measured; docs/benchmarks.md).
DEQUANTIZE_MIN_ROWS = 96
# Weights rebuilt per block: 16 MiB of bf16, half a 32 MiB L3, so the matmul reads the block from the cache.
# Smaller blocks lose more than they gain: 4 MiB blocks of the 8B's w2 (K = 14336) are 146 rows wide, a narrow
# matmul that re-reads all of x per block.
BLOCK_WEIGHTS = 2**23
_LITTLE_ENDIAN = sys.byteorder == "little"  # the rebuild reads the int32 words as bytes


def is_available(group_size: int) -> bool:
    """True when this torch has the CPU int4 ops and they accept ``group_size``."""
    ops = torch.ops.aten
    return (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")
            and group_size in SUPPORTED_GROUP_SIZES)


@dataclass
class CpuInt4Weight:
    """One layer repacked for torch's CPU op, and what the block dequantization reads."""

    packed: torch.Tensor  # uint8 [N_pad, K/2], torch's blocked layout
    scales_and_zeros: torch.Tensor  # bf16 [K/g, N_pad, 2]
    out_features: int  # N (the real one, before padding)
    group_size: int
    weight_packed: torch.Tensor  # int32 [N, K/8], the layer's canonical tensor (not a copy)
    scale: torch.Tensor  # bf16 [N, K/g]
    offset: torch.Tensor  # bf16 [N, K/g]: 8 + zp, what to subtract from the stored nibble u to get q - zp


@torch.no_grad()
def repack(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
           group_size: int) -> CpuInt4Weight:
    """Canonical tensors (see packing.py) -> torch's CPU int4 layout. Runs once per layer."""
    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    n_pad = -n % _N_MULTIPLE
    u = (unpack_int4(weight_packed, k).to(torch.int32) + OFFSET).cpu()  # (N, K), 0..15
    scale = weight_scale.float().cpu()  # (N, K/g)
    if weight_zero_point is not None:
        zp = unpack_int4(weight_zero_point, n, dim=0).float().cpu()  # (N, K/g)
    else:
        zp = torch.zeros_like(scale)
    zero = -zp * scale
    offset = (OFFSET + zp).to(torch.bfloat16)  # integers 0..15: exact in bf16
    block_scale = scale.to(torch.bfloat16)
    if n_pad:
        u = torch.nn.functional.pad(u, (0, 0, 0, n_pad), value=OFFSET)
        scale = torch.nn.functional.pad(scale, (0, 0, 0, n_pad))
        zero = torch.nn.functional.pad(zero, (0, 0, 0, n_pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, _INNER_K_TILES)
    scales_and_zeros = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N_pad, 2)
    return CpuInt4Weight(packed, scales_and_zeros, n, group_size, weight_packed.cpu(), block_scale, offset)


def matmul(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x [..., K] -> x @ W.T [..., N] in x's dtype, computed with bf16 activations: by torch's fused op for
    fewer than DEQUANTIZE_MIN_ROWS rows, else by dequantize-then-matmul in blocks."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K)
    if x2.shape[0] >= DEQUANTIZE_MIN_ROWS and _LITTLE_ENDIAN:
        y = _matmul_dequantized(x2, weight)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight.packed, weight.group_size,
                                                       weight.scales_and_zeros)
        y = y[:, : weight.out_features]  # drop the padding rows
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


def _matmul_dequantized(x2: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x2 (M, K) bf16 -> (M, N) bf16: each block of output rows of W rebuilt in bf16, then one matmul."""
    n, k = weight.weight_packed.shape[0], weight.weight_packed.shape[1] * 8
    block = max(1, min(n, BLOCK_WEIGHTS // k))
    y = torch.empty(x2.shape[0], n, dtype=torch.bfloat16)
    w = torch.empty(block, k, dtype=torch.bfloat16)
    pairs, high = torch.empty(block, k // 2, dtype=torch.int16), torch.empty(block, k // 2, dtype=torch.int16)
    for start in range(0, n, block):
        rows = min(block, n - start)
        w_block = _dequantize_rows(weight, start, w[:rows], pairs[:rows], high[:rows])  # (rows, K)
        y[:, start:start + rows] = x2 @ w_block.T  # (M, rows)
    return y


def _dequantize_rows(weight: CpuInt4Weight, start: int, out: torch.Tensor, pairs: torch.Tensor,
                     high: torch.Tensor) -> torch.Tensor:
    """Rows start .. start + len(out) - 1 of W, (u - (8 + zp)) * scale in bf16, written into out (rows, K).

    Equal, bit for bit, to packing.dequantize(weight_packed, scale, zp, dtype=bf16) on those rows with the
    bf16 scale: u - (8 + zp) is a small integer (exact in bf16), so the product is rounded once, as there.
    pairs and high are int16 (rows, K/2) scratch. Every op writes into a buffer the caller reuses (a fresh
    tensor of several MiB per op costs more in page faults than the op itself), and each runs over whole
    contiguous tensors (writing the two nibbles of a byte to alternate elements is much slower).
    """
    rows, k = out.shape
    # Word j holds columns 8j .. 8j+7, least significant nibble first; read as little-endian bytes, byte b of
    # a row holds column 2b in its low nibble and column 2b + 1 in its high one. Moving the high nibble up into
    # the second byte of an int16, lo | hi << 8, puts u in column order when those int16 are read as bytes.
    as_bytes = weight.weight_packed[start:start + rows].view(torch.uint8)  # (rows, K/2)
    pairs.copy_(as_bytes)  # (rows, K/2): hi << 4 | lo
    torch.bitwise_and(pairs, 0xF0, out=high).bitwise_left_shift_(4)  # hi << 8
    pairs.bitwise_and_(0xF).bitwise_or_(high)  # hi << 8 | lo
    out.copy_(pairs.view(torch.uint8).view(rows, k))  # u, 0..15, as bf16
    groups = out.view(rows, weight.scale.shape[1], -1)  # (rows, K/g, g)
    groups.sub_(weight.offset[start:start + rows, :, None]).mul_(weight.scale[start:start + rows, :, None])
    return out
