"""Grouped-query attention (GQA) with rotary positions and a KV cache.

    q = x W_Q,  k = x W_K,  v = x W_V                    (then RoPE rotates q and k by their positions)
    scores = q k^T / sqrt(head_dim) + causal mask         (a query never sees a later position)
    out    = softmax(scores, in float32) v,   then  W_O

Llama 3.1 8B has 32 query heads but only 8 key/value heads (Ainslie et al. 2023, "GQA"): each kv head serves
n_rep = 4 query heads, which cuts the KV cache, and the memory read per decoded token, by 4. Query head h
reads kv head h // n_rep (HF's repeat_kv groups them the same way).

``reference_attention`` writes that formula out, the definition. The forward pass computes the same thing two
faster ways, tested against it:

  * several new tokens (a prompt, or a chunk of one): PyTorch's fused ``scaled_dot_product_attention``. With
    enable_gqa it reads kv head h // n_rep without copying k and v n_rep times, accumulates in float32, and
    never materialises the (seqlen x T) score matrix, which is what lets a 128K-token prompt fit in memory.
  * one new token (decoding): the formula for a single query, with the n_rep query heads of a group stacked
    as the rows of one small matrix product against their shared keys (``decode_attention``). For one query,
    the fused kernel's fixed costs dominate, and this is several times faster.
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
        self.head_dim = args.head_dim  # 128 for 8B
        # The heads this process computes: all of them (32 query, 8 kv for 8B), or its share when the model is
        # split over model-parallel ranks (llama31/parallel.py answers that).
        self.n_heads, self.n_kv_heads = layers.local_heads(args.n_heads, args.n_kv_heads)
        self.wq = layers.column(args.dim, args.n_heads * args.head_dim, dtype=dtype, device=device)  # W_Q
        self.wk = layers.kv(args.dim, args.n_kv_heads, args.head_dim, dtype=dtype, device=device)  # W_K
        self.wv = layers.kv(args.dim, args.n_kv_heads, args.head_dim, dtype=dtype, device=device)  # W_V
        self.wo = layers.row(args.n_heads * args.head_dim, args.dim, dtype=dtype, device=device)  # W_O
        self.cache: KVCache | None = None  # set by Transformer.setup_cache
        # the formula for one new token (below); CPU decoding may give a layer a fused kernel of it instead
        # (llama31/cpu/attention.py)
        self.decode_attention = decode_attention

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """x: (bs, seqlen, dim) at positions start_pos ..; cos, sin: (seqlen, head_dim/2); mask: (seqlen,
        start_pos + seqlen) bool, True where a query may look, or None (see Transformer.forward).
        Returns (bs, seqlen, dim)."""
        bs, seqlen, _ = x.shape  # e.g. (1, 7, 4096)
        q = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)  # (bs, seqlen, n_heads, hd), (1, 7, 32, 128)
        k = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)  # (1, 7, 8, 128)
        v = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)  # (1, 7, 8, 128)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (bs, heads, seqlen, hd)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (bs, n_kv_heads, T, hd), T = start_pos + seqlen
        elif start_pos != 0:
            raise ValueError(f"start_pos is {start_pos} but the model has no KV cache to hold earlier positions; "
                             "call model.setup_cache(...) first")

        if seqlen == 1:
            out = self.decode_attention(q, k, v)
        else:  # from position 0 the mask is SDPA's own lower triangle (is_causal), faster than a mask tensor
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        # out: (bs, n_heads, seqlen, hd)
        out = out.transpose(1, 2).reshape(bs, seqlen, self.n_heads * self.head_dim)  # (1, 7, 4096)
        return self.wo(out)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim) + causal mask) v, written out: the definition the fast paths are held to.

    q: (bs, n_heads, seqlen, head_dim), the queries of the last seqlen positions; k, v: (bs, n_kv_heads, T,
    head_dim), every position so far (T >= seqlen). Returns (bs, n_heads, seqlen, head_dim).
    """
    seqlen, T, head_dim = q.shape[2], k.shape[2], q.shape[3]
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # (bs, n_heads, T, hd): query head h reads kv head h // n_rep
    v = v.repeat_interleave(n_rep, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)  # (bs, n_heads, seqlen, T)
    scores = scores.masked_fill(~causal_mask(seqlen, T - seqlen, q.device), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)  # each row sums to 1 over the positions it sees
    return probs @ v  # (bs, n_heads, seqlen, hd)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The formula for one new token, which sees every cached position (no mask to apply).

    q: (bs, n_heads, 1, head_dim); k, v: (bs, n_kv_heads, T, head_dim). Returns (bs, n_heads, 1, head_dim).
    """
    bs, n_heads, _, head_dim = q.shape
    n_kv_heads = k.shape[1]
    q = q.view(bs, n_kv_heads, n_heads // n_kv_heads, head_dim)  # (bs, n_kv_heads, n_rep, hd): a group as rows
    # q k^T written as (k q^T)^T: the same dot products, but the keys (a view into the cache) stay the left
    # operand, which CPU matmul kernels stream about 3x faster than a transposed right one at long contexts
    scores = (k @ q.transpose(-2, -1)).transpose(-2, -1) / math.sqrt(head_dim)  # (bs, n_kv_heads, n_rep, T)
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return (probs @ v).view(bs, n_heads, 1, head_dim)


def causal_mask(seqlen: int, start_pos: int, device=None) -> torch.Tensor:
    """(seqlen, start_pos + seqlen) bool, True where a query may look: the query at position start_pos + i sees
    keys 0 .. start_pos + i."""
    return torch.ones(seqlen, start_pos + seqlen, dtype=torch.bool, device=device).tril(start_pos)
