"""Compiled decoding on the CPU: one sequence's one-token steps through torch.compile (optional).

Why: decoding one sequence multiplies one row by every weight matrix, so a step can go no faster than the
weights stream from memory (the roofline: memory bandwidth / bytes of weights). The fastest eager kernel torch
has for that product, oneDNN's on packed weights (llama31/model/linear.py), streams float32 weights at 67-85%
of a plain read of the same bytes on a 2-core EPYC, and bfloat16 at 49-73% (its bf16 kernel is bound by
arithmetic). With max-autotune and frozen weights, inductor also generates C++ kernels of its own for each
weight shape (AVX-512 micro-kernels; AVX512-BF16 for bf16), times them against the ATen kernel once, and keeps
the faster (examples/bench_gemv.py --inductor compares the kernels). Decoding the 3.2-1B shape one token at a
time is 1.2-1.5x faster than with the packed eager model in float32 and 1.4-1.7x in bfloat16. float32 reaches
90-95% of the roofline, whether the VM's memory gives about 35 GB/s (eager: 77-83%) or 55-60 GB/s (eager:
62-68%), against reads in the same process by the fastest reader torch has (inductor's own matrix-vector
kernel); bfloat16 reaches 75-86% (eager: 46-61%). examples/benchmark.py --engines llama31-compile,llama31
measures them side by side (README.md, Speed).

    decoder = CompiledDecoder(model)             # model: float32 or bfloat16, on the CPU, NOT packed
    decoder.setup_cache(1, max_seq_len)          # as model.setup_cache
    with torch.inference_mode():
        decoder(tokens, start_pos, last_only=True)   # as model(...): (1, 1) tokens run compiled, the rest eagerly

What it costs, all measured on the 1B shape:
  * Memory: a second copy of the weights. Freezing folds each weight into the compiled step as a constant,
    re-laid out for its kernel; the model keeps its plain weights for the prompts (prefill), which run eagerly.
  * Memory while compiling: about 3x the weights (16 GB for 1B in float32), for the length of the compile.
  * Time: the first step compiles (about a minute for 1B, mostly autotuning; inductor keeps its kernels and
    timings on disk, under /tmp/torchinductor_$USER, so later processes compile in seconds). A C++ compiler
    must be installed (inductor calls g++). Autotuning times the kernels on the machine as it is at that
    moment: compiled while other processes loaded both cores, a 1B step once kept ATen's MKL kernel for 4 of
    every layer's 7 matrices, and that choice stays in the disk cache; compile on a quiet machine (delete
    the cache to tune again).
  * Scope: only one sequence's one-token steps are compiled. Prompts and batches of several sequences run the
    model eagerly (plain F.linear, no packing): each further graph would hold a further copy of the weights.
  * The weights are frozen at the first step: changes made to them afterwards are not seen. Build a new
    CompiledDecoder (and call torch._dynamo.reset()) after loading other weights.
One graph serves every position and every cache length: the KV caches are arguments of the compiled function
(see _decode_step), so a new request's cache of another size does not compile again. The numbers are the
model's own: the same function, float additions in another order (~1e-6 relative in float32; tested against
HF transformers).
"""

from __future__ import annotations

import torch
import torch._inductor.config  # noqa: F401  (torch._inductor.config.patch, below)

from llama31.model import Transformer
from llama31.model.linear import Linear
from llama31.model.norm import RMSNorm
from llama31.model.rope import RotaryEmbedding

# inductor settings of the compiled step, applied around each call (torch.compile's options= does not reach the
# freezing pass), so nothing changes for other compiled code:
#   freezing, max_autotune, max_autotune_gemm_backends: weights folded in as constants (what lets inductor re-lay
#       them out for its kernels), and its own C++ GEMM kernels timed against ATen's for every weight shape;
#   autotune_num_choices_displayed, max_autotune_report_choices_stats: without printing each timing;
#   pattern_matcher off: inductor would swap decode_attention (llama31/model/attention.py) for ATen's fused
#       flash-attention kernel, the one that attention.py avoids for a single query (in the 1B step: 120 us a
#       layer against 23 us for the same call alone); with it off, the formula as written is compiled. The
#       weight-folding passes of freezing are not pattern_matcher's and still run;
#   cpp_wrapper: the graph's kernels are called from generated C++ rather than from generated Python.
# Against the same settings without the last two, paired in one process (python examples/bench_compile.py
# --dtypes bf16 --layers 8 --against '{"pattern_matcher": true, "cpp_wrapper": false}'), a step of the 1B
# shape's first 8 layers is 3% faster in bfloat16 (median of 20 pairs: 4-9% below 100 cached positions, even at
# 100-200) and 1.3-1.6% in float32; its first 4 layers (half the bytes in the output layer) 0.7% in float32.
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
    if any(isinstance(m, Linear) and m.packed for m in model.modules()):
        return "its linear weights are packed for oneDNN; load it with pack=False (the compiled step lays the " \
               "weights out itself)"
    plain = (Linear, torch.nn.Embedding, RMSNorm, RotaryEmbedding)
    other = {type(m).__name__ for m in model.modules()
             if not isinstance(m, plain) and any(True for _ in (*m.parameters(False), *m.buffers(False)))}
    if other:
        return f"it has {', '.join(sorted(other))} layers (INT4, or split over processes); compiled decoding " \
               "covers plain float32 and bfloat16 models in one process"
    return None


def _decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int, caches: list) -> torch.Tensor:
    """The function compiled: one decode step, with the KV caches as arguments. A tensor that torch.compile
    reaches through a module attribute is, with frozen weights, treated as a constant of the graph: a new cache
    would compile a new graph (and hold a new copy of the weights). Reached through an argument, the cache is an
    input, and one graph serves every cache of every length."""
    for layer, cache in zip(model.layers, caches):
        layer.attention.cache = cache
    return model(tokens, start_pos, last_only=True)


class CompiledDecoder:
    """The model, called the same way, with (1, 1)-token steps through torch.compile (see the module doc)."""

    def __init__(self, model: Transformer, options: dict | None = None):
        """options: inductor settings that replace those of INDUCTOR_OPTIONS (to measure them). The graph is
        cached per model object: a second CompiledDecoder over the same model reuses the first one's graph,
        whatever its options (examples/bench_compile.py --against loads a second model)."""
        why = compile_unsupported(model)
        if why:
            raise ValueError(f"cannot compile the decode step: {why}")
        self.model = model
        self.options = {**INDUCTOR_OPTIONS, **(options or {})}
        # dynamic=True: positions and cache lengths are inputs of the graph, not constants of it
        self._step = torch.compile(_decode_step, dynamic=True)

    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None) -> None:
        """As Transformer.setup_cache, with one spare position where the context allows: a step whose keys fill
        the whole cache would be a special case for torch.compile (a second graph, a second copy of the weights)."""
        max_seq_len = max_seq_len or self.model.args.max_seq_len
        self.model.setup_cache(max_batch_size, min(max_seq_len + 1, self.model.args.max_seq_len))

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
