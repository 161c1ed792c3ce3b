"""W4A8 on the CPU: INT4 weights times activations quantized to int8 on the fly (csrc/w4a8_cpu.cpp), an option.

Why: decoding streams every weight once per token, so INT4 decodes faster than bf16 only if the kernel turns
4-bit weights into products faster than the memory delivers them. With bf16 activations (torch's int4 op,
cpu_fused.py) two cores fall behind the memory: a bf16 dot-product instruction does 32 multiply-adds. An int8
one (AVX512-VNNI) does 64, and a masked nibble is already a byte, so quantizing the activations to int8 (as
llama.cpp does for Q4_0: blocks of 32 values, one scale each) lets the cores keep up. The C++ file's header
walks through the kernel; it reads the canonical layout of packing.py, so a layer holds no repacked copy.

What it costs: accuracy. Each activation is rounded to one of 255 levels of its block of 32
(``quantize_activations`` is the definition), where the default path (W4A16) rounds it to bf16 only. It is
therefore never chosen by "auto": ask for it with ``Int4Linear.backend = "cpu_w4a8"`` (or
``Llama.build(..., w4a8=True)``, ``examples/generate.py --w4a8``). docs/demo_model.md measures its held-out
loss on the trained demo model against W4A16's.

Needs an x86-64 CPU with AVX512-VNNI (Intel since Cascade Lake, AMD since Zen 4) and a C++ compiler: the
first call compiles the kernel (seconds; torch caches the build under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "w4a8_cpu.cpp"
BLOCK = 32  # activations per int8 scale (llama.cpp's Q8_0 block)

_loaded = False
_failure: Exception | None = None


def load_extension(verbose: bool = False) -> None:
    """Compile (first call) and load the kernel as torch.ops.llama31_w4a8; a failed build is re-raised."""
    global _loaded, _failure
    if _loaded:
        return
    if _failure is not None:
        raise _failure
    try:
        from torch.utils.cpp_extension import load
        # -fopenmp: the kernel splits rows over torch's threads (at::parallel_for), which is OpenMP in torch's
        # CPU builds; without it the pragma is ignored and one thread does all the work
        load(name="llama31_w4a8", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False,
             verbose=verbose or bool(os.environ.get("LLAMA31_VERBOSE_BUILD")))
        _loaded = True
    except Exception as error:
        _failure = error
        raise


@functools.lru_cache(maxsize=None)  # asked on every forward: answered once per shape
def unsupported(in_features: int, group_size: int) -> str | None:
    """None if the kernel runs here for a layer of this shape, else why not (a sentence for an error)."""
    if in_features % 128:
        return f"it needs in_features divisible by 128, got {in_features}"
    if group_size not in (32, 64) and group_size % 128:
        return f"it needs a group size of 32, 64 or a multiple of 128, got {group_size}"
    try:
        load_extension()
    except Exception as error:
        return f"the kernel could not be built ({error}); set LLAMA31_VERBOSE_BUILD=1 to see the build"
    if not torch.ops.llama31_w4a8.supported():
        return "this CPU lacks AVX512-VNNI"
    return None


def matmul(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
           zero_scale: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """x [..., K] -> quantize_activations(x) @ W.T [..., N] in x's dtype (float32 or bfloat16), W in the canonical
    layout (weight_scale bf16 or fp32); zero_scale = zp * scale, fp32 [N, K/g], for asymmetric layers, else None."""
    load_extension()
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return torch.ops.llama31_w4a8.w4a8(x.contiguous(), weight_packed, weight_scale, zero_scale, group_size)


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """The definition of the kernel's activation rounding, in plain torch (float64 out), for tests and readers:
    per block of 32 values, s = max|x| / 127 and x ~= s * round(x * (127 / max|x|)), half to even, in float32."""
    blocks = x.float().unflatten(-1, (-1, BLOCK))  # (..., K/32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    # 127 / amax correctly rounded (a tensor divided by a tensor: torch computes scalar / tensor as a reciprocal
    # times the scalar, which can round differently and move a value that lies on a half step)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inverse)  # integers in [-127, 127]
    return (q.double() * (amax / 127).double()).flatten(-2)
