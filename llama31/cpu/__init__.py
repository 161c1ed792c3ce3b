"""CPU speed, applied from outside the model (the model core in llama31/model/ is the formula alone).

    defaults.py   which of the two below each linear layer gets on loading (Transformer.from_pretrained and
                  Llama.build, by default on the CPU: the `pack` option)
    packed.py     PackedLinear: linear weights in oneDNN's blocked layout, swapped in after loading (pack_weights)
    gemv.py       GemvLinear: our matrix-vector kernel (csrc/gemv.cpp) for decode steps, on the plain weights
    attention.py  our kernel for one new token's attention over the KV cache (csrc/decode_attention.cpp)
    hugepages.py  weights (and KV caches) in 2 MiB pages, which a kernel that keeps up with the memory reads
                  faster
    compiled.py   CompiledDecoder: one sequence's decode steps through torch.compile (Llama(compile=True)),
                  with the two kernels above inside the graph
    extension.py  how the C++ kernels are built on first use

All exist because decoding is bound by how fast the weights stream from memory; docs/benchmarks.md measures
each against that limit.
"""

from llama31.cpu.packed import PackedLinear, pack_weights, packing_supported, unpack_weights

__all__ = ["PackedLinear", "pack_weights", "packing_supported", "unpack_weights"]
