"""RoPE frequencies with llama3 scaling, against the formula in float64 and against HF's own initialisation."""

import math

import pytest
import torch

from llama31 import ModelArgs, RopeScaling
from llama31.model.rope import RotaryEmbedding, apply_rotary, llama3_inv_freq


def formula_float64(d, theta, s, a, b, L):
    """The three-band rule of Meta's apply_scaling (llama-models, models/llama3/model.py), written out per
    frequency (a loop, not our vectorised clamp)."""
    out, bands = [], []
    for i in range(d // 2):
        w = theta ** (-2 * i / d)
        wavelength = 2 * math.pi / w
        if wavelength < L / b:
            out.append(w), bands.append("unchanged")
        elif wavelength > L / a:
            out.append(w / s), bands.append("divided")
        else:
            g = (L / wavelength - a) / (b - a)
            out.append((1 - g) * w / s + g * w), bands.append("blended")
    return torch.tensor(out, dtype=torch.float64), bands


def test_scaled_frequencies_of_the_real_31_config_match_float64_formula():
    args = ModelArgs.preset("llama3.1-8b")
    ours = llama3_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    expected, bands = formula_float64(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    torch.testing.assert_close(ours, expected, rtol=1e-14, atol=0)
    # the bands for d = 128 (the formula above, 3.1's config): i = 0..28 unchanged, 29..34 blended, 35..63 divided
    assert bands == ["unchanged"] * 29 + ["blended"] * 6 + ["divided"] * 29
    plain = 500000.0 ** (-torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    torch.testing.assert_close(ours[:29], plain[:29], rtol=1e-15, atol=0)
    torch.testing.assert_close(ours[35:], plain[35:] / 8, rtol=1e-15, atol=0)
    assert ((ours[29:35] < plain[29:35]) & (ours[29:35] > plain[29:35] / 8)).all()


@pytest.mark.parametrize("preset", ["llama3.1-8b", "llama3.2-1b", "llama3.2-3b"])
def test_frequencies_match_hf_llama3_rope_init(preset):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = ModelArgs.preset(preset)
    config = LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("architectures",
                                                                                      "torch_dtype")})
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = llama3_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)
    # HF computes in float32: theta**x, the wavelength, the blend factor and the blend are each rounded
    # (about 5 roundings of 6e-8 in the blended band), ours in float64: agreement within 4 float32 ulps.
    torch.testing.assert_close(ours.float(), hf_inv_freq.float(), rtol=5e-7, atol=0)


def test_tables_at_the_end_of_the_128k_context_match_float64():
    args = ModelArgs.preset("llama3.1-8b")
    rope = RotaryEmbedding(args)
    expected, _ = formula_float64(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    for p in (0, 8191, 8192, 65536, 131071):
        angles = p * expected
        cos, sin = rope.tables(p, 1, "cpu")
        assert cos.dtype == torch.float32
        # float32 tables: the only error left is float32 rounding of cos/sin values (<= 6e-8)
        torch.testing.assert_close(cos[0].double(), angles.cos(), rtol=0, atol=1e-7)
        torch.testing.assert_close(sin[0].double(), angles.sin(), rtol=0, atol=1e-7)


def test_tables_stay_float32_in_a_bf16_model():
    from llama31 import Transformer

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=64, max_seq_len=64)
    model = Transformer(args, dtype=torch.bfloat16).to(torch.bfloat16)
    assert model.rope.cos.dtype == torch.float32


def test_rotation_of_interleaved_pairs():
    # one head, d = 4: pairs (x0, x1) and (x2, x3) rotate by angles t0, t1 -- written out by hand
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    t = torch.tensor([[0.3, 1.1]])
    out = apply_rotary(x, t.cos(), t.sin()).flatten().double()
    c, s = t.double().cos()[0], t.double().sin()[0]
    expected = torch.stack([1 * c[0] - 2 * s[0], 1 * s[0] + 2 * c[0], 3 * c[1] - 4 * s[1], 3 * s[1] + 4 * c[1]])
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_no_scaling_gives_plain_frequencies():
    plain = llama3_inv_freq(64, 10000.0, None)
    torch.testing.assert_close(plain, 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64))


def test_scaling_is_read_from_the_config_not_hard_coded():
    a = llama3_inv_freq(128, 500000.0, RopeScaling(factor=8.0))
    b = llama3_inv_freq(128, 500000.0, RopeScaling(factor=32.0))
    torch.testing.assert_close(b[40:], a[40:] / 4)
