"""Round-to-nearest quantization and the reference matmul, checked against float64 numpy computations."""

import numpy as np
import pytest
import torch
from int4_oracle import pack_signed, round_to_bf16

from llama31.quant.linear import int4_linear_reference
from llama31.quant.packing import unpack_int4
from llama31.quant.rtn import quantize_weight, rtn_quantize

STORE = {torch.float32: lambda a: a.astype(np.float32).astype(np.float64), torch.bfloat16: round_to_bf16}


def _near_tie(t: np.ndarray) -> np.ndarray:
    # Where the float64 quotient lies within ~2 fp32 ulps (|t| <= 16) of x.5, the fp32 computation the
    # implementation does (fp32, as compressed-tensors and GPTQ quantize) may round the other way; only there may q
    # differ, by 1.
    # Exact halves are not ambiguous: both sides see the same exact quotient and round half to even.
    distance = np.abs(np.abs(t - np.floor(t)) - 0.5)
    return (distance > 0) & (distance < 4e-6)


def _crafted_weight(n: int, k: int, g: int) -> np.ndarray:
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.02
    w[0, :g] = 0.0  # an all-zero group
    # a group with absmax 7.5 -> scale 1 exactly: ties round half to even, +absmax clips to 7
    w[1, :8] = [7.5, -7.5, 2.5, 3.5, -0.5, 0.5, -2.5, 1.0]
    w[1, 8:g] = 0.25
    return w


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_symmetric_scales_and_integers_equal_the_formula(group_size, dtype):
    n, k = 21, 256
    w = _crafted_weight(n, k, group_size)
    q, scale, zp = rtn_quantize(torch.from_numpy(w).to(torch.float32), group_size, scale_dtype=dtype)
    assert zp is None and q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (n, k // group_size)

    groups = w.astype(np.float64).reshape(n, k // group_size, group_size)
    s = STORE[dtype](np.maximum(np.abs(groups).max(-1) / 7.5, np.finfo(np.float32).eps))  # scale = absmax / 7.5
    np.testing.assert_array_equal(scale.float().numpy().astype(np.float64), s)
    t = groups / s[..., None]
    expected = np.clip(np.rint(t), -8, 7).reshape(n, k)  # np.rint: half to even, like torch.round
    got = q.numpy().astype(np.int64)
    tie = _near_tie(t).reshape(n, k)
    np.testing.assert_array_equal(got[~tie], expected[~tie])
    # With an fp32 scale each group's absmax element sits at +-7.5 up to one ulp: about 1 near-tie per group.
    assert np.abs(got[tie] - expected[tie]).max(initial=0) <= 1 and tie.mean() <= 1 / group_size + 1e-3
    # the crafted rows: the zero group, the half-to-even ties and the clipped +absmax
    assert (got[0, :group_size] == 0).all()
    assert got[1, :8].tolist() == [7, -8, 2, 4, 0, 0, -2, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_asymmetric_scales_zero_points_and_integers_equal_the_formula(dtype):
    n, k, g = 13, 128, 32
    w = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    w[2, :g] = np.abs(w[2, :g]) + 0.5  # a group with no negative value: lo = 0 keeps 0.0 representable
    q, scale, zp = rtn_quantize(torch.from_numpy(w), g, symmetric=False, scale_dtype=dtype)

    groups = w.astype(np.float64).reshape(n, k // g, g)
    lo, hi = np.minimum(groups.min(-1), 0.0), np.maximum(groups.max(-1), 0.0)
    s = STORE[dtype](np.maximum((hi - lo) / 15.0, np.finfo(np.float32).eps))
    np.testing.assert_array_equal(scale.float().numpy().astype(np.float64), s)
    tz = -8.0 - lo / s
    expected_zp = np.clip(np.rint(tz), -8, 7)
    tie_z = _near_tie(tz)
    np.testing.assert_array_equal(zp.numpy()[~tie_z], expected_zp[~tie_z])
    t = groups / s[..., None]
    expected = np.clip(np.rint(t) + zp.numpy()[..., None], -8, 7).reshape(n, k)  # with the zp it chose
    tie = _near_tie(t).reshape(n, k)
    got = q.numpy().astype(np.int64)
    np.testing.assert_array_equal(got[~tie], expected[~tie])
    assert np.abs(got[tie] - expected[tie]).max(initial=0) <= 1
    assert zp[2, 0] == -8  # lo = 0 -> zp = -8: q = -8 means exactly 0.0


def test_quantize_weight_packs_what_rtn_quantize_chose():
    w = torch.randn(19, 96, generator=torch.Generator().manual_seed(2))
    q, scale, zp = rtn_quantize(w, 32, symmetric=False)
    tensors = quantize_weight(w, 32, symmetric=False)
    np.testing.assert_array_equal(tensors["weight_packed"].numpy(), pack_signed(q.numpy()))
    np.testing.assert_array_equal(tensors["weight_zero_point"].numpy(), pack_signed(zp.numpy(), axis=0))
    assert torch.equal(tensors["weight_scale"], scale)
    assert sorted(quantize_weight(w, 32)) == ["weight_packed", "weight_scale"]


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zero_point", [False, True])
def test_reference_matmul_equals_float64_matmul_of_the_dequantized_weight(x_dtype, zero_point):
    n, k, g = 45, 256, 64
    gen = torch.Generator().manual_seed(3)
    tensors = quantize_weight(torch.randn(n, k, generator=gen), g, symmetric=not zero_point)
    x = torch.randn(2, 3, k, generator=gen).to(x_dtype)

    # W in float64 from the integers and scales, by the numpy oracle (not llama31's dequantize)
    q = unpack_int4(tensors["weight_packed"], k).numpy().astype(np.float64)
    zp = (unpack_int4(tensors["weight_zero_point"], n, dim=0).numpy() if zero_point else np.zeros((n, k // g)))
    w64 = (q - np.repeat(zp, g, 1)) * np.repeat(tensors["weight_scale"].numpy().astype(np.float64), g, 1)
    x64 = x.double().numpy()
    expected = x64 @ w64.T

    y = int4_linear_reference(x, **tensors)
    assert y.shape == (2, 3, n) and y.dtype == x_dtype
    # fp32 accumulation over K terms: |error| <= gamma_K * sum|x||w| with gamma_K ~ K * 2**-24 (a rigorous
    # bound); a bf16 output adds one rounding, 2**-8 relative.
    bound = k * 2**-24 * (np.abs(x64) @ np.abs(w64).T)
    if x_dtype == torch.bfloat16:
        bound = bound + 2**-8 * np.abs(expected)
    assert (np.abs(y.double().numpy() - expected) <= bound + 1e-30).all()
