"""The decoder's linear layer: ``nn.Linear`` (no bias), with an optional CPU fast path, packed weights.

Why a fast path: decoding one token multiplies one row per sequence by every weight matrix. That is a
matrix-vector product, and it can go no faster than the weights stream from memory. On the CPU, F.linear's
kernels for one row do not reach that limit: on a 2-core AMD EPYC (Zen 4) whose memory delivers 33-62 GB/s,
F.linear at one row streams weights that do not fit in the cache at 16-20 GB/s in float32 and 15-17 GB/s in
bfloat16 (examples/bench_gemv.py, bench_int4.py and benchmark.py measure this).

``pack()`` reorders the weight once into oneDNN's blocked layout for a batch of one (the layout torch.compile's
CPU backend chooses for frozen weights) and then multiplies with oneDNN's linear kernel, which streams float32
weights at 67-85% of the memory's read speed, the fastest eager matrix-vector kernel torch has here (F.linear
51-64%; inductor's compiled ones, llama31/compiled.py, 90-99%; examples/bench_gemv.py): decoding is 1.5x
(fp32) and 1.5-2.0x (bf16) faster on a 1.24 B model at one row, 1.6-2.7x at 4 rows, prefill 1.1-1.4x. It
computes the same product; only the order of the float additions differs (float32: ~1e-7 relative, like any
other matmul kernel).

    y = x W^T        x: (..., in_features)  W: (out_features, in_features)  y: (..., out_features)

A packed layer is for inference: its weight is an opaque tensor (``weight.is_mkldnn``) that takes no gradient
(gradients still flow back to the layer's input) and cannot change device or dtype (call ``unpack()`` first).
Checkpoints do not see the packing: ``state_dict()`` returns the plain (out_features, in_features) weight,
bit-identical to what was packed, and ``load_state_dict`` takes a plain one and packs it again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def packing_supported(weight: torch.Tensor) -> str | None:
    """None if ``weight`` can be packed here, else why not (a sentence for an error message)."""
    if weight.device.type != "cpu":
        return f"the weight is on {weight.device}; packing is for CPU inference"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the weight is {weight.dtype}; oneDNN packing here covers float32 and bfloat16"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "this torch build has no oneDNN (mkldnn) linear kernels"
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bfloat16 support in oneDNN (AVX512-BF16 / AMX)"
    return None


def packed_product(rows: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """rows (n, in_features) @ W^T -> (n, out_features), W packed by Linear.pack."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed_weight, None, "none", [], "")


class _PackedProduct(torch.autograd.Function):
    """packed_product with the gradient for its input, dL/drows = dL/dy W (a packed weight takes none)."""

    @staticmethod
    def forward(ctx, rows, packed_weight):
        ctx.save_for_backward(packed_weight)
        return packed_product(rows, packed_weight)

    @staticmethod
    def backward(ctx, grad_y):
        (packed_weight,) = ctx.saved_tensors
        return grad_y @ packed_weight.to_dense().to(grad_y.dtype), None


class Linear(nn.Linear):
    """``nn.Linear(in_features, out_features, bias=False)`` that can pack its weight for the CPU."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, device=None):
        super().__init__(in_features, out_features, bias=False, dtype=dtype, device=device)

    @property
    def packed(self) -> bool:
        return self.weight.is_mkldnn

    @torch.no_grad()
    def pack(self) -> None:
        """Reorder the weight into oneDNN's layout (no-op if packed). ValueError if it cannot be packed here."""
        if self.packed:
            return
        reason = packing_supported(self.weight)
        if reason:
            raise ValueError(f"cannot pack this Linear({self.in_features}, {self.out_features}): {reason}")
        # the second argument is the batch size the layout is chosen for: one row, as in decoding
        packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self.weight = nn.Parameter(packed, requires_grad=False)

    @torch.no_grad()
    def unpack(self) -> None:
        """Back to a plain (out_features, in_features) weight (no-op if not packed)."""
        if self.packed:
            self.weight = nn.Parameter(self.weight.to_dense())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        if not self.packed:
            return F.linear(x, self.weight)
        rows = x.reshape(-1, self.in_features).contiguous()  # (n, in_features): oneDNN takes a 2-D matrix
        if torch.is_grad_enabled() and rows.requires_grad:
            y = _PackedProduct.apply(rows, self.weight)  # oneDNN's op has no backward of its own
        else:
            y = packed_product(rows, self.weight)  # (n, out_features)
        return y.view(*x.shape[:-1], self.out_features)

    # checkpoints see the plain weight
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed:
            destination[prefix + "weight"] = self.weight.detach().to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        was_packed = self.packed
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if was_packed:
            self.pack()
