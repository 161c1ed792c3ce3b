"""Int4Linear: its state dict is the compressed-tensors one, the backend is chosen or forced, and the CPU
fused path (torch's int4 op) agrees with the reference path."""

import pytest
import torch
from torch.nn import Linear

from llama31.model.layers import Layers
from llama31.quant import Int4Layers, Int4Linear, cpu_fused, quantize_weight
from llama31.quant.packing import dequantize

needs_cpu_op = pytest.mark.skipif(not cpu_fused.is_available(128),
                                  reason=f"torch {torch.__version__} has no _weight_int4pack_mm_for_cpu")


def _layer(n, k, g, *, seed=0, dtype=torch.bfloat16, zero_point=False, backend=None):
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02
    return Int4Linear.from_float(weight, g, zero_point=zero_point, dtype=dtype, backend=backend)


def test_state_dict_holds_the_compressed_tensors_names_and_shapes():
    layer = Int4Linear(256, 20, group_size=64, dtype=torch.float16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in layer.state_dict().items()} == {
        "weight_packed": ((20, 32), torch.int32), "weight_scale": ((20, 4), torch.float16)}
    layer = Int4Linear(256, 20, group_size=64, zero_point=True, act_order=True, dtype=torch.float16)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
        "weight_packed": (20, 32), "weight_scale": (20, 4), "weight_zero_point": (3, 4), "input_perm": (256,)}


def test_group_size_that_does_not_divide_k_is_refused_with_a_remedy():
    with pytest.raises(ValueError, match="K=96 is not a multiple of group_size 64"):
        Int4Linear(96, 8, group_size=64)
    with pytest.raises(ValueError, match="multiple of 8"):
        Int4Linear(96, 8, group_size=12)


@needs_cpu_op
def test_backend_is_picked_automatically_and_can_be_forced(monkeypatch):
    layer = _layer(32, 64, 32)
    assert layer.resolve_backend(torch.device("cpu")) == "cpu_fused"
    monkeypatch.setattr(Int4Linear, "backend", "reference")  # the class-wide switch
    assert layer.resolve_backend(torch.device("cpu")) == "reference"
    own = _layer(32, 64, 32, backend="cpu_fused")  # a layer's own choice wins over the class default
    assert own.resolve_backend(torch.device("cpu")) == "cpu_fused"
    with pytest.raises(ValueError, match="input is on cpu"):
        _layer(32, 64, 32, backend="cuda")(torch.randn(1, 64))
    with pytest.raises(ValueError, match="must be one of"):
        _layer(32, 64, 32, backend="triton")


@needs_cpu_op
def test_cpu_repack_follows_load_state_dict():
    layer = _layer(32, 64, 32, backend="cpu_fused")
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    first = layer(x)
    other = _layer(32, 64, 32, seed=1)
    layer.load_state_dict(other.state_dict())  # in-place copy: the lazily repacked weights must follow
    other.backend = "cpu_fused"
    assert torch.equal(layer(x), other(x))
    assert not torch.equal(first, layer(x))


def _mean_relative_error(y, ref):
    return ((y.double() - ref).abs().mean() / ref.abs().mean()).item()


# N = 14336 / 4096 and K = 4096 / 14336: the 8B FFN shapes (K = 14336 also gives a ragged last block of
# rebuilt rows); (200, 4160, 64): N not a multiple of 16 (padded), K not a multiple of 128. Few big shapes:
# each reference weight is 235 MB of fp32.
@needs_cpu_op
@pytest.mark.parametrize("route", ["default", "op", "blocks"])
@pytest.mark.parametrize("n, k, g, zero_point", [(14336, 4096, 128, False), (4096, 14336, 128, False),
                                                 (200, 4160, 64, True), (48, 256, 32, False)])
def test_cpu_fused_path_agrees_with_the_reference(n, k, g, zero_point, route, monkeypatch):
    # "op": torch's fused op for every row count; "blocks": dequantize-then-matmul for every row count;
    # "default": the op below DEQUANTIZE_MIN_ROWS (96) rows, blocks from there on (M = 100 below).
    if route != "default":
        monkeypatch.setattr(cpu_fused, "DEQUANTIZE_MIN_ROWS", 1 if route == "blocks" else 10**9)
    layer = _layer(n, k, g, zero_point=zero_point, dtype=torch.bfloat16, backend="cpu_fused")
    w = dequantize(layer.weight_packed, layer.weight_scale, layer.weight_zero_point)  # exact math, fp32
    x = torch.randn(100, k, generator=torch.Generator().manual_seed(1))
    # The reference as one fp32 matmul per input dtype (rows are independent): its rounding, ~1e-6
    # relative, is far below the tolerance, and it keeps the big shapes fast.
    refs = {torch.float32: x @ w.T, torch.bfloat16: x.bfloat16().float() @ w.T}
    magnitude = x.abs() @ w.abs().T  # sum_k |x_k w_k| for each output: what rounding errors scale with
    for m in (1, 2, 7, 16, 33, 100):
        for x_m in (x[:m], x[:m].bfloat16()):
            ref = refs[x_m.dtype][:m].double()
            y = layer(x_m)
            assert y.dtype == x_m.dtype and y.shape == (m, n)
            # Every output on its own: at most three bf16 roundings (activations, rebuilt weights or the op's
            # own, output), each within 2**-9 of sum_k |x_k w_k|, plus fp32 accumulation (K 2**-24 of it, under
            # 2**-9 here). A wrong output column or block edge breaks this even where the mean below would not.
            worst = ((y.double() - ref).abs() / magnitude[:m]).max().item()
            assert worst <= 2**-7, f"M={m} {x_m.dtype}: error {worst:.2e} of sum |x w|"
            # bf16 activations (the path casts fp32 ones) carry a relative rounding of 2**-9 per value, the
            # weights rebuilt in bf16 by the block route another, the bf16 output another: a mean relative
            # error of a few 1e-3. 1e-2 leaves room for that and fails on any layout mistake (a wrong nibble
            # order, scale index or block boundary gives O(1) errors).
            err = _mean_relative_error(y, ref)
            assert err <= 1e-2, f"M={m} {x_m.dtype}: mean relative error {err:.2e}"


@needs_cpu_op
@pytest.mark.parametrize("n, k, g, zero_point, block_rows", [(200, 4160, 64, True, 7), (48, 256, 32, False, 48),
                                                             (37, 512, 128, True, 10)])
def test_cpu_block_rebuild_is_the_canonical_dequantization_in_bf16(n, k, g, zero_point, block_rows):
    # Bit for bit: (q - zp) is a small integer and the scale a bf16 number, so their product is rounded to
    # bf16 once, whichever way it is computed; any difference is a wrong nibble, group, row or block edge.
    layer = _layer(n, k, g, zero_point=zero_point, dtype=torch.float32)
    weight = cpu_fused.repack(layer.weight_packed, layer.weight_scale, layer.weight_zero_point, g)
    expected = dequantize(layer.weight_packed, layer.weight_scale.bfloat16(), layer.weight_zero_point,
                          dtype=torch.bfloat16)
    out = torch.full((block_rows, k), float("nan"), dtype=torch.bfloat16)  # every element must be written
    pairs, high = torch.empty(block_rows, k // 2, dtype=torch.int16), torch.empty(block_rows, k // 2, dtype=torch.int16)
    for start in range(0, n, block_rows):
        rows = min(block_rows, n - start)
        got = cpu_fused._dequantize_rows(weight, start, out[:rows], pairs[:rows], high[:rows])
        assert torch.equal(got, expected[start:start + rows]), f"rows {start}..{start + rows - 1}"


def test_reference_path_with_act_order_permutes_the_input():
    layer = Int4Linear(64, 16, group_size=32, act_order=True, dtype=torch.float32, backend="reference")
    tensors = quantize_weight(torch.randn(16, 64), 32)
    tensors["input_perm"] = torch.randperm(64)
    layer.load_state_dict(tensors)
    x = torch.randn(3, 64, dtype=torch.float64)
    w = layer.dequantized_weight().double()  # W in the original input order
    assert torch.allclose(layer(x.float()).double(), x @ w.T, rtol=0, atol=1e-5)


def test_int4_layers_build_int4_projections_and_keep_embeddings_and_output():
    layers = Int4Layers(group_size=32, zero_point=True)
    kwargs = dict(dtype=torch.bfloat16, device="cpu")
    column, row = layers.column(64, 96, **kwargs), layers.row(96, 64, **kwargs)
    assert isinstance(column, Int4Linear) and isinstance(row, Int4Linear)
    assert (column.in_features, column.out_features, column.group_size) == (64, 96, 32)
    assert column.weight_zero_point is not None
    assert type(layers.embedding(100, 64, **kwargs)) is type(Layers().embedding(100, 64, **kwargs))
    assert type(layers.output(64, 100, **kwargs)) is Linear
    assert isinstance(Int4Layers(32, quantize_output=True).output(64, 100, **kwargs), Int4Linear)
