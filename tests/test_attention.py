"""Attention: the written-out formula (reference_attention) against two independent oracles, and both fast paths
of Attention.forward (fused SDPA for several tokens, decode_attention for one) against the formula."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from llama31.config import ModelArgs, RopeScaling
from llama31.model import Transformer
from llama31.model.attention import causal_mask, reference_attention
from llama31.model.rope import apply_rotary

BS, N_HEADS, N_KV_HEADS, HEAD_DIM = 2, 8, 2, 16


def loop_attention(q, k, v):
    """The formula in float64, one (row, head, query) at a time: head h reads kv head h // n_rep, the query at
    position p (the last seqlen of T positions) sees keys 0 .. p."""
    q, k, v = q.double(), k.double(), v.double()
    bs, n_heads, seqlen, head_dim = q.shape
    T, n_rep = k.shape[2], n_heads // k.shape[1]
    out = torch.zeros_like(q)
    for b in range(bs):
        for h in range(n_heads):
            for i in range(seqlen):
                p = T - seqlen + i
                scores = k[b, h // n_rep, :p + 1] @ q[b, h, i] / math.sqrt(head_dim)  # (p + 1,)
                out[b, h, i] = torch.softmax(scores, dim=0) @ v[b, h // n_rep, :p + 1]
    return out


@pytest.mark.parametrize("seqlen, T", [(7, 7), (3, 10), (1, 9)], ids=["prompt", "chunk", "one-token"])
def test_reference_attention_is_the_formula(seqlen, T):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(BS, N_HEADS, seqlen, HEAD_DIM, generator=g)
    k, v = (torch.randn(BS, N_KV_HEADS, T, HEAD_DIM, generator=g) for _ in range(2))
    ours = reference_attention(q, k, v)
    # float32 arithmetic against the float64 loop: softmax over <= 10 positions of O(1) scores, ~1e-7 relative
    torch.testing.assert_close(ours.double(), loop_attention(q, k, v), rtol=0, atol=2e-6)

    # HF's eager attention, given an additive causal mask built here (-inf above the diagonal, shifted by T - seqlen)
    mask = torch.full((seqlen, T), float("-inf")).triu(T - seqlen + 1)[None, None]

    class GQA(torch.nn.Module):
        num_key_value_groups = N_HEADS // N_KV_HEADS

    hf, _ = eager_attention_forward(GQA(), q, k, v, mask, scaling=HEAD_DIM ** -0.5)
    torch.testing.assert_close(ours, hf.transpose(1, 2), rtol=0, atol=2e-6)  # the same float32 formula


def test_fused_and_decode_paths_equal_the_formula():
    """One attention layer, fed 12 positions as a prompt (SDPA, is_causal), as a prompt then a chunk at
    start_pos 5 (SDPA with a mask), and one token at a time (decode_attention): each equals the projections,
    RoPE and reference_attention composed here."""
    args = ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=2, vocab_size=32, hidden_dim=96, max_seq_len=64,
                     rope_scaling=RopeScaling(original_max_position_embeddings=16))
    torch.manual_seed(0)
    model = Transformer(args)
    attn = model.layers[0].attention
    seqlen = 12
    x = torch.randn(BS, seqlen, args.dim)
    cos, sin = model.rope.tables(0, seqlen, "cpu")

    with torch.no_grad():
        q = apply_rotary(attn.wq(x).view(BS, seqlen, 8, 8), cos, sin).transpose(1, 2)
        k = apply_rotary(attn.wk(x).view(BS, seqlen, 2, 8), cos, sin).transpose(1, 2)
        v = attn.wv(x).view(BS, seqlen, 2, 8).transpose(1, 2)
        expected = attn.wo(reference_attention(q, k, v).transpose(1, 2).reshape(BS, seqlen, 64))

        def run(splits):
            model.setup_cache(BS, seqlen)
            outs, start = [], 0
            for n in splits:
                mask = causal_mask(n, start, "cpu") if n > 1 and start > 0 else None  # as Transformer.forward
                outs.append(attn(x[:, start:start + n], start, cos[start:start + n], sin[start:start + n], mask))
                start += n
            model.clear_cache()
            return torch.cat(outs, dim=1)

        # float32 kernels summing in other orders: ~1e-7 relative on O(1) outputs
        for splits in ([seqlen], [5, 7], [1] * seqlen):
            torch.testing.assert_close(run(splits), expected, rtol=0, atol=1e-5, msg=f"splits {splits}")
