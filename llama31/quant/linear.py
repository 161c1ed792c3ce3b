"""Int4Linear: a bias-free linear layer whose weight is stored in 4 bits (W4A16), with five forward paths.

    y = x @ W.T,   W[n, k] = (q[n, k] - zp[n, k // g]) * scale[n, k // g]      (see packing.py)

The paths compute the same function and differ only in speed and rounding (W4A8 also rounds x to int8):

    reference   unpack -> dequantize to fp32 -> matmul (fp32 accumulation), any device. The definition
                that every fast path is tested against; slow (it rebuilds W on every call).
    cpu_fused   torch's fused CPU int4 op, bf16 activations (cpu_fused.py); weights repacked once.
    cpu_int4    our W4A16 kernel for 1 to cpu_int4.W4A16_MAX_ROWS rows (cpu_int4.py, csrc/): the arithmetic of
                cpu_fused (bf16 activations, fp32 sums), reading the canonical layout nearer the memory's speed;
                more rows (batches, prompts) go to cpu_fused.
    cuda        our fused W4A16 extension (cuda.py, csrc/): a GEMV kernel for 1..16 rows, dequantize +
                cuBLAS above that; fp16 / bf16 activations.
    cpu_w4a8    W4A8, an option: activations rounded to int8 per block of 32 (as llama.cpp's Q4_0 does), then
                our AVX512-VNNI kernel (cpu_int4.py, csrc/), for every row count; a further rounding of x.

``Int4Linear.backend`` picks one for every layer ("auto", the default, takes the fastest W4A16 path available
on the input's device: cpu_int4 where it builds and the CPU has AVX512-BF16 and VNNI, else cpu_fused; W4A8 is
never automatic); a layer built with ``backend=...`` keeps its own choice.
Act-order layers (GPTQ desc_act) hold their columns sorted by group and an ``input_perm``:
y = x[..., input_perm] @ W_sorted.T.
"""

from __future__ import annotations

import warnings
from dataclasses import is_dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama31.quant import cpu_fused, cpu_int4
from llama31.quant.packing import dequantize, unpack_int4
from llama31.quant.rtn import check_group_size, quantize_weight

BACKENDS = ("auto", "reference", "cpu_fused", "cpu_int4", "cuda", "cpu_w4a8")


def int4_linear_reference(x: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                          weight_zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """The readable definition: x [..., K] -> x @ dequantize(W).T [..., N], accumulated in fp32, in x's dtype."""
    w = dequantize(weight_packed, weight_scale, weight_zero_point)  # (N, K) fp32
    return F.linear(x.float(), w).to(x.dtype)


class Int4Linear(nn.Module):
    """A W4A16 linear layer; its state dict holds the compressed-tensors tensors of packing.py.

    Buffers: weight_packed int32 [N, K/8], weight_scale [N, K/g] (``dtype``), weight_zero_point
    int32 [ceil(N/8), K/g] (only with ``zero_point=True``), input_perm int64 [K] (only with
    ``act_order=True``). Input x [..., K] -> output [..., N] in x's dtype.
    """

    backend: str = "auto"  # the default for every layer; set Int4Linear.backend = "reference" to force it

    def __init__(self, in_features: int, out_features: int, *, group_size: int = 128, zero_point: bool = False,
                 act_order: bool = False, dtype: torch.dtype = torch.bfloat16, device=None,
                 backend: str | None = None):
        super().__init__()
        check_group_size(in_features, group_size, f"Int4Linear({in_features} -> {out_features})")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n_groups = in_features // group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 8, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("weight_scale", torch.zeros(out_features, n_groups, dtype=dtype, device=device))
        if zero_point:
            self.register_buffer("weight_zero_point", torch.zeros((out_features + 7) // 8, n_groups,
                                                                  dtype=torch.int32, device=device))
        else:
            self.weight_zero_point = None
        if act_order:
            self.register_buffer("input_perm", torch.arange(in_features, device=device))
        else:
            self.input_perm = None
        if backend is not None:
            _check_backend(backend)
            self.backend = backend
        self._cpu_weight = None  # (version key, cpu_fused.CpuInt4Weight), built on first cpu_fused use
        self._kernel_scales = None  # (version key, (scale, zero_scale)), built on first cpu_int4 / cpu_w4a8 use
        self._compiled_path = None  # (matmul, *its arguments after x), fixed by prepare_compiled

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 128, *, zero_point: bool = False,
                   dtype: torch.dtype | None = None, backend: str | None = None) -> "Int4Linear":
        """Quantize a float weight W [N, K] (round to nearest) into a new layer on W's device."""
        dtype = dtype or weight.dtype
        layer = cls(weight.shape[1], weight.shape[0], group_size=group_size, zero_point=zero_point,
                    dtype=dtype, device=weight.device, backend=backend)
        layer.load_state_dict(quantize_weight(weight, group_size, symmetric=not zero_point, scale_dtype=dtype))
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in the original input order (undoing the act-order sort), e.g. to compare with HF."""
        w = dequantize(self.weight_packed, self.weight_scale, self.weight_zero_point, dtype=dtype)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)  # W[:, perm[j]] = W_sorted[:, j]
        return w

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Int4Linear: input has {x.shape[-1]} features, the layer expects {self.in_features}")
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)  # act-order: columns in the order W was sorted into
        if self._compiled_path is not None and torch.compiler.is_compiling():
            matmul, *args = self._compiled_path  # a compiled decode step: the path prepare_compiled fixed
        else:
            matmul, *args = self._path(self.resolve_backend(x.device), x.numel() // self.in_features)
        return matmul(x, *args)

    def _path(self, backend: str, rows: int) -> tuple:
        """(function, *its arguments after x) that multiplies ``rows`` rows of x by W on ``backend``."""
        if backend == "cpu_w4a8" or (backend == "cpu_int4" and rows <= cpu_int4.W4A16_MAX_ROWS):
            matmul = cpu_int4.matmul_w4a8 if backend == "cpu_w4a8" else cpu_int4.matmul
            return (matmul, self.weight_packed, *self._kernel_scales_now(), self.group_size)
        if backend in ("cpu_fused", "cpu_int4"):  # cpu_int4 with more rows: torch's op, or (a prompt) dequantize
            return (cpu_fused.matmul, self._cpu_int4_weight())
        if backend == "cuda":
            from llama31.quant import cuda
            return (cuda.int4_linear, self.weight_packed, self.weight_scale, self.weight_zero_point,
                    self.group_size)
        return (int4_linear_reference, self.weight_packed, self.weight_scale, self.weight_zero_point)

    def resolve_backend(self, device: torch.device) -> str:
        """The path a forward on ``device`` takes: the forced one (checked) or the best available."""
        backend = self.backend
        _check_backend(backend)
        if backend == "auto":
            if device.type == "cpu" and cpu_int4.unsupported(self.in_features, self.group_size) is None:
                return "cpu_int4"
            if device.type == "cpu" and cpu_fused.is_available(self.group_size):
                return "cpu_fused"
            if device.type == "cuda" and _cuda_extension_usable():
                return "cuda"
            return "reference"
        if backend == "cpu_fused":
            if device.type != "cpu":
                raise ValueError(f"Int4Linear.backend is 'cpu_fused' but the input is on {device}; use 'auto'")
            if not cpu_fused.is_available(self.group_size):
                raise RuntimeError(f"Int4Linear: torch {torch.__version__} has no CPU int4 op for group size "
                                   f"{self.group_size} (needs torch >= 2.6 and g in "
                                   f"{cpu_fused.SUPPORTED_GROUP_SIZES}); use backend 'reference'")
        if backend == "cuda" and device.type != "cuda":
            raise ValueError(f"Int4Linear.backend is 'cuda' but the input is on {device}; use 'auto'")
        if backend in ("cpu_int4", "cpu_w4a8"):
            if device.type != "cpu":
                raise ValueError(f"Int4Linear.backend is {backend!r} but the input is on {device}; use 'auto'")
            why = cpu_int4.unsupported(self.in_features, self.group_size)
            if why:
                raise RuntimeError(f"Int4Linear({self.in_features} -> {self.out_features}): backend {backend!r} "
                                   f"cannot run: {why}; use 'auto'")
        return backend

    def prepare_compiled(self) -> str | None:
        """Fix the path that a compiled decode step (llama31/cpu/compiled.py) traces: the CPU path "auto" (or
        the layer's backend) takes, with its weights as that kernel reads them, chosen here once, since
        torch.compile cannot trace the checks forward makes on every call. Returns None, or why this layer cannot
        be compiled (a sentence)."""
        backend = self.resolve_backend(self.weight_packed.device)
        if backend not in ("cpu_int4", "cpu_w4a8", "cpu_fused"):
            return (f"Int4Linear({self.in_features} -> {self.out_features}) runs {backend!r}; compiled INT4 "
                    "decoding runs the CPU kernels (backend 'auto', 'cpu_int4', 'cpu_w4a8' or 'cpu_fused')")
        self._compiled_path = self._path(backend, rows=1)  # a compiled step decodes one token of one sequence
        # sizes fixed in the graph: with dynamic=True the sizes of every tensor the step reads would be symbols,
        # which freezing (a buffer becomes a constant of the graph) leaves undefined
        for item in (*self.buffers(), *self._compiled_path):
            for tensor in vars(item).values() if is_dataclass(item) else (item,):
                if isinstance(tensor, torch.Tensor):
                    torch._dynamo.mark_static(tensor)
        return None

    def _cpu_int4_weight(self) -> cpu_fused.CpuInt4Weight:
        # Repack lazily, and again whenever the canonical tensors change (load_state_dict bumps _version).
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_packed, self.weight_scale, self.weight_zero_point)
                    if t is not None)
        if self._cpu_weight is None or self._cpu_weight[0] != key:
            self._cpu_weight = (key, cpu_fused.repack(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                                      self.group_size))
        return self._cpu_weight[1]

    def _kernel_scales_now(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scale as the kernel reads it (bf16 or fp32; fp16 widened to fp32, exactly) and, for asymmetric
        layers, zp * scale in fp32 [N, K/g]; rebuilt when the canonical tensors change."""
        key = tuple((t.data_ptr(), t._version) for t in (self.weight_scale, self.weight_zero_point) if t is not None)
        if self._kernel_scales is None or self._kernel_scales[0] != key:
            scale = self.weight_scale
            if scale.dtype not in (torch.bfloat16, torch.float32):
                scale = scale.float()
            zero_scale = None
            if self.weight_zero_point is not None:
                zp = unpack_int4(self.weight_zero_point, self.out_features, dim=0).float()  # (N, K/g)
                zero_scale = (zp * self.weight_scale.float()).contiguous()
            self._kernel_scales = (key, (scale.contiguous(), zero_scale))
        return self._kernel_scales[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"zero_point={self.weight_zero_point is not None}, act_order={self.input_perm is not None}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Int4Linear.backend must be one of {BACKENDS}, got {backend!r}")


_cuda_failure_reported = False


def _cuda_extension_usable() -> bool:
    """Build (once) and load the CUDA extension; on failure warn once and let "auto" use the reference."""
    global _cuda_failure_reported
    from llama31.quant import cuda
    try:
        cuda.load_extension()
        return True
    except Exception as error:  # a missing compiler or toolkit must not make the model unusable
        if not _cuda_failure_reported:
            warnings.warn(f"llama31.quant: the INT4 CUDA extension could not be built ({error}); Int4Linear "
                          "falls back to the slow reference path. Set Int4Linear.backend = 'cuda' to see the error.")
            _cuda_failure_reported = True
        return False
