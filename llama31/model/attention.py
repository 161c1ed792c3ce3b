"""Grouped-query attention (GQA) with rotary positions and a KV cache.

Llama 3.1 8B has 32 query heads but only 8 key/value heads: each kv head serves n_rep = 4 query heads, which
cuts the KV cache (and its memory traffic) by 4. Head h uses kv head h // n_rep, the same grouping as HF's
repeat_kv.

    scores = q k^T / sqrt(head_dim)         + causal mask (a query never sees later positions)
    out    = softmax(scores, in float32) v

Two ways to compute it, chosen by what is fastest (both match the formula to float32 rounding, ~1e-7):

  * several new tokens (prefill, or a chunk of one): PyTorch's scaled_dot_product_attention (enable_gqa: head
    h reads kv head h // n_rep without copying k and v n_rep times). On the CPU it is a fused (flash) kernel
    that accumulates in float32 and never materialises the (seqlen x T) score matrix: 5x faster than the
    formula written out at 1024 tokens, and what lets a 128K-token prompt be prefilled in chunks.
  * one new token (decoding): the formula written out, the n_rep query heads of a group stacked as the rows of
    one small matrix product against their shared cached keys. Here the fused kernel is up to 20x slower in
    bf16 on a CPU (16 ms against 0.8 ms at 4096 cached positions, one thread).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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
        self.head_dim = args.head_dim
        self.wq = layers.column(args.dim, args.n_heads * args.head_dim, dtype=dtype, device=device)
        self.wk = layers.column(args.dim, n_kv_heads * args.head_dim, dtype=dtype, device=device)
        self.wv = layers.column(args.dim, n_kv_heads * args.head_dim, dtype=dtype, device=device)
        self.wo = layers.row(args.n_heads * args.head_dim, args.dim, dtype=dtype, device=device)
        self.cache: KVCache | None = None  # set by Transformer.setup_cache

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: (bs, seqlen, dim) at positions start_pos ..; cos, sin: (seqlen, head_dim/2);
        mask: (seqlen, start_pos + seqlen) bool, True where a query may look, or None for the plain causal
        mask (causal_mask). -> (bs, seqlen, dim)."""
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

        if seqlen == 1:
            out = decode_attention(q, k, v)
        else:  # softmax(q k^T / sqrt(head_dim) + mask) v, each query head against its group's kv head
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        # out: (bs, n_heads, seqlen, head_dim)

        out = out.transpose(1, 2).reshape(bs, seqlen, self.n_heads * self.head_dim)  # (bs, seqlen, n_heads * hd)
        return self.wo(out)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v for one new token, which may see every cached position (no mask).

    q: (bs, n_heads, 1, head_dim); k, v: (bs, n_kv_heads, T, head_dim). Returns (bs, n_heads, 1, head_dim).
    """
    bs, n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[1]
    q = q.view(bs, n_kv_heads, n_heads // n_kv_heads, head_dim)  # the n_rep query heads of each group as rows
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # (bs, n_kv_heads, n_rep, T)
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return (probs @ v).view(bs, n_heads, 1, head_dim)


def causal_mask(seqlen: int, start_pos: int, device) -> torch.Tensor | None:
    """(seqlen, start_pos + seqlen) bool, True where a query may look: the query at position start_pos + i sees
    keys 0 .. start_pos + i. None where no tensor is needed: a single new token sees everything cached, and
    from position 0 the mask is the plain lower triangle (SDPA's is_causal, 1.5x faster than a tensor mask)."""
    if seqlen == 1 or start_pos == 0:
        return None
    return torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=device).tril(start_pos)
