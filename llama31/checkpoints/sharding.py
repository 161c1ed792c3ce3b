"""How a model-parallel rank's slice of each parameter is cut: the split Meta's files use, and llama31's
ParallelLayers expect (fairscale's layers split their weights this way):

    column-parallel (output rows split):  wq, wk, wv, w1, w3, output    -> dim 0
    row-parallel (input columns split):   wo, w2                         -> dim 1
    vocab-parallel embedding:             tok_embeddings                 -> dim 0 (Llama 2 split dim 1)
    norms:                                replicated in every rank       -> None

Rank r of N holds the r-th of N equal parts along that dimension, with one exception: when there are more
ranks than key/value heads (8 kv heads on 16 ranks), wk and wv cannot be split further without cutting a
head in two. Then each rank holds the one kv head its query heads use: kv head j on ranks
j * N/n_kv_heads .. (j + 1) * N/n_kv_heads - 1 (Attention builds wk/wv with N kv heads to match).
"""

from __future__ import annotations


def shard_dim(name: str) -> int | None:
    """The dimension along which model-parallel ranks split parameter `name` (None: replicated)."""
    module = name.rsplit(".", 1)[0]
    if module.endswith(("attention.wo", "feed_forward.w2")):
        return 1
    if module.endswith(("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1", "feed_forward.w3")) \
            or module in ("output", "tok_embeddings"):
        return 0
    return None


def is_kv_weight(name: str) -> bool:
    return name.rsplit(".", 1)[0].endswith(("attention.wk", "attention.wv"))


def shard_range(name: str, size: int, rank: int, world_size: int, n_kv_heads: int) -> tuple[int, int]:
    """[start, stop) along shard_dim(name) of the slice that `rank` of `world_size` holds.

    size: the full parameter's extent along that dimension. n_kv_heads: the model's (unrepeated) count.
    """
    if is_kv_weight(name) and world_size > n_kv_heads:
        if world_size % n_kv_heads:
            raise ValueError(f"{world_size} processes cannot share {n_kv_heads} kv heads evenly; use a divisor or "
                             f"a multiple of {n_kv_heads}")
        head_dim = size // n_kv_heads
        head = rank // (world_size // n_kv_heads)  # the kv head this rank's query heads use
        return head * head_dim, (head + 1) * head_dim
    if size % world_size:
        raise ValueError(f"{name}: {size} rows/columns cannot be split evenly over {world_size} processes; "
                         "choose a number of processes that divides it")
    part = size // world_size
    return rank * part, (rank + 1) * part
