"""Rotary position embedding (RoPE) with Llama 3.1's "llama3" frequency scaling.

RoPE encodes position p by rotating each pair of channels (x[2i], x[2i+1]) of a query or key head by the
angle p * w_i, with one frequency per pair:

    w_i = theta^(-2i/d),   i = 0 .. d/2 - 1          (d = head_dim, theta = rope_theta = 500000)

so that q . k depends only on the distance between the two positions.

Llama 3.1 stretches the context from 8K (L = original_max_position_embeddings) to 128K by slowing down the
low frequencies (long wavelengths lambda_i = 2 pi / w_i), with factor s and band edges a, b:

    lambda_i < L / b          high frequency: unchanged            w'_i = w_i
    lambda_i > L / a          low frequency:  divided by s         w'_i = w_i / s
    in between                blended:        w'_i = (1 - g) w_i / s + g w_i,   g = (L / lambda_i - a) / (b - a)

For 3.1 (d = 128, s = 8, a = 1, b = 4, L = 8192): i = 0..28 unchanged, 29..34 blended, 35..63 divided by 8.

Meta rotates interleaved pairs (x[2i], x[2i+1]), as here; HF rotates halves (x[i], x[i + d/2]) and permutes
the rows of wq and wk to match (llama31.checkpoints.names does that permutation on load).

The frequencies and the cos/sin tables are computed in float64 and kept in float32 whatever the model's dtype:
in bf16 the angle at position 100000 would be off by hundreds of radians.
"""

from __future__ import annotations

import math

import torch

from llama31.config import ModelArgs, RopeScaling


def llama3_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """The (scaled) rotation frequencies w'_i, i = 0 .. head_dim/2 - 1, as float64 of shape (head_dim/2,)."""
    # w_i = theta^(-2i/d)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq
    s, a, b = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    L = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    # g = 1 keeps w_i, g = 0 divides it by s; clamping to [0, 1] gives the three bands in one formula
    g = ((L / wavelength - a) / (b - a)).clamp(0.0, 1.0)
    return inv_freq * ((1 - g) / s + g)


class RotaryEmbedding:
    """cos/sin tables for positions 0 .. max_seq_len - 1, and the rotation itself.

    Not an nn.Module on purpose: the tables must stay float32 when the model is cast to bf16, so they are
    plain attributes, built once on the CPU and moved to the activations' device on first use.
    """

    def __init__(self, args: ModelArgs):
        self.inv_freq = llama3_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)  # (d/2,) float64
        positions = torch.arange(args.max_seq_len, dtype=torch.float64)
        angles = torch.outer(positions, self.inv_freq)  # (max_seq_len, d/2): p * w'_i
        self.cos = angles.cos().float()
        self.sin = angles.sin().float()

    def tables(self, start_pos: int, seqlen: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions start_pos .. start_pos + seqlen - 1: each (seqlen, d/2) float32."""
        if self.cos.device != torch.device(device):
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self.cos[start_pos:start_pos + seqlen], self.sin[start_pos:start_pos + seqlen]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x by the angles whose cos/sin are given.

    x: (bs, seqlen, n_heads, head_dim); cos, sin: (seqlen, head_dim/2). Returns x's shape and dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (bs, seqlen, n_heads, d/2, 2), e.g. (1, 7, 32, 64, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (seqlen, 1, d/2): broadcast over heads
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
