"""Logits equal HF transformers' LlamaForCausalLM (float32, eager attention) on tiny random models,
loaded through our HF loader and through a 2-file Meta folder made by our converter.

Tolerance 1e-4 (max abs error): both sides compute in float32 with different but equivalent operation orders
(interleaved vs half-split RoPE, grouped vs repeated kv heads, divide vs multiply by sqrt(head_dim)), which
leaves differences of a few float32 ulps: measured 3e-7 relative to the largest logit in every config
(1e-6 to 2e-6 absolute; 2e-5 for the tied model, whose std-1 embedding makes logits ~30x larger). Real mistakes are
orders of magnitude larger: ignoring the llama3 scaling at an original context of 32, a skipped q/k
permutation or an off-by-one GQA mapping each change the logits by > 1e-2 (the last test proves the first).
"""

import pytest
import torch

from llama31 import Transformer
from llama31.convert import convert
from llama31.cpu.packed import PackedLinear

TOL = 1e-4

CONFIGS = {
    "mha-no-scaling": dict(num_attention_heads=4, num_key_value_heads=4, rope={"rope_type": "default"}),
    "gqa2-llama3": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa4-llama3": dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128),
    "gqa8-llama3": dict(num_attention_heads=8, num_key_value_heads=1, hidden_size=128),
    "factor32-tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          rope={"factor": 32.0}),
    "head-dim-not-dim-over-heads": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=3),
}


def hf_logits(hf, tokens):
    with torch.no_grad():
        return hf(tokens).logits


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_hf_through_the_hf_loader(hf_folder, name, pack):
    """Both formulations of the linear layers: oneDNN-packed weights (the CPU default for large layers; forced
    here on these tiny ones) and plain F.linear."""
    folder, hf = hf_folder(seed=1, **CONFIGS[name])
    model = Transformer.from_pretrained(folder, pack=pack)
    assert model.checkpoint_info["format"] == "hf" and isinstance(model.output, PackedLinear) == pack
    tokens = torch.randint(0, hf.config.vocab_size, (3, 130), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens)
    assert ours.dtype == torch.float32 and ours.shape == (3, 130, hf.config.vocab_size)
    err = (ours - hf_logits(hf, tokens)).abs().max().item()
    print(f"{name} ({'packed' if pack else 'plain'}): max abs logit error {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("name", ["gqa4-llama3", "factor32-tied"])
def test_logits_match_hf_through_a_two_file_meta_folder(hf_folder, tmp_path, name):
    folder, hf = hf_folder(seed=3, **CONFIGS[name])
    meta = tmp_path / "meta"
    convert(folder, meta, to="meta", shards=2)
    assert sorted(p.name for p in meta.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    model = Transformer.from_pretrained(meta)
    assert model.checkpoint_info["format"] == "meta"
    tokens = torch.randint(0, hf.config.vocab_size, (2, 120), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        err = (model(tokens) - hf_logits(hf, tokens)).abs().max().item()
    print(f"{name} via Meta folder: max abs logit error {err:.2e}")
    assert err <= TOL


def test_the_tolerance_catches_a_missing_rope_scaling(hf_folder):
    """Sensitivity check: the same comparison with the llama3 scaling dropped fails by far."""
    folder, hf = hf_folder(seed=5, **CONFIGS["gqa2-llama3"])
    model = Transformer.from_pretrained(folder)
    from llama31.model.rope import RotaryEmbedding

    model.rope = RotaryEmbedding(model.args.replace(rope_scaling=None))
    tokens = torch.randint(0, hf.config.vocab_size, (1, 130), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        err = (model(tokens) - hf_logits(hf, tokens)).abs().max().item()
    assert err > 100 * TOL


def test_last_only_returns_the_last_position(hf_folder):
    folder, hf = hf_folder(seed=7)
    model = Transformer.from_pretrained(folder)
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40))
    with torch.no_grad():
        full, last = model(tokens), model(tokens, last_only=True)
    assert last.shape == (2, 1, hf.config.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=0, atol=1e-6)


def test_bf16_model_loads_in_bf16_and_stays_close(hf_folder):
    folder, hf = hf_folder(seed=8)
    model = Transformer.from_pretrained(folder, dtype=torch.bfloat16)
    assert model.layers[0].attention.wq.weight.dtype == torch.bfloat16
    tokens = torch.randint(0, hf.config.vocab_size, (1, 64))
    with torch.no_grad():
        ours, ref = model(tokens), hf_logits(hf, tokens)
    assert ours.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: a statistical check, not equality (as vLLM's and HF's bf16 tests also compare)
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agreement >= 0.9
