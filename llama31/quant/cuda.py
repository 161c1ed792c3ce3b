"""The fused CUDA W4A16 path: builds csrc/ on first use (JIT, cached) and calls it.

    csrc/int4_kernels.cu   the kernels, free of torch headers (plain nvcc compiles it), with extern "C"
                           launchers taking raw pointers, sizes and a cudaStream_t
    csrc/int4_binding.cpp  the thin torch binding: checks shapes / dtypes / devices, passes pointers

Dispatch on the number of activation rows M (tokens in the batch):
    M <= 16   gemv kernel: reads weight_packed / weight_scale straight from global memory with 128-bit
              loads, dequantizes in registers, accumulates in fp32 (decode is memory-bound: 4-bit
              weights move ~3.9x fewer bytes than bf16 ones)
    M > 16    dequantize kernel writes W [N, K] in the activation dtype, then cuBLAS (torch.matmul):
              prefill is compute-bound and tensor cores win there
Nothing here runs at import: CPU users never need a compiler.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = (CSRC / "int4_binding.cpp", CSRC / "int4_kernels.cu")
MAX_GEMV_ROWS = 16  # the largest M the gemv kernel is instantiated for (int4_kernels.cu: kMaxRows)

_extension = None
_build_error: Exception | None = None


def load_extension(verbose: bool = False):
    """Compile (first call, ~1 min) and import the extension; later calls return the cached module.

    A failed build is remembered and re-raised without rebuilding. Needs a CUDA build of torch and nvcc.
    """
    global _extension, _build_error
    if _extension is not None:
        return _extension
    if _build_error is not None:
        raise _build_error
    try:
        if torch.version.cuda is None or not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} has no usable CUDA (torch.version.cuda="
                               f"{torch.version.cuda}, cuda available={torch.cuda.is_available()})")
        from torch.utils.cpp_extension import load
        _extension = load(
            name="llama31_int4_cuda",
            sources=[str(s) for s in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo"],
            verbose=verbose or bool(os.environ.get("LLAMA31_VERBOSE_BUILD")),
        )
    except Exception as error:
        _build_error = error
        raise
    return _extension


def _activation_dtype(x: torch.Tensor, weight_scale: torch.Tensor) -> torch.dtype:
    # The kernels take fp16 / bf16; fp32 inputs run in the model's 16-bit dtype (bf16 if that is fp32 too).
    for dtype in (x.dtype, weight_scale.dtype):
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return torch.bfloat16


def int4_linear(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                weight_zero_point: torch.Tensor | None, group_size: int, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """x [..., K] (CUDA) -> x @ W.T [..., N] in x's dtype, with W in the canonical layout of packing.py.

    ``out`` ([M, N], activation dtype, M = x.numel() // K) lets a caller pass a pre-filled buffer, e.g.
    NaN-poisoned to check that every element is written.
    """
    ext = load_extension()
    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    act = _activation_dtype(x, weight_scale)
    x2 = x.reshape(-1, k).to(act).contiguous()  # (M, K)
    scale = weight_scale.to(act).contiguous()
    zero_point = None if weight_zero_point is None else weight_zero_point.contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=act, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    if m <= MAX_GEMV_ROWS:
        ext.gemv(x2, weight_packed.contiguous(), scale, zero_point, out, group_size, stream)
    else:
        w = torch.empty(n, k, dtype=act, device=x.device)
        ext.dequantize(weight_packed.contiguous(), scale, zero_point, w, group_size, stream)
        torch.matmul(x2, w.T, out=out)
    return out.reshape(*x.shape[:-1], n).to(x.dtype)


def dequantize_cuda(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    weight_zero_point: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The dequantize kernel alone: W [N, K] in ``dtype`` (fp16 / bf16), for tests and benchmarks."""
    ext = load_extension()
    n, k = weight_packed.shape[0], weight_packed.shape[1] * 8
    w = torch.empty(n, k, dtype=dtype, device=weight_packed.device)
    zero_point = None if weight_zero_point is None else weight_zero_point.contiguous()
    ext.dequantize(weight_packed.contiguous(), weight_scale.to(dtype).contiguous(), zero_point, w, group_size,
                   torch.cuda.current_stream(weight_packed.device).cuda_stream)
    return w

