"""Meta <-> Hugging Face parameter names, and the q/k row permutation between their RoPE conventions.

    Meta (llama31's own names)              HF
    tok_embeddings.weight                   model.embed_tokens.weight
    layers.{i}.attention.wq/wk/wv/wo        model.layers.{i}.self_attn.q_proj/k_proj/v_proj/o_proj
    layers.{i}.feed_forward.w1/w3/w2        model.layers.{i}.mlp.gate_proj/up_proj/down_proj
    layers.{i}.attention_norm               model.layers.{i}.input_layernorm
    layers.{i}.ffn_norm                     model.layers.{i}.post_attention_layernorm
    norm                                    model.norm
    output                                  lm_head

Only the module path changes; the last part (``.weight``, or INT4's ``.weight_packed`` / ``.weight_scale``)
is kept, so quantized tensors map the same way.

Why a permutation: Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]) of each head, HF's rotates halves
(x[i], x[i + d/2]). HF's conversion script reorders the output rows of wq and wk so that both give the same
q . k: within each head of size d, Meta row 2i + c (c in {0, 1}) is HF row c * d/2 + i. wv and wo are not
permuted (values are not rotated).
"""

from __future__ import annotations

import re

import torch

_LAYER_PARTS = {  # Meta module path inside a block -> HF module path inside a block
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_PARTS = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}

_HF_LAYER_PARTS = {hf: meta for meta, hf in _LAYER_PARTS.items()}
_HF_TOP_PARTS = {hf: meta for meta, hf in _TOP_PARTS.items()}
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.([A-Za-z_]+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.([A-Za-z_]+)$")


def meta_to_hf(name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'model.layers.3.self_attn.q_proj.weight'. KeyError if unknown."""
    m = _META_LAYER.match(name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    module, _, leaf = name.rpartition(".")
    if module in _TOP_PARTS:
        return f"{_TOP_PARTS[module]}.{leaf}"
    raise KeyError(f"no HF name for parameter {name!r}")


def hf_to_meta(name: str) -> str:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.attention.wq.weight'. KeyError if unknown."""
    m = _HF_LAYER.match(name)
    if m and m.group(2) in _HF_LAYER_PARTS:
        return f"layers.{m.group(1)}.{_HF_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    module, _, leaf = name.rpartition(".")
    if module in _HF_TOP_PARTS:
        return f"{_HF_TOP_PARTS[module]}.{leaf}"
    raise KeyError(f"{name!r} is not a Llama parameter name")


def permuted_heads(meta_name: str, n_heads: int, n_kv_heads: int) -> int | None:
    """How many heads to permute for this parameter: n_heads for wq, n_kv_heads for wk, None otherwise."""
    if ".attention.wq." in meta_name:
        return n_heads
    if ".attention.wk." in meta_name:
        return n_kv_heads
    return None


def meta_rows_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of Meta's wq/wk (n_heads * head_dim, ...) into HF's order.

    Per head, rows (pair i, member c) at 2i + c move to c * d/2 + i. Any trailing shape is carried along,
    so packed INT4 weights and their per-row scales permute the same way.
    """
    rows, rest = w.shape[0], w.shape[1:]
    d = rows // n_heads
    return w.reshape(n_heads, d // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def hf_rows_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of meta_rows_to_hf: HF row c * d/2 + i goes back to 2i + c."""
    rows, rest = w.shape[0], w.shape[1:]
    d = rows // n_heads
    return w.reshape(n_heads, 2, d // 2, *rest).transpose(1, 2).reshape(rows, *rest)
