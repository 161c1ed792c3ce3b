"""How the model builds its projections: the one place that chooses plain, INT4 or model-parallel layers.

The decoder asks a ``Layers`` object for each weight-bearing module by its role, never by class:

    role        used for                              when split across model-parallel ranks
    ---------   -----------------------------------   -------------------------------------------------
    column      wq, w1, w3  (y = x W^T)               output features (dim 0 of W)
    kv          wk, wv                                kv heads (repeated when ranks outnumber them)
    row         wo, w2                                input features (dim 1 of W)
    embedding   tok_embeddings                        vocabulary (dim 0)
    output      the final projection to the vocab     vocabulary (dim 0)

``Layers`` builds plain ``nn.Linear`` (no bias) and ``nn.Embedding``, and every head lives in this process.
Other choices subclass it and are passed to ``Transformer(args, layers=...)``: ``llama31.quant.Int4Layers``
(4-bit weights in the blocks) and ``llama31.parallel.ParallelLayers`` (fairscale tensor parallelism). The model
code stays the same. (Faster CPU layouts are swapped in after loading instead: llama31/cpu/.)
"""

from __future__ import annotations

import torch
from torch import nn


class Layers:
    """Plain single-device layers: every weight stored whole, in ``dtype`` on ``device``."""

    model_parallel_size: int = 1  # how many processes share the model
    model_parallel_rank: int = 0  # which slice of each split weight this process holds (the loader reads it)

    def local_heads(self, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """How many query and key/value heads this process computes: all of them."""
        return n_heads, n_kv_heads

    def column(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)

    def kv(self, in_features: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device) -> nn.Module:
        return self.column(in_features, n_kv_heads * head_dim, dtype=dtype, device=device)

    def row(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device)

    def embedding(self, vocab_size: int, dim: int, *, dtype: torch.dtype, device) -> nn.Module:
        return nn.Embedding(vocab_size, dim, dtype=dtype, device=device)

    def output(self, dim: int, vocab_size: int, *, dtype: torch.dtype, device) -> nn.Module:
        return nn.Linear(dim, vocab_size, bias=False, dtype=dtype, device=device)
