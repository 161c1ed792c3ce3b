"""The canonical INT4 layout: packing is bit-exact and matches a loop-over-nibbles packer of the format."""

import numpy as np
import pytest
import torch
from int4_oracle import pack_signed, unpack_words

from llama31.quant.packing import dequantize, pack_int4, unpack_int4

# N not a multiple of 8 or 16, K multiples of 8 that are not multiples of 16 / 32 / 128.
SHAPES = [(1, 8), (3, 24), (17, 64), (37, 136), (16, 256)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip_is_bit_exact(shape):
    q = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(q), shape[1]), q)
    # along dim 0 (how zero points are packed), with N padded to a multiple of 8
    assert torch.equal(unpack_int4(pack_int4(q, dim=0), shape[0], dim=0), q)


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_words_equal_the_format_description(shape):
    q = np.random.default_rng(1).integers(-8, 8, shape)
    expected = pack_signed(q, axis=-1)  # int32 [N, K/8], nibble i of word j = column 8j + i, q + 8
    packed = pack_int4(torch.from_numpy(q))
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], shape[1] // 8)
    np.testing.assert_array_equal(packed.numpy(), expected)


@pytest.mark.parametrize("n", [1, 5, 8, 20, 33])
def test_zero_points_pack_along_rows_with_padding(n):
    zp = np.random.default_rng(2).integers(-8, 8, (n, 3))
    expected = pack_signed(zp, axis=0)  # int32 [ceil(N/8), K/g], padding rows hold zp = 0
    packed = pack_int4(torch.from_numpy(zp), dim=0)
    assert packed.shape == ((n + 7) // 8, 3)
    np.testing.assert_array_equal(packed.numpy(), expected)
    # the padding nibbles are 8 (zero), as compressed-tensors writes them
    nibbles = unpack_words(packed.numpy(), 8 * ((n + 7) // 8), axis=0)
    assert (nibbles[n:] == 8).all()


def test_known_words():
    # q = -8..-1 is stored as 0..7, least significant nibble first: 0x76543210.
    assert pack_int4(torch.arange(-8, 0).view(1, 8)).item() == 0x76543210
    # eight zeros are 0x88888888, which is negative as int32 (sign bit set)
    assert pack_int4(torch.zeros(1, 8, dtype=torch.int8)).item() == 0x88888888 - 2**32
    # q = 7 in the top nibble only: 0xF8888888
    q = torch.zeros(1, 8, dtype=torch.int8)
    q[0, 7] = 7
    assert pack_int4(q).item() == 0xF8888888 - 2**32


def test_dequantize_is_q_minus_zero_point_times_scale():
    rng = np.random.default_rng(3)
    n, k, g = 11, 64, 32
    q = rng.integers(-8, 8, (n, k))
    zp = rng.integers(-8, 8, (n, k // g))
    scale = rng.uniform(0.01, 0.1, (n, k // g)).astype(np.float32)
    expected = (q - np.repeat(zp, g, axis=1)) * np.repeat(scale.astype(np.float64), g, axis=1)
    w = dequantize(torch.from_numpy(pack_signed(q)), torch.from_numpy(scale),
                   torch.from_numpy(pack_signed(zp, axis=0)))
    # (q - zp) is a small integer, so the only error is one fp32 rounding of the product
    np.testing.assert_allclose(w.numpy(), expected, rtol=2**-24, atol=0)
    w_sym = dequantize(torch.from_numpy(pack_signed(q)), torch.from_numpy(scale))
    np.testing.assert_allclose(w_sym.numpy(), q * np.repeat(scale.astype(np.float64), g, axis=1), rtol=2**-24, atol=0)


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(TypeError, match="int32"):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="weight_scale"):
        dequantize(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 3))  # K = 64 is not a multiple of 3 groups
