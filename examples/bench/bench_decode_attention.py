"""How fast one decode step's attention reads the KV cache, against a plain read of the same bytes.

    python examples/bench/bench_decode_attention.py                          the 1B shape, 256 to 4096 positions
    python examples/bench/bench_decode_attention.py --dtype float32 --contexts 4096
    python examples/bench/bench_decode_attention.py --quick                  small sizes, seconds (the tests)

A decode step's attention reads every cached key and value once: 2 x n_kv_heads x T x head_dim elements a layer,
as a view into the cache (KVCache.update returns [:, :, :T] of a longer buffer). For each context T this times,
over one set of caches per layer (16 layers of the Llama 3.2 1B shape: 32 query heads, 8 kv heads, head_dim 64):

    decode_attention   llama31/model/attention.py: scores = (k q^T)^T, the keys the left operand
    q k^T              the same formula with scores = q k^T (a transposed cache view as the right operand)
    kernel             our decode-attention kernel (llama31/cpu/attention.py; where this CPU runs it), what
                       compiled decoding calls
    read               torch.amax over the same keys and values (the bytes alone)

Reported: the median over --reps of a pass over all layers, in ms and GB/s of cache read, and each formula's
fraction of the read.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from llama31.cpu import attention as kernel
from llama31.model.attention import decode_attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_int4_stream import time_against_read  # noqa: E402  (the same alternating loop, beside this file)


def q_kt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """decode_attention with the scores as q @ k^T: what attention.py avoids."""
    bs, n_heads, _, head_dim = q.shape
    q = q.view(bs, k.shape[1], n_heads // k.shape[1], head_dim)
    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    probs = torch.softmax(scores.float(), dim=-1).type_as(q)
    return (probs @ v).view(bs, n_heads, 1, head_dim)


def bench_context(context: int, layers: int, n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  reps: int) -> dict:
    torch.manual_seed(0)
    spare = 64  # the cache is longer than the context, as in generation: k and v are views
    caches = [(torch.randn(1, n_kv_heads, context + spare, head_dim, dtype=dtype),
               torch.randn(1, n_kv_heads, context + spare, head_dim, dtype=dtype)) for _ in range(layers)]
    views = [(k[:, :, :context], v[:, :, :context]) for k, v in caches]
    queries = [torch.randn(1, n_heads, 1, head_dim, dtype=dtype) for _ in range(layers)]
    nbytes = layers * 2 * n_kv_heads * context * head_dim * caches[0][0].element_size()
    calls = {
        "decode_attention": lambda: [decode_attention(q, k, v) for q, (k, v) in zip(queries, views)],
        "q k^T": lambda: [q_kt_attention(q, k, v) for q, (k, v) in zip(queries, views)],
        **({"kernel": lambda: [kernel.decode_attention(q, k, v) for q, (k, v) in zip(queries, views)]}
           if kernel.unsupported() is None else {}),
        "read": lambda: [(k.amax(), v.amax()) for k, v in views],
    }
    return time_against_read(calls, nbytes, reps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="256,1024,4096", help="comma-separated cached positions T")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="2 layers, contexts 64 and 256: seconds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    layers, contexts = (2, [64, 256]) if args.quick else (16, [int(c) for c in args.contexts.split(",")])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, {layers} layers of 32 query heads, "
          "8 kv heads, head_dim 64")
    for context in contexts:
        r = bench_context(context, layers, 32, 8, 64, getattr(torch, args.dtype), args.reps)
        print(f"T {context:6d}  " + "  ".join(
            f"{name} {r[name]['ms']:6.2f} ms {r[name]['GBps']:5.1f} GB/s"
            + (f" ({r[name]['of_read']:.0%})" if name != "read" else "") for name in r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
