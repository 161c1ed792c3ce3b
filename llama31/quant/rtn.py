"""Round-to-nearest (RTN) INT4 quantization of one weight matrix, group-wise along the input dimension.

For each output row n and group of g consecutive inputs (the group holds W[n, j*g : (j+1)*g]):

  symmetric (default; the compressed-tensors / GPTQ / Marlin convention):
      scale = absmax / 7.5                      7.5 = (q_max - q_min) / 2 = 15 / 2
      q     = clamp(round(W / scale), -8, 7)    so +absmax lands on 7.5 -> 8 -> clipped to 7
  asymmetric (optional integer zero point; the compressed-tensors convention):
      lo = min(min W, 0), hi = max(max W, 0)    0.0 must stay exactly representable
      scale = (hi - lo) / 15
      zp    = clamp(round(-8 - lo / scale), -8, 7)
      q     = clamp(round(W / scale) + zp, -8, 7)

Everything is computed in fp32 (the scale as the correctly rounded fp32 quotient); round() is half-to-even
(torch.round). The scale is first rounded to the dtype it is stored in (bf16 for a bf16 model) and q is computed
with that stored scale, so dequantizing (q - zp) * scale reproduces exactly what the integers were chosen for.
A group of zeros gets the smallest positive fp32 scale (eps) instead of 0, which would divide by zero.
"""

from __future__ import annotations

import torch

from llama31.quant.packing import pack_int4

GROUP_SIZES = (32, 64, 128)  # the ones in published checkpoints; any multiple of 8 that divides K works


def check_group_size(in_features: int, group_size: int, where: str = "") -> None:
    """Raise a ValueError a user can act on when ``group_size`` cannot split ``in_features``."""
    where = f"{where}: " if where else ""
    if group_size <= 0 or group_size % 8:
        raise ValueError(f"{where}group_size must be a positive multiple of 8 (a packed word must not "
                         f"straddle two groups), got {group_size}; use 32, 64 or 128")
    if in_features % group_size:
        raise ValueError(f"{where}in_features K={in_features} is not a multiple of group_size {group_size}; "
                         f"use a group size that divides it (e.g. one of "
                         f"{[g for g in GROUP_SIZES if in_features % g == 0]})")


@torch.no_grad()
def rtn_quantize(weight: torch.Tensor, group_size: int = 128, *, symmetric: bool = True,
                 scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize W [N, K] to (q int8 [N, K] in [-8, 7], scale [N, K/g] in scale_dtype, zp int8 [N, K/g] or None).

    scale_dtype defaults to the weight's dtype (the model dtype, as in compressed-tensors checkpoints).
    """
    if weight.dim() != 2:
        raise ValueError(f"rtn_quantize: expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    n, k = weight.shape
    check_group_size(k, group_size, "rtn_quantize")
    scale_dtype = scale_dtype or weight.dtype
    w = weight.float().unflatten(1, (k // group_size, group_size))  # (N, K/g, g)
    eps = torch.finfo(torch.float32).eps

    if symmetric:
        absmax = w.abs().amax(dim=-1)  # (N, K/g)
        scale = _fp32_quotient(absmax, 7.5).clamp(min=eps).to(scale_dtype)
        s = scale.float().unsqueeze(-1)
        q = torch.clamp(torch.round(w / s), -8, 7)
        zero_point = None
    else:
        lo = w.amin(dim=-1).clamp(max=0.0)
        hi = w.amax(dim=-1).clamp(min=0.0)
        scale = _fp32_quotient(hi.double() - lo.double(), 15.0).clamp(min=eps).to(scale_dtype)
        s = scale.float()
        zp = torch.clamp(torch.round(-8.0 - lo / s), -8, 7)  # (N, K/g)
        q = torch.clamp(torch.round(w / s.unsqueeze(-1)) + zp.unsqueeze(-1), -8, 7)
        zero_point = zp.to(torch.int8)
    return q.flatten(1).to(torch.int8), scale, zero_point


def _fp32_quotient(numerator: torch.Tensor, denominator: float) -> torch.Tensor:
    # The correctly rounded fp32 value of numerator / denominator. torch divides a tensor by a Python
    # number by multiplying with its reciprocal, which is 1 ulp off for 1/7.5; the small [N, K/g]
    # statistics are divided in float64 instead (exact enough that one rounding to fp32 is the only one).
    return (numerator.double() / denominator).float()


def quantize_weight(weight: torch.Tensor, group_size: int = 128, *, symmetric: bool = True,
                    scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Quantize W [N, K] to the canonical tensors of ``Int4Linear`` (see llama31/quant/packing.py).

    Returns {"weight_packed": int32 [N, K/8], "weight_scale": [N, K/g]} and, when asymmetric,
    "weight_zero_point": int32 [ceil(N/8), K/g].
    """
    q, scale, zp = rtn_quantize(weight, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
    tensors = {"weight_packed": pack_int4(q), "weight_scale": scale}
    if zp is not None:
        tensors["weight_zero_point"] = pack_int4(zp, dim=0)
    return tensors
