"""SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"): w2(silu(w1 x) * w3 x).

w1 is the "gate", w3 the "up" projection (HF: gate_proj, up_proj), w2 the "down" projection (HF: down_proj).
dim -> hidden_dim -> dim, with hidden_dim = 14336 for 8B (ModelArgs derives it).
"""

import torch
import torch.nn.functional as F
from torch import nn

from llama31.config import ModelArgs
from llama31.model.layers import Layers


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, layers: Layers, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.w1 = layers.column(args.dim, args.hidden_dim, dtype=dtype, device=device)
        self.w3 = layers.column(args.dim, args.hidden_dim, dtype=dtype, device=device)
        self.w2 = layers.row(args.hidden_dim, args.dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (bs, seqlen, dim) -> (bs, seqlen, dim)."""
        gate = F.silu(self.w1(x))  # (bs, seqlen, hidden_dim), e.g. (1, 7, 14336); silu(z) = z * sigmoid(z)
        return self.w2(gate * self.w3(x))  # (1, 7, 4096)
