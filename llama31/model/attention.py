"""Grouped-query attention (GQA) with rotary positions and a KV cache.

Llama 3.1 8B has 32 query heads but only 8 key/value heads: each kv head serves n_rep = 4 query heads, which
cuts the KV cache (and its memory traffic) by 4. Head h uses kv head h // n_rep, the same grouping as HF's
repeat_kv. Instead of copying k and v n_rep times, the n_rep query heads of a group are stacked as extra rows
of one matrix product against their shared keys.

    scores = q k^T / sqrt(head_dim)         + causal mask (a query never sees later positions)
    out    = softmax(scores, in float32) v
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llama31.config import ModelArgs
from llama31.model.kv_cache import KVCache
from llama31.model.layers import Layers
from llama31.model.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layers: Layers, *, dtype: torch.dtype, device=None):
        super().__init__()
        mp = layers.model_parallel_size
        # With the model split over mp ranks, each holds n_heads / mp query heads and the kv heads they use. With
        # more ranks than kv heads (70B on 16 ranks), each kv head is repeated on mp / n_kv_heads ranks: wk and
        # wv are built as if the model had mp kv heads, one per rank (each rank loads the kv head it uses).
        n_kv_heads = max(args.n_kv_heads, mp)
        if args.n_heads % mp or n_kv_heads % min(args.n_kv_heads, mp):
            raise ValueError(f"the model-parallel size {mp} must divide n_heads {args.n_heads} and divide or be a "
                             f"multiple of n_kv_heads {args.n_kv_heads}")
        self.n_heads = args.n_heads // mp  # query heads held by this rank
        self.n_kv_heads = n_kv_heads // mp
        self.n_rep = self.n_heads // self.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = layers.column(args.dim, args.n_heads * args.head_dim, dtype=dtype, device=device)
        self.wk = layers.column(args.dim, n_kv_heads * args.head_dim, dtype=dtype, device=device)
        self.wv = layers.column(args.dim, n_kv_heads * args.head_dim, dtype=dtype, device=device)
        self.wo = layers.row(args.n_heads * args.head_dim, args.dim, dtype=dtype, device=device)
        self.cache: KVCache | None = None  # set by Transformer.setup_cache

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: (bs, seqlen, dim) at positions start_pos ..; cos, sin: (seqlen, head_dim/2);
        mask: (seqlen, start_pos + seqlen) bool, True where a query must not look, or None. -> (bs, seqlen, dim)."""
        bs, seqlen, _ = x.shape
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bs, heads, seqlen, head_dim)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (bs, n_kv_heads, start_pos + seqlen, head_dim)
        elif start_pos != 0:
            raise ValueError(f"start_pos is {start_pos} but the model has no KV cache to hold earlier positions; "
                             "call model.setup_cache(...) first")

        # GQA: the n_rep query heads of one group become n_rep * seqlen rows against the group's keys
        q = q.reshape(bs, self.n_kv_heads, self.n_rep * seqlen, self.head_dim)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (bs, n_kv_heads, n_rep * seqlen, T)
        if mask is not None:
            scores = scores.view(bs, self.n_kv_heads, self.n_rep, seqlen, -1).masked_fill(mask, float("-inf"))
            scores = scores.flatten(2, 3)
        probs = torch.softmax(scores.float(), dim=-1).type_as(q)
        out = probs @ v  # (bs, n_kv_heads, n_rep * seqlen, head_dim)

        out = out.view(bs, self.n_heads, seqlen, self.head_dim).transpose(1, 2)  # (bs, seqlen, n_heads, head_dim)
        return self.wo(out.reshape(bs, seqlen, self.n_heads * self.head_dim))


def causal_mask(seqlen: int, start_pos: int, device) -> torch.Tensor | None:
    """(seqlen, start_pos + seqlen) bool, True above the diagonal: the query at position start_pos + i sees keys
    0 .. start_pos + i. None for a single new token, which may see everything cached."""
    if seqlen == 1:
        return None
    return torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=device).triu(start_pos + 1)
