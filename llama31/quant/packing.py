"""The canonical INT4 weight layout: compressed-tensors "pack-quantized", and how to read it back.

One quantized linear layer y = x @ W.T, with W of shape [N, K] (N output features, K input features),
is stored as integers q in [-8, 7] and one scale per output row and group of g consecutive inputs:

    W[n, k] ~= (q[n, k] - zp[n, k // g]) * scale[n, k // g]          zp = 0 when symmetric (the default)

Tensors (the names of a compressed-tensors checkpoint and of ``Int4Linear``'s state dict):

    weight_packed      int32 [N, K/8]        8 values per word, packed along K: nibble i (bits 4i..4i+3,
                                             least significant first) of word j holds column 8j + i,
                                             stored as q + 8 (0..15), so 0x88888888 is eight zeros
    weight_scale       float [N, K/g]        model dtype (bf16 / fp16 / fp32)
    weight_zero_point  int32 [ceil(N/8), K/g] optional (asymmetric only): packed along N, nibble i of
                                             word [j, group] holds the zero point of row 8j + i, stored
                                             as zp + 8 (compressed-tensors packs zero points on dim 0)
    input_perm         int64 [K]             optional (act-order): the layer computes
                                             x[..., input_perm] @ W_sorted.T, see llama31.quant.formats

This is exactly the layout of the published Llama 3.1 w4a16 compressed-tensors checkpoints (the 405B
among them), so their tensors load without repacking; GPTQ checkpoints are converted once, in formats.py.
Group sizes 32, 64 and 128 are the ones in use; K must be a multiple of g and g a multiple of 8
(so a word never straddles two groups, which the fused kernels rely on).
"""

from __future__ import annotations

import torch

VALUES_PER_WORD = 8  # 32-bit word / 4-bit value
OFFSET = 8  # q in [-8, 7] is stored as q + 8 in [0, 15]
_SHIFTS = tuple(4 * i for i in range(VALUES_PER_WORD))


def pack_int4(q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack signed 4-bit integers into int32 words along ``dim``, least significant nibble first.

    q: integer tensor with values in [-8, 7]; its size along ``dim`` is padded with zeros (q = 0) to a
    multiple of 8. Returns int32 with that size divided by 8. ``pack_int4(q)`` gives weight_packed
    from q [N, K]; ``pack_int4(zp, dim=0)`` gives weight_zero_point from zp [N, K/g].
    """
    if q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"pack_int4: expected an integer tensor, got {q.dtype}")
    if q.numel() and (q.min() < -OFFSET or q.max() > OFFSET - 1):
        raise ValueError(f"pack_int4: values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    q = q.movedim(dim, -1).to(torch.int64) + OFFSET  # unsigned nibbles, packed dim last
    pad = -q.shape[-1] % VALUES_PER_WORD
    if pad:
        q = torch.nn.functional.pad(q, (0, pad), value=OFFSET)  # padding holds q = 0
    nibbles = q.unflatten(-1, (-1, VALUES_PER_WORD))  # (..., words, 8)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    words = (nibbles << shifts).sum(-1)  # 0 .. 2**32 - 1, exact in int64
    # Reinterpret as signed int32 (two's complement), the dtype checkpoints use.
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words.movedim(-1, dim).contiguous()


def unpack_int4(packed: torch.Tensor, size: int, dim: int = -1) -> torch.Tensor:
    """The inverse of ``pack_int4``: int32 words -> int8 values in [-8, 7], ``size`` of them along ``dim``.

    packed: int32 [..., ceil(size/8)] (with ``dim`` last). Returns int8 [..., size].
    """
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4: expected int32 words, got {packed.dtype}")
    words = packed.movedim(dim, -1)
    if words.shape[-1] * VALUES_PER_WORD < size:
        raise ValueError(f"unpack_int4: {words.shape[-1]} words hold {words.shape[-1] * VALUES_PER_WORD} "
                         f"values, fewer than the {size} asked for")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    # Arithmetic shift keeps the sign bit of word >> 28, but "& 0xF" keeps only the nibble.
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF  # (..., words, 8)
    values = nibbles.flatten(-2)[..., :size].to(torch.int8) - OFFSET
    return values.movedim(-1, dim)


def dequantize(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
               weight_zero_point: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The canonical tensors -> the float weight W [N, K] = (q - zp) * scale, computed in fp32.

    weight_packed int32 [N, K/8]; weight_scale [N, K/g]; weight_zero_point int32 [ceil(N/8), K/g] or None.
    The group size is implied: g = K / (K/g). Returns ``dtype`` [N, K] (the input order of the
    packed columns: for act-order layers that is the sorted order, see ``input_perm``).
    """
    n, k = weight_packed.shape[0], weight_packed.shape[1] * VALUES_PER_WORD
    n_groups = weight_scale.shape[-1]
    if weight_scale.shape[0] != n or k % n_groups:
        raise ValueError(f"dequantize: weight_scale {tuple(weight_scale.shape)} does not fit weight_packed "
                         f"{tuple(weight_packed.shape)} (expected [{n}, K/g] with K = {k})")
    group_size = k // n_groups
    q = unpack_int4(weight_packed, k).float().unflatten(1, (n_groups, group_size))  # (N, K/g, g)
    if weight_zero_point is not None:
        zp = unpack_int4(weight_zero_point, n, dim=0).float()  # (N, K/g)
        q = q - zp.unsqueeze(-1)
    w = q * weight_scale.float().unsqueeze(-1)  # (N, K/g, g)
    return w.flatten(1).to(dtype)  # (N, K)
