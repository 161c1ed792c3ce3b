"""Compiled decoding on the CPU: one sequence's one-token steps through torch.compile (optional).

Why: decoding one sequence multiplies one row by every weight matrix, so a step can go no faster than the
weights stream from memory (the roofline: memory bandwidth / bytes of weights). The matrix products are our
kernels, called by the compiled step as they are: float32 and bf16 layers our matrix-vector kernel
(llama31/cpu/gemv.py), INT4 layers our INT4 kernel (llama31/quant/cpu_int4.py; torch's int4 op where ours
cannot run), and each layer's attention of the new token our decode-attention kernel (llama31/cpu/attention.py).
What a step does besides (norms, RoPE, the cache writes, SwiGLU, the residual adds: a tenth or more of a step
when each is its own eager call) runs as a few fused C++ loops, and the whole step is called from C++
(cpp_wrapper), so that a step costs little more than streaming the weights; docs/benchmarks.md measures it
against the roofline and against llama.cpp.

    decoder = CompiledDecoder(model)             # model: float32, bfloat16 or INT4, on the CPU, NOT packed
    decoder.setup_cache(1, max_seq_len)          # as model.setup_cache
    with torch.inference_mode():
        decoder(tokens, start_pos, last_only=True)   # as model(...): (1, 1) tokens run compiled, the rest eagerly

The decoder gives the model those kernels (use_gemv, use_decode_kernel: module swaps, the same weights) where
this CPU runs them (x86-64 with AVX512-BF16); elsewhere inductor computes the products itself, with max-autotune
on frozen weights (its own C++ GEMM kernels timed against ATen's for every weight shape). It also moves the
weights and the KV caches into memory in 2 MiB pages (use_huge_pages, llama31/cpu/hugepages.py: the same
tensors, new memory), which a kernel that keeps up with the memory reads faster than 4 KiB pages.

What it costs:
  * Memory: nothing more where our kernels run: they read the model's own weights (moved into 2 MiB pages
    one tensor at a time, in place). Where inductor computes the
    products, a second copy of the float weights (freezing folds each weight in as a constant, re-laid out for
    its kernel), and about 3x the weights while compiling.
  * Time: the first step compiles (tens of seconds; inductor keeps its kernels on disk, under
    /tmp/torchinductor_$USER, so later processes compile in seconds). A C++ compiler must be installed
    (inductor calls g++).
  * Scope: only one sequence's one-token steps are compiled. Prompts and batches of several sequences run the
    model eagerly: up to 4 rows through the matrix-vector kernel, more through oneDNN's kernel (float32) or
    F.linear (bf16) on the plain weights (no packing; see gemv.py).
  * The model is frozen at the first step: changes made to its weights or modules afterwards are not seen (the
    graph checks none of them, see _compiled_step). Build a new CompiledDecoder over a new model object after
    loading other weights.
One graph serves every position and every cache length: the KV caches are arguments of the compiled function
(see _decode_step), so a new request's cache of another size does not compile again. The numbers are the
model's own: the same function, float additions in another order (~1e-6 relative in float32; tested against
HF transformers).
"""

from __future__ import annotations

import types
import weakref

import torch
import torch._inductor.config  # noqa: F401  (torch._inductor.config.patch, below)
from torch import nn

from llama31.cpu import hugepages
from llama31.cpu.attention import use_decode_kernel
from llama31.cpu.gemv import use_gemv
from llama31.cpu.packed import PackedLinear
from llama31.model import Transformer
from llama31.model.norm import RMSNorm

# inductor settings of the compiled step, applied around each call (torch.compile's options= does not reach the
# freezing pass), so nothing changes for other compiled code:
#   freezing, max_autotune, max_autotune_gemm_backends: weights folded in as constants (what lets inductor re-lay
#       them out for its kernels), and its own C++ GEMM kernels timed against ATen's for every weight shape, for
#       the products our kernels do not take (see the module doc);
#   autotune_num_choices_displayed, max_autotune_report_choices_stats: without printing each timing;
#   pattern_matcher off: inductor would swap decode_attention (llama31/model/attention.py) for ATen's fused
#       flash-attention kernel, the one that attention.py avoids for a single query (several times slower for one
#       query); with it off, the formula as written is compiled. The
#       weight-folding passes of freezing are not pattern_matcher's and still run;
#   cpp_wrapper: the graph's kernels are called from generated C++ rather than from generated Python (fewer
#       Python calls per step). examples/bench/bench_compile.py --against measures both settings.
INDUCTOR_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                    "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False,
                    "pattern_matcher": False, "cpp_wrapper": True}


def compile_unsupported(model: Transformer) -> str | None:
    """None if the model's decode step can be compiled here, else why not (a sentence for an error message)."""
    weight = model.tok_embeddings.weight
    if weight.device.type != "cpu":
        return f"the model is on {weight.device}; compiled decoding is for the CPU (inductor's C++ kernels)"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the model is {weight.dtype}; compiled decoding covers float32 and bfloat16"
    if any(isinstance(m, PackedLinear) for m in model.modules()):
        return "its linear weights are packed for oneDNN; load it with pack=False (the compiled step lays the " \
               "weights out itself)"
    from llama31.quant import Int4Linear

    plain = (nn.Linear, nn.Embedding, RMSNorm, Int4Linear)
    other = {type(m).__name__ for m in model.modules()
             if not isinstance(m, plain) and any(True for _ in (*m.parameters(False), *m.buffers(False)))}
    if other:
        return f"it has {', '.join(sorted(other))} layers (split over processes); compiled decoding covers " \
               "float32, bfloat16 and INT4 models in one process"
    return None


def _decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, caches: list) -> torch.Tensor:
    """The function compiled: one decode step, with the KV caches as arguments. A tensor that torch.compile
    reaches through a module attribute is, with frozen weights, treated as a constant of the graph: a new cache
    would compile a new graph (and hold a new copy of the weights). Reached through an argument, the cache is an
    input, and one graph serves every cache of every length."""
    for layer, cache in zip(model.layers, caches):
        layer.attention.cache = cache
    return model(tokens, start_pos, last_only=True)


def _prepare_int4_layers(model: Transformer) -> str | None:
    """Fix each INT4 layer's kernel for tracing (Int4Linear.prepare_compiled); None, or why one cannot be."""
    from llama31.quant import Int4Linear

    for module in model.modules():
        if isinstance(module, Int4Linear):
            why = module.prepare_compiled()
            if why:
                return why
    return None


# One compiled function per model object, each with its own code object. Dynamo keeps graphs per code object
# and tells them apart by guards; the guard_filter_fn drops the guards on the model's modules (thousands of
# attribute checks, about 1 ms a step), which would otherwise be what tells one model's graph (its weights
# frozen in) from another's. A code object of its own keeps each model's graphs apart instead.
_steps: "weakref.WeakKeyDictionary[Transformer, object]" = weakref.WeakKeyDictionary()


def _compiled_step(model: Transformer):
    if model not in _steps:
        code = _decode_step.__code__.replace()  # a copy: a new code object
        step = types.FunctionType(code, _decode_step.__globals__, _decode_step.__name__)
        # dynamic=True: positions and cache lengths are inputs of the graph, not constants of it
        _steps[model] = torch.compile(step, dynamic=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
    return _steps[model]


class CompiledDecoder:
    """The model, called the same way, with (1, 1)-token steps through torch.compile (see the module doc)."""

    def __init__(self, model: Transformer, options: dict | None = None):
        """options: inductor settings that replace those of INDUCTOR_OPTIONS (to measure them). The graph is
        cached per model object: a second CompiledDecoder over the same model reuses the first one's graph,
        whatever its options (examples/bench/bench_compile.py --against loads a second model). ValueError, with
        the reason, for a model that cannot be compiled (see compile_unsupported; an INT4 layer whose path is not
        one of the CPU kernels, Int4Linear.prepare_compiled)."""
        why = compile_unsupported(model) or _prepare_int4_layers(model)
        if why:
            raise ValueError(f"cannot compile the decode step: {why}")
        hugepages.use_huge_pages(model)  # in place: the tensors prepare_compiled fixed see the new memory
        use_gemv(model)  # our kernels where they run here (no-ops elsewhere), see the module doc
        use_decode_kernel(model)
        self.model = model
        self.options = {**INDUCTOR_OPTIONS, **(options or {})}
        self._step = _compiled_step(model)

    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None) -> None:
        """As Transformer.setup_cache, with one spare position where the context allows: a step whose keys fill
        the whole cache would be a special case for torch.compile (a second graph, a second copy of the weights)."""
        max_seq_len = max_seq_len or self.model.args.max_seq_len
        self.model.setup_cache(max_batch_size, min(max_seq_len + 1, self.model.args.max_seq_len))
        for layer in self.model.layers:  # a step reads the whole cache so far, as it reads the weights
            cache = layer.attention.cache  # new and zero: zero-filled huge-page memory replaces it, no copy
            cache.k, cache.v = (hugepages.empty(t.shape, t.dtype) if hugepages.worth_moving(t) else t
                                for t in (cache.k, cache.v))

    def clear_cache(self) -> None:
        self.model.clear_cache()

    def __call__(self, tokens: torch.Tensor, start_pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        """As Transformer.forward. Steps of (1, 1) tokens under torch.inference_mode() (as Llama runs) go
        through the compiled graph; everything else runs the model eagerly."""
        if tokens.shape == (1, 1) and torch.is_inference_mode_enabled():
            # always a fresh contiguous inference tensor: a view with other strides, or an ordinary tensor, would
            # not match the graph's guards (a second graph, a second copy of the weights)
            tokens = tokens.clone(memory_format=torch.contiguous_format)
            caches = [layer.attention.cache for layer in self.model.layers]
            with torch._inductor.config.patch(self.options):
                return self._step(self.model, tokens, start_pos, caches)
        return self.model(tokens, start_pos, last_only=last_only)
