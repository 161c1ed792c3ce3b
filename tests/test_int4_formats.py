"""GPTQ and compressed-tensors layers, packed here by the test's own numpy packer from a known integer
matrix, convert to exactly that matrix and those scales; quantization_config parses and round-trips."""

import numpy as np
import pytest
import torch
from int4_oracle import act_order_g_idx, pack_signed, pack_words

from llama31.quant import Int4Linear
from llama31.quant.formats import (
    Int4Settings,
    compressed_tensors_config,
    convert_layer,
    from_compressed_tensors,
    from_gptq,
    parse_quantization_config,
    permute_output_rows,
    to_compressed_tensors,
)
from llama31.quant.packing import unpack_int4

N, K, G = 20, 256, 64  # N not a multiple of 8 or 16; 4 groups


def _known(seed=0, n=N, k=K, g=G):
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, (n, k))  # the signed integers the checkpoint encodes
    scale = rng.uniform(0.005, 0.05, (n, k // g)).astype(np.float16)
    return rng, q, scale


def _expected_weight(q, zp, scale, g_idx):
    """W[n, k] = (q[n, k] - zp[n, g_idx[k]]) * scale[n, g_idx[k]] in float64."""
    return (q - zp[:, g_idx]) * scale.astype(np.float64)[:, g_idx]


def _load(tensors, g, zero_point, act_order):
    n, k = tensors["weight_packed"].shape[0], tensors["weight_packed"].shape[1] * 8
    layer = Int4Linear(k, n, group_size=g, zero_point=zero_point, act_order=act_order, dtype=torch.float32)
    layer.load_state_dict(tensors)  # strict: exactly the Int4Linear keys
    return layer


def _gptq_tensors(q, z, scale, g_idx):
    """A GPTQ layer: qweight [K/8, N] packed along K, qzeros [K/g, N/8] packed along N, scales [K/g, N]."""
    return {"qweight": torch.from_numpy(pack_words(q.T + 8, axis=0)),  # unsigned u = q + 8
            "qzeros": torch.from_numpy(pack_words(z.T, axis=1)),
            "scales": torch.from_numpy(scale.T.copy()),
            "g_idx": torch.from_numpy(g_idx.astype(np.int32))}


def test_gptq_symmetric_act_order_converts_to_the_known_matrix():
    rng, q, scale = _known()
    g_idx = act_order_g_idx(K, G, rng)  # desc_act: not monotonic
    z = np.full((N, K // G), 7)  # v1 symmetric files store z = 7 (0x77777777)
    tensors = _gptq_tensors(q, z, scale, g_idx)
    assert (tensors["qzeros"][:, : N // 8] == 0x77777777).all()  # (the last word is half padding)

    out = from_gptq(tensors)
    assert sorted(out) == ["input_perm", "weight_packed", "weight_scale"]
    perm = out["input_perm"].numpy()
    q_sorted = unpack_int4(out["weight_packed"], K).numpy()
    np.testing.assert_array_equal(q_sorted, q[:, perm])  # the same integers, columns sorted by group
    np.testing.assert_array_equal(g_idx[perm], np.arange(K) // G)  # ... so that groups are contiguous
    np.testing.assert_array_equal(out["weight_scale"].numpy(), scale)  # scales untouched

    layer = _load(out, G, zero_point=False, act_order=True)
    expected = _expected_weight(q, np.zeros_like(z), scale, g_idx)
    # q * fp16 scale is exact in fp32 (4 + 11 significant bits)
    np.testing.assert_array_equal(layer.dequantized_weight().double().numpy(), expected)
    x = torch.randn(3, K, dtype=torch.float64)
    layer.backend = "reference"  # the act-order permutation of the input, with fp32 accumulation
    y = layer(x.float()).double()
    # fp32 accumulation of 256 terms; relative to the size of the terms (see test_int4_quantize)
    bound = K * 2**-24 * (x.abs() @ torch.from_numpy(np.abs(expected)).T).max()
    assert (y - x @ torch.from_numpy(expected).T).abs().max() <= bound


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_asymmetric_converts_to_the_known_matrix(checkpoint_format):
    rng, q, scale = _known(1)
    z = rng.integers(0, 15, (N, K // G))  # v1: zp = z + 1 - 8 must stay <= 7, so z <= 14
    u = q + 8
    g_idx = (np.arange(K) // G).astype(np.int32)  # no act-order
    out = from_gptq(_gptq_tensors(q, z, scale, g_idx), checkpoint_format=checkpoint_format)
    assert "input_perm" not in out
    zero = z + 1 if checkpoint_format == "gptq" else z  # v1 dequantizes with (u - (z + 1)), v2 with (u - z)
    expected = (u - zero[:, g_idx]) * scale.astype(np.float64)[:, g_idx]
    layer = _load(out, G, zero_point=True, act_order=False)
    np.testing.assert_array_equal(layer.dequantized_weight().double().numpy(), expected)


def test_gptq_v1_zero_point_overflow_is_refused():
    _, q, scale = _known(2)
    z = np.full((N, K // G), 7)
    z[3, 1] = 15  # zp = 16 does not fit in 4 bits
    with pytest.raises(ValueError, match="v1"):
        from_gptq(_gptq_tensors(q, z, scale, (np.arange(K) // G).astype(np.int32)))


def test_gptq_act_order_refused_when_the_layer_is_built_without_it():
    rng, q, scale = _known(3)
    tensors = _gptq_tensors(q, np.full((N, K // G), 7), scale, act_order_g_idx(K, G, rng))
    with pytest.raises(ValueError, match="act_order=True"):
        from_gptq(tensors, act_order=False)
    bad = dict(tensors, g_idx=torch.zeros(K, dtype=torch.int32))  # every column in group 0
    with pytest.raises(ValueError, match="exactly 64"):
        from_gptq(bad)


def test_compressed_tensors_symmetric_passes_through_unchanged():
    _, q, scale = _known(4)
    tensors = {"weight_packed": torch.from_numpy(pack_signed(q)), "weight_scale": torch.from_numpy(scale),
               "weight_shape": torch.tensor([N, K])}
    out = from_compressed_tensors(tensors)
    assert sorted(out) == ["weight_packed", "weight_scale"]
    assert out["weight_packed"] is tensors["weight_packed"] and out["weight_scale"] is tensors["weight_scale"]
    layer = _load(out, G, zero_point=False, act_order=False)
    np.testing.assert_array_equal(layer.dequantized_weight().double().numpy(),
                                  _expected_weight(q, np.zeros((N, K // G)), scale, np.arange(K) // G))


def test_compressed_tensors_zero_point_and_g_idx_convert_to_the_known_matrix():
    rng, q, scale = _known(5)
    zp = rng.integers(-8, 8, (N, K // G))
    g_idx = act_order_g_idx(K, G, rng)
    tensors = {"weight_packed": torch.from_numpy(pack_signed(q)), "weight_scale": torch.from_numpy(scale),
               "weight_shape": torch.tensor([N, K]),
               "weight_zero_point": torch.from_numpy(pack_signed(zp, axis=0)),  # packed along N
               "weight_g_idx": torch.from_numpy(g_idx)}
    out = from_compressed_tensors(tensors)
    layer = _load(out, G, zero_point=True, act_order=True)
    np.testing.assert_array_equal(layer.dequantized_weight().double().numpy(), _expected_weight(q, zp, scale, g_idx))

    # and back: the original compressed-tensors tensors, bit for bit
    back = to_compressed_tensors(layer.state_dict())
    for key in ("weight_packed", "weight_zero_point", "weight_g_idx"):
        np.testing.assert_array_equal(back[key].numpy(), tensors[key].numpy(), err_msg=key)
    assert back["weight_shape"].tolist() == [N, K]
    assert torch.equal(back["weight_scale"], layer.weight_scale)


def test_compressed_tensors_older_unpacked_zero_points_are_read():
    rng, q, scale = _known(6)
    zp = rng.integers(-8, 8, (N, K // G))
    tensors = {"weight_packed": torch.from_numpy(pack_signed(q)), "weight_scale": torch.from_numpy(scale),
               "weight_zero_point": torch.from_numpy(zp.astype(np.int8))}
    layer = _load(from_compressed_tensors(tensors), G, zero_point=True, act_order=False)
    np.testing.assert_array_equal(layer.dequantized_weight().double().numpy(),
                                  _expected_weight(q, zp, scale, np.arange(K) // G))


def test_convert_layer_matches_the_settings():
    rng, q, scale = _known(7)
    g_idx = (np.arange(K) // G).astype(np.int32)  # a desc_act file whose g_idx happens to be monotonic
    tensors = _gptq_tensors(q, np.full((N, K // G), 7), scale, g_idx)
    out = convert_layer(tensors, Int4Settings("gptq", G, symmetric=True, act_order=True))
    assert torch.equal(out["input_perm"], torch.arange(K))  # still carries a (trivial) permutation
    _load(out, G, zero_point=False, act_order=True)
    out = convert_layer(tensors, Int4Settings("gptq", G, symmetric=False, act_order=False))
    _load(out, G, zero_point=True, act_order=False)  # an all-zero zero point is added for the asymmetric layer


def test_permute_output_rows_moves_whole_rows():
    rng, q, scale = _known(8)
    zp = rng.integers(-8, 8, (N, K // G))
    tensors = {"weight_packed": torch.from_numpy(pack_signed(q)), "weight_scale": torch.from_numpy(scale),
               "weight_zero_point": torch.from_numpy(pack_signed(zp, axis=0))}
    index = torch.from_numpy(rng.permutation(N))
    moved = _load(permute_output_rows(tensors, index), G, zero_point=True, act_order=False)
    original = _load(tensors, G, zero_point=True, act_order=False)
    assert torch.equal(moved.dequantized_weight(), original.dequantized_weight()[index])


def test_quantization_config_round_trip_and_gptq_parsing():
    config = compressed_tensors_config(64, symmetric=False, act_order=True)
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["strategy"]) == (4, "int", "group")
    assert config["config_groups"]["group_0"]["targets"] == ["Linear"] and config["ignore"] == ["lm_head"]
    assert parse_quantization_config(config) == Int4Settings("compressed-tensors", 64, False, True, ("lm_head",))

    gptq = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True}
    assert parse_quantization_config(gptq) == Int4Settings("gptq", 128, True, True)
    with pytest.raises(ValueError, match="4-bit"):
        parse_quantization_config(dict(gptq, bits=8))
    w8a8 = compressed_tensors_config(128)
    w8a8["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8}
    with pytest.raises(ValueError, match="activations"):
        parse_quantization_config(w8a8)
    with pytest.raises(ValueError, match="awq"):
        parse_quantization_config({"quant_method": "awq"})
