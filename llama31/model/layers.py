"""How the model builds its projections: the one place that chooses plain, INT4 or model-parallel layers.

The decoder asks a ``Layers`` object for each weight-bearing module by its role, never by class:

    role        used for                              when split across model-parallel ranks
    ---------   -----------------------------------   ---------------------------------------
    column      wq, wk, wv, w1, w3  (x @ W.T)         output features (dim 0 of W)
    row         wo, w2                                input features (dim 1 of W)
    embedding   tok_embeddings                        vocabulary (dim 0)
    output      the final projection to the vocab     vocabulary (dim 0)

``Layers`` builds plain ``Linear`` (``nn.Linear`` without bias that can pack its weight for the CPU,
llama31/model/linear.py) and ``nn.Embedding``. Other choices subclass it and are passed to
``Transformer(args, layers=...)``: ``llama31.quant.Int4Layers`` (4-bit weights in the blocks) and
``llama31.parallel.ParallelLayers`` (fairscale tensor parallelism). The model code stays the same.
"""

from __future__ import annotations

import torch
from torch import nn

from llama31.model.linear import Linear


class Layers:
    """Plain single-device layers: every weight stored whole, in ``dtype`` on ``device``."""

    model_parallel_size: int = 1  # heads are divided by this number in each rank's attention
    model_parallel_rank: int = 0  # which slice of each split weight this process holds (the loader reads it)

    def column(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        return Linear(in_features, out_features, dtype=dtype, device=device)

    def row(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        return Linear(in_features, out_features, dtype=dtype, device=device)

    def embedding(self, vocab_size: int, dim: int, *, dtype: torch.dtype, device) -> nn.Module:
        return nn.Embedding(vocab_size, dim, dtype=dtype, device=device)

    def output(self, dim: int, vocab_size: int, *, dtype: torch.dtype, device) -> nn.Module:
        return Linear(dim, vocab_size, dtype=dtype, device=device)
