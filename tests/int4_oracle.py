"""Independent numpy oracles for the INT4 tests, written from the format descriptions
(compressed-tensors pack-quantized; AutoGPTQ's qweight / qzeros / scales / g_idx),
not from llama31.quant: plain loops over words and nibbles, float64 arithmetic.
"""

from __future__ import annotations

import numpy as np


def pack_words(values: np.ndarray, axis: int) -> np.ndarray:
    """Unsigned nibbles (0..15) -> int32 words along ``axis``: nibble i of word j = element 8j + i, LSB first.

    The packed axis is padded with ``pad`` nibbles up to a multiple of 8 by the caller's choice (see below).
    """
    values = np.moveaxis(np.asarray(values, dtype=np.int64), axis, -1)
    rows, length = values.reshape(-1, values.shape[-1]).shape[0], values.shape[-1]
    flat = values.reshape(rows, length)
    n_words = (length + 7) // 8
    words = np.zeros((rows, n_words), dtype=np.uint32)
    for r in range(rows):
        for j in range(n_words):
            word = 0
            for i in range(8):
                k = 8 * j + i
                nibble = int(flat[r, k]) if k < length else 0
                assert 0 <= nibble <= 15
                word |= nibble << (4 * i)
            words[r, j] = word
    words = words.view(np.int32).reshape(values.shape[:-1] + (n_words,))
    return np.moveaxis(words, -1, axis)


def pack_signed(q: np.ndarray, axis: int = -1) -> np.ndarray:
    """compressed-tensors packing: signed q in [-8, 7] stored as q + 8; padding holds q = 0 (nibble 8)."""
    q = np.moveaxis(np.asarray(q, dtype=np.int64), axis, -1)
    pad = -q.shape[-1] % 8
    if pad:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (pad,), dtype=np.int64)], axis=-1)
    return np.moveaxis(pack_words(q + 8, axis=-1), -1, axis)


def unpack_words(words: np.ndarray, length: int, axis: int) -> np.ndarray:
    """int32 words -> unsigned nibbles (0..15) along ``axis`` (the inverse of pack_words, loops again)."""
    words = np.moveaxis(np.asarray(words), axis, -1).view(np.uint32)
    out = np.zeros(words.shape[:-1] + (length,), dtype=np.int64)
    for k in range(length):
        out[..., k] = (words[..., k // 8] >> np.uint32(4 * (k % 8))) & np.uint32(0xF)
    return np.moveaxis(out, -1, axis)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 value (round half to even), returned as float64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = ((bits + np.uint64(0x7FFF) + lsb) >> np.uint64(16)) << np.uint64(16)
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def act_order_g_idx(k: int, group_size: int, rng: np.random.Generator) -> np.ndarray:
    """A GPTQ desc_act g_idx: columns visited in a random order, each group gets exactly group_size of them."""
    order = rng.permutation(k)
    g_idx = np.empty(k, dtype=np.int32)
    g_idx[order] = np.arange(k) // group_size
    return g_idx
