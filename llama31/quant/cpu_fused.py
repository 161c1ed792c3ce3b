"""The CPU fast path: torch's own fused int4 matmul (``_weight_int4pack_mm_for_cpu``, torch >= 2.6).

torch's op uses its own blocked packing and a float zero per group:
    W[n, k] = (u[n, k] - 8) * scale[k // g, n] + zero[k // g, n]       u in [0, 15]
Our canonical layout stores u = q + 8 already, so the conversion is:
    u      = the nibbles of weight_packed, unchanged
    zero   = -zp * scale            (0 for symmetric layers)
The op wants N % 16 == 0, so rows are padded with u = 8 (weight 0) and the extra outputs dropped.
It is fast only with bf16 activations (fp32 ones take a path 30-40x slower), so activations are cast to
bf16 and the result cast back: that rounding (relative 2**-9 per value) is the price of this path.
The repacked copy is built once per layer (``repack``) and kept beside the canonical tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llama31.quant.packing import OFFSET, unpack_int4

SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)  # what the op accepts (it checks qGroupSize)
_N_MULTIPLE = 16
_INNER_K_TILES = 2  # a layout parameter of the conversion; the CPU op accepts any of 1, 2, 4, 8


def is_available(group_size: int) -> bool:
    """True when this torch has the CPU int4 ops and they accept ``group_size``."""
    ops = torch.ops.aten
    return (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")
            and group_size in SUPPORTED_GROUP_SIZES)


@dataclass
class CpuInt4Weight:
    """One layer repacked for torch's CPU op."""

    packed: torch.Tensor  # uint8 [N_pad, K/2], torch's blocked layout
    scales_and_zeros: torch.Tensor  # bf16 [K/g, N_pad, 2]
    out_features: int  # N (the real one, before padding)
    group_size: int


@torch.no_grad()
def repack(weight_packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor | None,
           group_size: int) -> CpuInt4Weight:
    """Canonical tensors (see packing.py) -> torch's CPU int4 layout. Runs once per layer."""
    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    n_pad = -n % _N_MULTIPLE
    u = (unpack_int4(weight_packed, k).to(torch.int32) + OFFSET).cpu()  # (N, K), 0..15
    scale = weight_scale.float().cpu()  # (N, K/g)
    if weight_zero_point is not None:
        zero = -unpack_int4(weight_zero_point, n, dim=0).float().cpu() * scale  # (N, K/g)
    else:
        zero = torch.zeros_like(scale)
    if n_pad:
        u = torch.nn.functional.pad(u, (0, 0, 0, n_pad), value=OFFSET)
        scale = torch.nn.functional.pad(scale, (0, 0, 0, n_pad))
        zero = torch.nn.functional.pad(zero, (0, 0, 0, n_pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, _INNER_K_TILES)
    scales_and_zeros = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (K/g, N_pad, 2)
    return CpuInt4Weight(packed, scales_and_zeros, n, group_size)


def matmul(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """x [..., K] -> x @ W.T [..., N] in x's dtype, computed by torch's fused op with bf16 activations."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (M, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight.packed, weight.group_size, weight.scales_and_zeros)
    y = y[:, : weight.out_features]  # drop the padding rows
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)
