"""RMSNorm: scale each vector to unit root-mean-square, then by a learned per-channel weight.

    y = (x / sqrt(mean(x^2) + eps)) * weight

Llama normalises in float32 whatever the activation dtype, casts back to the input dtype, and only then
multiplies by the weight (in that order: HF and Meta agree, and the order matters in bf16).
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, *, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim), same dtype as x."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight
