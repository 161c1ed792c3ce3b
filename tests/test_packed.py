"""Packed linear layers (llama31/cpu/packed.py): the same product as the float64 formula, a module swap that keeps
the model's logits and checkpoints, and clear errors where it cannot be used.

Tolerance: an error bound relative to sum_k |x_k| |W_nk| (the scale of the float rounding of a length-K dot
product), against the product computed in float64. Measured here over the shapes and row counts below: float32
F.linear 2.4e-8 to 2.0e-7, the packed kernel 1.4e-8 to 3.4e-7: 1e-6 is 3x the worst. bfloat16: F.linear and the
packed kernel give the same numbers, 1.7e-4 to 3.2e-3 (the output is rounded to 8 bits of mantissa, and short
K = 13 rows have little cancellation): 2^-7 = 7.8e-3. A wrong layout or a dropped block errs by O(1).
"""

import pytest
import torch

from llama31 import Transformer
from llama31.config import ModelArgs
from llama31.cpu.packed import PackedLinear, pack_weights, packing_supported, unpack_weights

needs_packing = pytest.mark.skipif(packing_supported(torch.empty(1)) is not None,
                                   reason=f"no oneDNN packing here: {packing_supported(torch.empty(1))}")
DTYPES = [torch.float32] + ([torch.bfloat16] if packing_supported(torch.empty(1, dtype=torch.bfloat16)) is None else [])
REL = {torch.float32: 1e-6, torch.bfloat16: 2.0 ** -7}


def relative_error(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """max |y - x W^T| / (|x| |W|^T), both computed in float64 from the tensors the layer saw."""
    exact = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    return ((y.double() - exact).abs() / scale).max().item()


def weight(in_features, out_features, dtype, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def is_packed(module) -> bool:
    return isinstance(module, PackedLinear)


@needs_packing
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 4, 33, 512])
@pytest.mark.parametrize("shape", [(2048, 512), (200, 4160), (7, 13)])
def test_packed_product_equals_the_float64_formula(shape, rows, dtype):
    out_features, in_features = shape
    w = weight(in_features, out_features, dtype)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(dtype)
    layer = PackedLinear(w)
    assert layer.weight.is_mkldnn
    with torch.no_grad():
        y = layer(x)
    assert y.shape == (rows, out_features) and y.dtype == dtype
    assert relative_error(y, x, w) <= REL[dtype]


@needs_packing
def test_packed_takes_any_leading_shape_and_strided_input():
    w = weight(64, 48, torch.float32)
    layer = PackedLinear(w)
    h = torch.randn(3, 5, 64)
    last = h[:, -1:]  # (3, 1, 64) with the strides of (3, 5, 64): rows not adjacent in memory
    with torch.no_grad():
        for x in (h, last, h.transpose(0, 1)):
            y = layer(x)
            assert y.shape == (*x.shape[:-1], 48)
            assert relative_error(y.reshape(-1, 48), x.reshape(-1, 64), w) <= REL[torch.float32]


@needs_packing
def test_state_dict_of_a_packed_layer_is_the_plain_weight_bit_for_bit():
    plain = weight(96, 40, torch.float32)
    layer = PackedLinear(plain)
    state = layer.state_dict()
    assert set(state) == {"weight"} and not state["weight"].is_mkldnn
    assert torch.equal(state["weight"], plain)
    linear = layer.to_linear()
    assert type(linear) is torch.nn.Linear and linear.bias is None
    assert torch.equal(linear.weight, plain) and linear.weight.requires_grad


@needs_packing
def test_load_state_dict_into_a_packed_layer_packs_the_new_weight():
    layer = PackedLinear(weight(32, 16, torch.float32, seed=0))
    new = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
    layer.load_state_dict({"weight": new})
    assert layer.weight.is_mkldnn and torch.equal(layer.state_dict()["weight"], new)
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert relative_error(layer(x), x, new) <= REL[torch.float32]
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        layer.load_state_dict({"weight": torch.zeros(16, 31)})


def test_a_layer_that_cannot_be_packed_says_why():
    with pytest.raises(ValueError, match=r"\(4, 8\) linear weight.*float16"):
        PackedLinear(torch.zeros(4, 8, dtype=torch.float16))
    assert "meta" in packing_supported(torch.empty(2, device="meta"))


def tiny_args(**kw):
    return ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=160, max_seq_len=64,
                     **kw)


@needs_packing
def test_pack_weights_packs_every_linear_and_keeps_the_logits():
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    tokens = torch.randint(0, 300, (2, 17))
    with torch.no_grad():
        before = model(tokens)
        state = model.state_dict()
        assert pack_weights(model) == 0  # every layer is below the size where packing pays
        assert pack_weights(model, min_weights=0) == 2 * 7 + 1  # 7 projections per block and the output layer
        after = model(tokens)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert not model.tok_embeddings.weight.is_mkldnn  # the embedding is a lookup, never packed
    # float32 rounding of other kernels through 2 blocks: ~1e-6 here, 1e-4 is the HF-parity tolerance
    torch.testing.assert_close(after, before, rtol=0, atol=1e-4)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert pack_weights(model, min_weights=0) == 0  # already packed
    unpack_weights(model)
    assert not any(is_packed(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(tokens), before)  # nn.Linear again, on the very same weights


@needs_packing
def test_tied_output_gets_its_own_packed_copy_and_the_embedding_stays_plain():
    torch.manual_seed(0)
    model = Transformer(tiny_args(tie_word_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    pack_weights(model, min_weights=0)
    assert is_packed(model.output) and not model.tok_embeddings.weight.is_mkldnn
    state = model.state_dict()
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    unpack_weights(model)
    assert model.output.weight is model.tok_embeddings.weight  # tied again


def test_pack_required_on_a_model_that_cannot_be_packed_is_an_error():
    model = Transformer(tiny_args(), dtype=torch.float16)
    assert pack_weights(model, min_weights=0) == 0
    with pytest.raises(ValueError, match=r"no layer of the model can be packed: .*float16.*pack=False"):
        pack_weights(model, min_weights=0, required=True)


@needs_packing
def test_gradients_flow_to_the_input_of_a_packed_layer():
    w = weight(24, 10, torch.float32)
    layer = PackedLinear(w)
    x = torch.randn(3, 24, requires_grad=True)
    layer(x).pow(2).sum().backward()
    x_ref = x.detach().double().requires_grad_()
    (x_ref @ w.double().T).pow(2).sum().backward()
    # float32 dot products of length 24 and 10 (forward, backward): ~1e-7 relative; 1e-5 is far above that and far
    # below a wrong or missing gradient (O(1))
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not layer.weight.requires_grad  # a packed weight is not trained
