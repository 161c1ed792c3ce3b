"""Linear layers for decoding on the CPU: our matrix-vector kernel (csrc/gemv.cpp) for a few rows.

Why: decoding multiplies one row per sequence by every weight matrix, so a step can go no faster than the
weights stream from memory. oneDNN's kernels (F.linear's, or those on packed weights, packed.py) fall behind the
memory when it is fast, bf16 most; this kernel has each thread read its share of the rows as one stream, front
to back, and keeps up. The arithmetic is F.linear's: float32 sums of the products (bf16 products are exact in
float32), the result in the weights' dtype (only the order of the additions differs).

    use_gemv(model)                     # every bias-free float32 / bf16 nn.Linear on the CPU -> GemvLinear
    layer = GemvLinear.from_linear(lin) # the same Parameter: state_dict, tied weights, .to() as nn.Linear

    y = x W^T    x: (..., in_features)   W: (out_features, in_features)   y: (..., out_features)

A GemvLinear is an nn.Linear: up to MAX_ROWS rows of x (a decode step) go through the kernel. More rows (a
prompt, where blocked matrix-matrix kernels do better) go through oneDNN's linear kernel on the plain weight in
float32 (F.linear's fp32 kernel, MKL's, runs at well under half its speed on AMD CPUs) and through F.linear in
bf16; other dtypes or devices, or a product that needs a gradient, through F.linear. A float32 model loaded on
the CPU gets these layers by default (defaults.py), and compiled decoding (compiled.py) gives them to every float
layer, so that its compiled step reads the weights where they are, with no second, re-laid-out copy and no
kernel to autotune.

Needs an x86-64 CPU with AVX512-BF16 (Intel since Cooper Lake / Sapphire Rapids, AMD since Zen 4) and a C++
compiler: the first use compiles the kernel (seconds, cached under ~/.cache/torch_extensions).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llama31.cpu.extension import CppKernels
from llama31.cpu.packed import _set_submodule

MAX_ROWS = 4  # rows of x per call the kernel takes (one pass over W serves them all)


def _mm_shape(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


_kernels = CppKernels("llama31_gemv_cpu", Path(__file__).parent / "csrc" / "gemv.cpp",
                      "linear layers keep torch's kernels", needs="AVX512-BF16", fakes={"mm": _mm_shape})
DTYPES = (torch.float32, torch.bfloat16)  # what the kernel multiplies (x and W alike)
_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def unsupported() -> str | None:
    """None if the kernel runs on this machine, else why not (a sentence for an error message)."""
    return _kernels.unsupported()


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K), at most MAX_ROWS rows; weight (N, K); both float32 or both bf16 -> x @ weight.T (..., N) in
    their dtype, by the kernel. RuntimeError (from the op) for anything else: GemvLinear checks before it calls."""
    _kernels.load()
    return torch.ops.llama31_gemv_cpu.mm(x.contiguous(), weight.contiguous())


class GemvLinear(nn.Linear):
    """nn.Linear whose products of up to MAX_ROWS rows on the CPU run our kernel (see the module doc)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GemvLinear":
        """A GemvLinear holding linear's own parameters (nothing is copied). ValueError if the kernel cannot
        run here."""
        why = unsupported()
        if why:
            raise ValueError(f"cannot use the CPU matrix-vector kernel: {why}")
        layer = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        path = self._path(x)
        if path == "gemv":
            return matmul(x, self.weight)
        if path == "oneDNN":
            rows = x.reshape(-1, self.in_features)  # (n, in_features)
            y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, None, "none", [], "")  # (n, out_features)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)

    def _path(self, x: torch.Tensor) -> str:
        """Which kernel multiplies x: "gemv", "oneDNN" or "F.linear" (see the module doc). Checks of shapes and
        dtypes alone, so torch.compile traces them as constants of the graph."""
        if not (x.dtype == self.weight.dtype and x.device.type == self.weight.device.type == "cpu"
                and self.bias is None
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return "F.linear"
        if x.numel() // self.in_features <= MAX_ROWS and x.dtype in DTYPES:
            return "gemv"
        if x.dtype == torch.float32 and _HAS_ONEDNN_LINEAR:
            return "oneDNN"
        return "F.linear"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel=gemv up to {MAX_ROWS} rows"


@torch.no_grad()
def use_gemv(model: nn.Module, *, dtypes: tuple[torch.dtype, ...] = DTYPES, min_weights: int = 0) -> int:
    """Swap every bias-free nn.Linear of ``model`` on the CPU whose weight is of one of ``dtypes`` (float32,
    bf16) and has at least ``min_weights`` elements for a GemvLinear (the same parameters, tied ones stay tied).
    Returns how many were swapped; 0 where the kernel cannot run here (unsupported() says why)."""
    if unsupported():
        return 0
    swaps = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.Linear and module.bias is None and module.weight.dtype in dtypes
             and module.weight.dtype in DTYPES and module.weight.numel() >= min_weights
             and module.weight.device.type == "cpu"]
    for name, linear in swaps:
        _set_submodule(model, name, GemvLinear.from_linear(linear))
    return len(swaps)
