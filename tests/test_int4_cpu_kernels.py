"""Our INT4 CPU kernels (llama31/quant/cpu_int4.py). W4A16 (backend "cpu_int4", what "auto" takes on the CPU)
computes bf16(x) @ dequantize(W).T and W4A8 (backend "cpu_w4a8", an option) quantize_activations(x) @
dequantize(W).T, for every group size, scale dtype, zero point and row count; they refuse what they cannot run
with a reason; and on the trained demo model W4A8 costs little held-out loss against W4A16 and each path decodes
the tokens of its definition."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama31.quant import Int4Linear, cpu_int4, quantize_model
from llama31.quant.cpu_int4 import quantize_activations

ROOT = Path(__file__).resolve().parents[1]

if cpu_int4.unsupported(128, 128):
    pytest.skip(f"our INT4 CPU kernels cannot run here: {cpu_int4.unsupported(128, 128)}", allow_module_level=True)


def _layer(n, k, group_size, *, zero_point=False, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return Int4Linear.from_float(torch.randn(n, k), group_size, zero_point=zero_point, dtype=dtype,
                                 backend="cpu_w4a8")


def _definition(layer, x):
    """The formula in float64: the int8-rounded activations times the dequantized weight."""
    return quantize_activations(x) @ layer.dequantized_weight(torch.float64).T


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_kernel_computes_its_definition(group_size, zero_point, scale_dtype):
    # 203 output rows: tiles of 4 and a remainder; 512 inputs: 4 blocks of 128 and 2..16 groups
    layer = _layer(203, 512, group_size, zero_point=zero_point, dtype=scale_dtype)
    for rows in (1, 2, 3, 4, 5, 9):  # each kernel width (1..4 rows of x per pass) and passes over a tile
        x = torch.randn(rows, 512)
        # The integer sums are exact; what differs from float64 is the fp32 rounding of the per-lane conversions
        # and scalings (a few ulp of the partial sums, ~1e-7 relative): 1e-5 of the largest output is 100x that.
        # A wrong nibble, a mis-ordered column or a misplaced scale is off by more than 1e-2.
        expected = _definition(layer, x)
        assert ((layer(x).double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_w4a16_kernel_computes_bf16_activations_times_the_dequantized_weight(group_size, zero_point, scale_dtype):
    layer = _layer(203, 512, group_size, zero_point=zero_point, dtype=scale_dtype)
    for rows in (1, 2, 3, 4, 5, 9):  # every kernel width (1..4 rows of x per pass), and passes over a tile
        x = torch.randn(rows, 512)
        expected = x.bfloat16().double() @ layer.dequantized_weight(torch.float64).T
        # Products of bf16 x and small integers are exact in fp32; the sums carry an offset of 128 per weight that
        # each lane takes off again (sum (128 + u) x - 136 sum x), costing ~1e-6 of a group's sum. 1e-5 of the
        # largest output is 10x that; a wrong nibble, column order or scale is off by more than 1e-2.
        y = cpu_int4.matmul(x, layer.weight_packed, *layer._kernel_scales_now(), group_size)
        assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_auto_takes_the_w4a16_kernel_for_decoding_and_the_dequantized_matmul_for_prompts():
    layer = _layer(256, 512, 128)
    layer.backend = "auto"
    assert layer.resolve_backend(torch.device("cpu")) == "cpu_int4"
    for rows in (1, cpu_int4.W4A16_MAX_ROWS + 1, 100):  # the kernel, torch's op, W rebuilt in bf16 (a prompt)
        x = torch.randn(rows, 512)
        expected = x.bfloat16().double() @ layer.dequantized_weight(torch.float64).T
        # the kernel: fp32 sums (1e-5); torch's op and the rebuilt W round to bf16 on the way (2^-9 relative per
        # weight or output, docs of cpu_fused): within 2% of the largest output
        tolerance = 1e-5 if rows <= cpu_int4.W4A16_MAX_ROWS else 2e-2
        assert ((layer(x).double() - expected).abs().max() / expected.abs().max()).item() < tolerance


def test_bfloat16_activations_give_bfloat16_outputs_rounded_once():
    layer = _layer(96, 256, 128)
    x = torch.randn(2, 3, 256).to(torch.bfloat16)  # leading shape kept: (2, 3, 256) -> (2, 3, 96)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 96)
    expected = _definition(layer, x)
    # the fp32 result rounded to bf16 once: within half a bf16 ulp (2^-9 relative) plus the fp32 sums' ~1e-6
    assert ((y.double() - expected).abs() <= expected.abs() * 2**-8 + 1e-4).all()


def test_activation_rounding_is_blockwise_and_keeps_zero_blocks():
    x = torch.zeros(1, 256)
    x[0, :32] = torch.linspace(-1, 1, 32)  # one block with values, seven all-zero blocks
    x[0, 64] = 1e-30  # a block whose max is tiny still gets its own scale
    q = quantize_activations(x)
    assert q[0, 32:64].abs().max() == 0 and q[0, 65:].abs().max() == 0
    assert abs(q[0, 64].item() - 1e-30) < 1e-36
    # each value moves by at most half a step, step = the block's max / 127
    assert (q[0, :32] - x[0, :32].double()).abs().max() <= 1 / 127 / 2 + 1e-12
    layer = _layer(64, 256, 128)
    assert torch.allclose(layer(x).double(), _definition(layer, x), rtol=0, atol=1e-5)
    assert layer(torch.zeros(1, 256)).abs().max() == 0


def test_unsupported_shapes_are_refused_with_the_reason():
    layer = Int4Linear.from_float(torch.randn(16, 96), 32, backend="cpu_w4a8")  # K = 96: not a multiple of 128
    with pytest.raises(RuntimeError, match=r"Int4Linear\(96 -> 16\).*divisible by 128.*'auto'"):
        layer(torch.randn(1, 96))


# ------------------------------------------------------------------ on the trained demo model

SAMPLE = json.loads((ROOT / "tests" / "data" / "kjv_heldout_sample.json").read_text())


@pytest.fixture(scope="module")
def demo_bf16(tmp_path_factory):
    import llama31.demo as demo

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA31_CACHE", str(tmp_path_factory.mktemp("llama31_cache")))
        return demo.build_demo_model(dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def demo_int4(demo_bf16):
    return quantize_model(demo_bf16, 128)


def _heldout_loss(model, windows=2):
    ids, seq_len = torch.tensor(SAMPLE["ids"]), SAMPLE["seq_len"]
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, windows * seq_len, seq_len):
            inputs, targets = ids[start:start + seq_len][None], ids[start + 1:start + seq_len + 1][None]
            total += F.cross_entropy(model(inputs)[0].float(), targets[0], reduction="sum").item()
            count += targets.numel()
    return total / count


def test_w4a8_costs_little_heldout_loss_against_w4a16_on_the_demo_model(demo_int4, monkeypatch):
    w4a16 = _heldout_loss(demo_int4)
    monkeypatch.setattr(Int4Linear, "backend", "cpu_w4a8")
    w4a8 = _heldout_loss(demo_int4)
    # The bound W4A8 is offered under (docs/demo_model.md measures the full held-out split): at most 0.02 nats a
    # token above W4A16, against the 2.7 nats by which the model beats a unigram model.
    assert abs(w4a8 - w4a16) < 0.02, (w4a8, w4a16)


def test_w4a8_decodes_the_tokens_of_its_definition(demo_int4, monkeypatch):
    """Greedy decoding through the kernel equals greedy decoding through the formula (quantize_activations and
    the dequantized weights in float64) on the demo model, and the logits agree."""
    from llama31.generation import Llama
    from llama31.text import Tokenizer

    monkeypatch.setattr(Int4Linear, "backend", "cpu_w4a8")
    llama = Llama(demo_int4, Tokenizer())
    prompt = "And the LORD spake unto Moses, saying,"
    fast = llama.text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]

    def formula(x, weight_packed, weight_scale, zero_scale, group_size):
        from llama31.quant.packing import dequantize
        w = dequantize(weight_packed, weight_scale.float(), dtype=torch.float64)
        return (quantize_activations(x) @ w.T).to(x.dtype)

    monkeypatch.setattr(cpu_int4, "matmul_w4a8", formula)
    slow = llama.text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]
    assert fast.tokens == slow.tokens
    # bf16 activations between layers: each path rounds its own sums to bf16 (2^-9 relative), so log-probs of
    # the chosen tokens agree to a few hundredths, not to float32 precision
    assert max(abs(a - b) for a, b in zip(fast.logprobs, slow.logprobs)) < 0.05


def test_llama_build_w4a8_switches_every_int4_layer_and_refuses_a_float_model(demo_int4, monkeypatch, tmp_path):
    from llama31.errors import InputError
    from llama31.generation import Llama

    monkeypatch.setenv("LLAMA31_CACHE", str(tmp_path))
    llama = Llama.build(int4_group_size=128, int4_output=True, w4a8=True)  # the demo model
    layers = [m for m in llama.model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 7 * llama.model.args.n_layers + 1 and all(m.backend == "cpu_w4a8" for m in layers)
    with pytest.raises(InputError, match="w4a8.*int4_group_size"):
        Llama.build(w4a8=True)


def test_the_default_int4_path_decodes_the_tokens_of_the_reference_path(demo_bf16, monkeypatch):
    """INT4 with the output layer INT4 too, on the demo model in float32: the CPU's default path (our W4A16
    kernel, activations rounded to bf16) greedy-decodes the tokens of Int4Linear's reference path (dequantize,
    fp32 matmul)."""
    from llama31.generation import Llama
    from llama31.text import Tokenizer

    # float32 between the layers (the demo's bf16 weights, exactly), so that what differs is the kernel's bf16
    # rounding of each layer's input alone (in a bf16 model the logits' own bf16 rounding, 0.125 at |logit| ~ 20,
    # would swamp it)
    model = quantize_model(copy.deepcopy(demo_bf16).float(), 128, quantize_output=True)
    llama = Llama(model, Tokenizer())
    prompt = "And the LORD spake unto Moses, saying,"
    fast = llama.text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]
    monkeypatch.setattr(Int4Linear, "backend", "reference")
    slow = llama.text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]
    assert fast.tokens == slow.tokens
    # the default path rounds each INT4 layer's input to bf16 (2^-9 relative), the reference keeps fp32: the
    # log-probs of the chosen tokens agree to a few hundredths (measured ~0.03), not to float32 precision
    assert max(abs(a - b) for a, b in zip(fast.logprobs, slow.logprobs)) < 0.05
