"""The Llama 3.1 decoder: token ids in, float32 logits out.

    h = tok_embeddings(tokens)                          (bs, seqlen, dim), e.g. (1, 7, 4096)
    for each of n_layers blocks (pre-norm residual):
        h = h + Attention(RMSNorm(h))
        h = h + FeedForward(RMSNorm(h))
    logits = output(RMSNorm(h))                         (bs, seqlen, vocab_size), e.g. (1, 7, 128256), float32

KV-cache API (for generation):
    model.setup_cache(max_batch_size, max_seq_len)    allocate the cache once, in the model's dtype and device
    model(tokens, start_pos=0)                         prefill: positions 0 .. n-1 are written to the cache
    model(next_tokens, start_pos=n)                    decode: (bs, 1) tokens at position n see all n cached ones
    model.clear_cache()                                free it; without a cache, model(tokens) is a plain forward
A row of the batch may be shorter than the cache's batch: row i of tokens uses row i of the cache.
"""

from __future__ import annotations

import torch
from torch import nn

from llama31.config import MAX_SIZE, ModelArgs
from llama31.errors import InputError, InputTypeError, check_int
from llama31.model.attention import Attention, causal_mask
from llama31.model.feedforward import FeedForward
from llama31.model.kv_cache import KVCache
from llama31.model.layers import Layers
from llama31.model.norm import RMSNorm
from llama31.model.rope import RotaryEmbedding


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layers: Layers, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, dtype=dtype, device=device)
        self.attention = Attention(args, layers, dtype=dtype, device=device)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype=dtype, device=device)
        self.feed_forward = FeedForward(args, layers, dtype=dtype, device=device)

    def forward(self, x, start_pos, cos, sin, mask):
        """x: (bs, seqlen, dim) -> (bs, seqlen, dim)."""
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, *, dtype: torch.dtype = torch.float32, device=None,
                 layers: Layers | None = None):
        """Build a randomly initialised decoder; load weights with Transformer.from_pretrained or load_state_dict.

        dtype, device: of every weight (the RoPE tables stay float32). layers: how projections are built
        (plain by default; llama31.quant.Int4Layers or llama31.parallel.ParallelLayers).
        """
        super().__init__()
        layers = layers or Layers()
        self.args = args
        self.tok_embeddings = layers.embedding(args.vocab_size, args.dim, dtype=dtype, device=device)
        self.layers = nn.ModuleList(
            TransformerBlock(args, layers, dtype=dtype, device=device) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype=dtype, device=device)
        self.output = layers.output(args.dim, args.vocab_size, dtype=dtype, device=device)
        if args.tie_word_embeddings:  # 3.2 1B/3B: the output projection is the embedding matrix
            if not isinstance(getattr(self.output, "weight", None), nn.Parameter):  # e.g. an INT4 output layer
                raise ValueError(f"tie_word_embeddings is true, but the output layer ({type(self.output).__name__}) "
                                 "has no float weight to share with the embedding; build the model with "
                                 "tie_word_embeddings=False (llama31.quant.quantize_model unties a tied model)")
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(args)

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device=None, **kwargs) -> "Transformer":
        """Load a Meta folder (params.json + consolidated.NN.pth) or an HF folder (config.json + safetensors).

        dtype: of the weights (None: float32 for float checkpoints). The format found is reported in
        ``model.checkpoint_info``. On the CPU the large linear layers then get a faster kernel for decoding
        (llama31/cpu/defaults.py; pack=False keeps nn.Linear). See llama31.checkpoints.load_pretrained for the
        other arguments. Started by torchrun with several processes, the model is split over them
        (llama31/parallel.py) and each process loads only its slice.
        """
        from llama31.checkpoints import load_pretrained  # the model core depends on no loader at import time

        return load_pretrained(path, dtype=dtype, device=device, model_class=cls, **kwargs)

    # ------------------------------------------------------------------ KV cache
    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None) -> None:
        """Allocate a KV cache for up to max_batch_size sequences of max_seq_len positions (default: the
        model's whole context, args.max_seq_len; ask for less, it costs memory)."""
        max_seq_len = self.args.max_seq_len if max_seq_len is None else max_seq_len
        check_int(max_batch_size, "max_batch_size", "Transformer.setup_cache", minimum=1, maximum=MAX_SIZE)
        check_int(max_seq_len, "max_seq_len", "Transformer.setup_cache", minimum=1, maximum=self.args.max_seq_len)
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim,
                                 dtype=weight.dtype, device=weight.device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, *, last_only: bool = False) -> torch.Tensor:
        """tokens: (bs, seqlen) int64 at positions start_pos .. start_pos + seqlen - 1.

        Returns float32 logits (bs, seqlen, vocab_size), or (bs, 1, vocab_size) for the last position only
        when last_only (generation needs no more, and the vocab projection is the largest matmul of a prefill).
        """
        if not torch.compiler.is_compiling():  # compiled decode steps get their ids from the sampler
            self._check_tokens(tokens, start_pos)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seqlen), got shape {tuple(tokens.shape)}")
        bs, seqlen = tokens.shape
        if start_pos + seqlen > self.args.max_seq_len:
            raise ValueError(f"positions {start_pos}..{start_pos + seqlen - 1} exceed the model's context of "
                             f"{self.args.max_seq_len} tokens")

        h = self.tok_embeddings(tokens)  # (bs, seqlen, dim)
        cos, sin = self.rope.tables(start_pos, seqlen, h.device)  # (seqlen, head_dim/2) each
        # Which positions each new query may see. No tensor where none is needed: one new token sees everything
        # cached, and from position 0 attention applies the plain lower triangle itself.
        mask = None if seqlen == 1 or start_pos == 0 else causal_mask(seqlen, start_pos, h.device)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin, mask)
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()  # (bs, seqlen, vocab_size)

    def _check_tokens(self, tokens, start_pos) -> None:
        """Ids outside the vocabulary would fail deep inside the embedding (on a GPU, as a device-side assert)."""
        check_int(start_pos, "start_pos", "Transformer.forward", minimum=0)
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
            raise InputTypeError("Transformer.forward", "tokens", "must be an int64 tensor of token ids, got "
                                 f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.numel() and tokens.device.type != "meta" and ((tokens < 0) | (tokens >= self.args.vocab_size)).any():
            raise InputError("Transformer.forward", "tokens", f"hold ids outside 0..{self.args.vocab_size - 1}")
