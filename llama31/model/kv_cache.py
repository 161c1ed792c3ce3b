"""The key/value cache: what attention remembers of the tokens it has already seen.

During generation each new token's query must attend to the keys and values of every earlier position.
Recomputing them costs a full forward pass per token; the cache stores them instead, written once at their
position and read back on every later step. It is allocated once (no per-step allocation), sized to what
the caller asks for (not always to the model's 128K maximum: 8B at 128K tokens is 16 GiB in bf16).

Layout per layer: k and v are (max_batch_size, n_kv_heads, max_seq_len, head_dim), so that the keys of
positions 0 .. T-1 are the contiguous slice [:, :, :T] that attention multiplies with directly.

It is a plain object, not an nn.Module: it is per-request state, not part of the model (not in state dicts,
not moved by model.to: Transformer.setup_cache allocates it where the weights are). That also lets a compiled
decode step (llama31/cpu/compiled.py) take it as an input of any length, where torch.compile treats the tensors of
a module as fixed parts of the graph.
"""

import torch


class KVCache:
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device=None):
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at positions start_pos .. start_pos + seqlen - 1; return all keys/values so far.

        k, v: (bs, n_kv_heads, seqlen, head_dim). Returns two (bs, n_kv_heads, start_pos + seqlen, head_dim) views.
        """
        bs, _, seqlen, _ = k.shape
        end = start_pos + seqlen
        if bs > self.max_batch_size or end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_batch_size} sequences of {self.max_seq_len} positions; "
                             f"got batch {bs} at positions {start_pos}..{end - 1}. "
                             "Call model.setup_cache(max_batch_size, max_seq_len) with larger sizes.")
        self.k[:bs, :, start_pos:end] = k
        self.v[:bs, :, start_pos:end] = v
        return self.k[:bs, :, :end], self.v[:bs, :, :end]
