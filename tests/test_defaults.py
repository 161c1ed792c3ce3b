"""The CPU kernels a loaded model gets (llama31/cpu/defaults.py, the `pack` option of from_pretrained): which layer
gets which kernel, and that each choice keeps the logits (against HF transformers), the checkpoint and the tied
weights, and lets the checkpoint file go.

Tolerance: HF parity's 1e-4 on the logits (tests/test_hf_parity.py). Other float32 kernels sum the same products
in another order: through these 2 blocks the logits move by about 1e-6; a wrong kernel or a lost layer moves
them by O(1).
"""

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from llama31 import Transformer
from llama31.cpu import gemv
from llama31.cpu.gemv import GemvLinear
from llama31.cpu.packed import PackedLinear, packing_supported

TOL = 1e-4
NO_PACKING = packing_supported(torch.empty(1))  # None where oneDNN can pack float32 here, else why not
needs_packing = pytest.mark.skipif(NO_PACKING is not None, reason=f"no oneDNN packing here: {NO_PACKING}")
# dim 128, hidden 4096: w1 / w3 / w2 have 2^19 weights (PACK_MIN_WEIGHTS, the size from which a layer gets a
# faster kernel), wq 2^14
LARGE_FFN = dict(hidden_size=128, intermediate_size=4096, num_attention_heads=4, num_key_value_heads=2)


def float32_default_kernel():
    """What the default gives a large float32 layer here: our kernel where it runs, else oneDNN's packing."""
    if gemv.unsupported() is None:
        return GemvLinear
    return PackedLinear if NO_PACKING is None else nn.Linear


def max_error_against_hf(model, hf) -> float:
    """Max |logit difference| of a prompt (13 rows: the prompt path) and of one decode step after it (one row:
    the decode path), each against HF's logits of the same positions."""
    tokens = torch.randint(0, hf.config.vocab_size, (1, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits  # (1, 14, vocab)
        model.setup_cache(max_batch_size=1, max_seq_len=14)
        prompt = model(tokens[:, :13], start_pos=0)  # (1, 13, vocab)
        step = model(tokens[:, 13:], start_pos=13)  # (1, 1, vocab)
        model.clear_cache()
    return (torch.cat([prompt, step], 1) - expected).abs().max().item()


def test_float32_default_gives_large_layers_the_fastest_kernel_and_keeps_hf_logits(hf_folder):
    folder, hf = hf_folder(seed=0, **LARGE_FFN)
    model = Transformer.from_pretrained(folder)  # float32, the default pack=None
    block = model.layers[0]
    for layer in (block.feed_forward.w1, block.feed_forward.w3, block.feed_forward.w2):
        assert type(layer) is float32_default_kernel()
    assert type(block.attention.wq) is nn.Linear  # 2^14 weights: too small to gain
    assert max_error_against_hf(model, hf) <= TOL


@needs_packing
def test_without_our_kernel_the_float32_default_packs_for_onednn(hf_folder, monkeypatch):
    monkeypatch.setattr(gemv, "unsupported", lambda: "this CPU lacks AVX512-BF16")  # as on a CPU without it
    folder, hf = hf_folder(seed=0, **LARGE_FFN)
    model = Transformer.from_pretrained(folder)
    assert type(model.layers[0].feed_forward.w1) is PackedLinear
    assert not any(isinstance(m, GemvLinear) for m in model.modules())
    assert max_error_against_hf(model, hf) <= TOL


def test_bf16_default_packs_large_layers_for_onednn(hf_folder):
    if packing_supported(torch.empty(1, dtype=torch.bfloat16)) is not None:
        pytest.skip(f"no bf16 oneDNN packing here: {packing_supported(torch.empty(1, dtype=torch.bfloat16))}")
    folder, _ = hf_folder(seed=0, **LARGE_FFN)
    model = Transformer.from_pretrained(folder, dtype=torch.bfloat16)
    # bf16 prompts run slower on plain weights than on the packed layout (llama31/cpu/defaults.py)
    assert type(model.layers[0].feed_forward.w1) is PackedLinear
    assert type(model.layers[0].attention.wq) is nn.Linear


@needs_packing
def test_pack_true_packs_every_layer_and_pack_false_none(hf_folder):
    folder, _ = hf_folder(seed=0, **LARGE_FFN)
    packed = Transformer.from_pretrained(folder, pack=True)
    assert not any(type(m) in (nn.Linear, GemvLinear) for m in packed.modules())
    plain = Transformer.from_pretrained(folder, pack=False)
    assert all(type(m) is nn.Linear for m in plain.modules() if isinstance(m, nn.Linear))


def test_float32_default_keeps_a_tied_output_layer_tied(hf_folder):
    # vocab 4096 x dim 128: the tied output matrix has 2^19 weights, large enough for a faster kernel
    folder, hf = hf_folder(seed=0, vocab_size=4096, tie_word_embeddings=True, **LARGE_FFN)
    model = Transformer.from_pretrained(folder)
    assert type(model.output) is float32_default_kernel()
    if type(model.output) is GemvLinear:  # our kernel reads the embedding's own matrix: no second copy
        assert model.output.weight is model.tok_embeddings.weight
    plain = Transformer.from_pretrained(folder, pack=False)
    state, plain_state = model.state_dict(), plain.state_dict()
    assert state.keys() == plain_state.keys() and all(torch.equal(state[k], v) for k, v in plain_state.items())
    assert max_error_against_hf(model, hf) <= TOL


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory map (Linux)")
@pytest.mark.parametrize("pack", [None, True], ids=["default", "packed"])
def test_a_model_with_faster_kernels_does_not_keep_its_checkpoint_file_mapped(hf_folder, pack):
    """Plain weights in the file's dtype are views of the mmapped safetensors file; once the layers have their
    kernels, every plain tensor is copied so that the file (all of whose pages the swap read) is unmapped."""
    import gc

    if float32_default_kernel() is nn.Linear:
        pytest.skip("neither our kernel nor oneDNN's packing runs here: nothing is swapped")
    if pack and NO_PACKING is not None:
        pytest.skip(f"no oneDNN packing here: {NO_PACKING}")
    folder, _ = hf_folder(seed=0, tie_word_embeddings=True, **LARGE_FFN)

    def mapped(model) -> bool:
        gc.collect()
        return str(folder) in Path("/proc/self/maps").read_text()

    plain = Transformer.from_pretrained(folder, dtype=torch.float32, pack=False)  # the file holds float32
    assert mapped(plain)  # the check can fail: plain weights are views of the file
    del plain
    assert not mapped(None)
    model = Transformer.from_pretrained(folder, dtype=torch.float32, pack=pack)
    assert type(model.layers[0].feed_forward.w1) is not nn.Linear and not mapped(model)
    plain_again = Transformer.from_pretrained(folder, dtype=torch.float32, pack=False)
    with torch.no_grad():
        tokens = torch.randint(0, 100, (1, 9))
        torch.testing.assert_close(model(tokens), plain_again(tokens), rtol=0, atol=TOL)
