"""Our CPU decode-attention kernel (llama31/cpu/attention.py) computes decode_attention's formula: against the
float64 definition (reference_attention) it is at least as close as the formula run by ATen in the same dtype,
for GQA and MHA groupings, short and long contexts, head_dim 32 to 128, cache views with other strides, and a
batch; it refuses what it cannot run by name; use_decode_kernel gives it to the layers that can take it."""

import pytest
import torch

from llama31 import Transformer
from llama31.cpu import attention as kernel
from llama31.model.attention import decode_attention, reference_attention

if kernel.unsupported():
    pytest.skip(f"the decode attention kernel cannot run here: {kernel.unsupported()}", allow_module_level=True)

SHAPES = [  # (bs, n_heads, n_kv_heads, T, head_dim)
    (1, 32, 8, 40, 64),    # the 1B shape: 4 query heads per kv head
    (2, 8, 8, 1, 32),      # MHA, one cached position, a batch of 2
    (1, 4, 1, 17, 128),    # one kv head for all; 16 positions and a remainder of 1
    (3, 16, 2, 300, 64),   # 8 query heads per kv head
    (1, 32, 8, 2049, 128), # a long context: the 8B shape
]


def _inputs(bs, n_heads, n_kv, T, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # k and v as views of a longer cache, as the KV cache hands them over; q as the transposed projection
    cache_k = torch.randn(bs, n_kv, T + 7, head_dim, generator=g).to(dtype)
    cache_v = torch.randn(bs, n_kv, T + 7, head_dim, generator=g).to(dtype)
    q = (2 * torch.randn(bs, 1, n_heads, head_dim, generator=g)).to(dtype).transpose(1, 2)
    return q, cache_k[:, :, :T], cache_v[:, :, :T]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_is_as_close_to_the_definition_as_the_formula(shape, dtype):
    q, k, v = _inputs(*shape, dtype, seed=sum(shape))
    exact = reference_attention(q.double(), k.double(), v.double())
    got = kernel.decode_attention(q, k, v)
    assert got.dtype == dtype and got.shape == q.shape
    err = (got.double() - exact).abs().max().item()
    formula = (decode_attention(q, k, v).double() - exact).abs().max().item()
    print(f"{shape} {dtype}: kernel {err:.1e}, formula {formula:.1e}")
    if dtype == torch.float32:
        # float32 sums of T terms of size ~1: a few ulp times sqrt(T) or so; 1e-5 is the bound the model's
        # float32 paths are held to per layer output (HF parity is 1e-4 on logits); a wrong position, head
        # grouping or scale is off by more than 1e-1
        assert err < 1e-5
    else:
        # bf16 inputs, float32 arithmetic, the output rounded to bf16 (2^-8 relative); the formula also rounds
        # the scores and the probabilities to bf16, so the kernel must be no further from the truth than it
        assert err <= formula + 2**-8 * exact.abs().max().item()


def test_kernel_refuses_what_it_cannot_run():
    q, k, v = _inputs(1, 4, 2, 8, 64, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="must all be float32 or all bfloat16"):
        kernel.decode_attention(q, k.bfloat16(), v)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.decode_attention(q[..., :48], k[..., :48], v[..., :48])
    with pytest.raises(RuntimeError, match="multiple of n_kv_heads"):
        kernel.decode_attention(q[:, :3], k, v)


def test_use_decode_kernel_takes_the_layers_that_can_run_it(hf_folder):
    folder, _ = hf_folder(seed=2)  # head_dim 16 in the tiny test models: too narrow for the kernel
    assert kernel.use_decode_kernel(Transformer.from_pretrained(folder, pack=False)) == 0
    folder, _ = hf_folder(seed=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # head_dim 32
    model = Transformer.from_pretrained(folder, pack=False)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        model.setup_cache(1, 8)
        model(tokens[:, :7], 0)
        expected = model(tokens[:, 7:], 7)
        assert kernel.use_decode_kernel(model) == model.args.n_layers
        assert all(layer.attention.decode_attention is kernel.decode_attention for layer in model.layers)
        model.setup_cache(1, 8)
        model(tokens[:, :7], 0)
        got = model(tokens[:, 7:], 7)
    assert (got - expected).abs().max().item() < 1e-5  # the float32 bound of the test above
