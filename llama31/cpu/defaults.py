"""Which CPU kernel each linear layer of a loaded model gets: the ``pack`` option of Transformer.from_pretrained
and Llama.build.

Why a choice at all: decoding multiplies one row per sequence by every weight matrix, so a step goes as fast as the
weights stream from memory, and which kernel streams fastest, without slowing prompts, differs by dtype. In
float32, oneDNN's kernel on its packed layout is held back by the cores, while our matrix-vector kernel (gemv.py)
on the plain weights keeps up with the memory, and prompts run as fast on the plain weight (oneDNN's kernel either
way). In bf16, prompts run slower on the plain weight than on the packed layout: our kernel would win decode steps
and lose prompts, so bf16 stays packed (compile=True takes our kernel for its steps). docs/benchmarks.md measures
both ("Our kernel without its prefetch, and as the float32 default").

    choose_kernels(model, None)   # the default: float32 layers -> GemvLinear where the CPU has AVX512-BF16,
                                  # the rest (bf16, or any CPU without it) -> PackedLinear
    choose_kernels(model, True)   # every layer that can be packed -> PackedLinear (ValueError if none can)
    choose_kernels(model, False)  # nothing: plain nn.Linear

Only layers of at least PACK_MIN_WEIGHTS weights are swapped by default: for a small matrix a kernel's fixed
cost per call outweighs its faster streaming. Every swap keeps the arithmetic (float32 sums of the same
products, in another order) and the state_dict; INT4 and model-parallel layers are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from llama31.cpu.gemv import use_gemv
from llama31.cpu.hugepages import use_huge_pages
from llama31.cpu.packed import PACK_MIN_WEIGHTS, pack_weights


def choose_kernels(model: nn.Module, pack: bool | None) -> None:
    """Swap ``model``'s linear layers for the CPU kernels ``pack`` asks for (see the module doc), in place."""
    if pack is False:
        return
    if pack is None:
        swapped = use_gemv(model, dtypes=(torch.float32,), min_weights=PACK_MIN_WEIGHTS)
        swapped += pack_weights(model)
    else:
        swapped = pack_weights(model, min_weights=0, required=True)
    if swapped:
        # the swap read every page of the weights, which are views of the checkpoint's memory-mapped file when
        # loaded in its dtype: a copy of each plain tensor lets the file be unmapped, and the large ones go into
        # 2 MiB pages, which our kernel reads faster (hugepages.py)
        use_huge_pages(model)
