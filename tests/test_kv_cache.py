"""The KV cache: prefill then token-by-token decoding gives the logits of one full forward pass.

Tolerance 1e-5: the two paths do the same float32 arithmetic on different matrix shapes (one (seq x seq)
attention vs seq (1 x t) ones), so only summation order differs; measured ~3e-7.
"""

import pytest
import torch

from llama31 import Transformer

TOL = 1e-5


@pytest.mark.parametrize("overrides", [dict(), dict(num_attention_heads=8, num_key_value_heads=2, hidden_size=128)])
def test_prefill_then_decode_equals_full_forward(hf_folder, overrides):
    folder, _ = hf_folder(seed=11, **overrides)
    model = Transformer.from_pretrained(folder)
    tokens = torch.randint(0, model.args.vocab_size, (3, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch_size=4, max_seq_len=100)
        pieces = [model(tokens[:, :50], start_pos=0)]
        pieces += [model(tokens[:, i:i + 1], start_pos=i) for i in range(50, 70)]
        pieces.append(model(tokens[:, 70:], start_pos=70))  # a second multi-token chunk after decoding
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= TOL


def test_cache_reuse_after_a_new_prefill_forgets_the_old_sequence(hf_folder):
    folder, _ = hf_folder(seed=12)
    model = Transformer.from_pretrained(folder)
    a, b = torch.randint(0, 320, (2, 1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.setup_cache(1, 64)
        model(a, 0)
        second = model(b, 0)
        model.clear_cache()
        fresh = model(b)
    assert (second - fresh).abs().max().item() <= TOL


def test_cache_errors_are_clear(hf_folder):
    folder, _ = hf_folder(seed=13)
    model = Transformer.from_pretrained(folder)
    with pytest.raises(ValueError, match="no KV cache"):
        model(torch.zeros(1, 1, dtype=torch.long), start_pos=5)
    model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="KV cache holds 1 sequences of 16 positions; got batch 1 at positions 10..19"):
        model(torch.zeros(1, 10, dtype=torch.long), start_pos=10)
    with pytest.raises(ValueError, match="max_seq_len must be an integer >= 1 and <= 1024"):
        model.setup_cache(1, 2048)
    with pytest.raises(ValueError, match="exceed the model's context of 1024 tokens"):
        model(torch.zeros(1, 2, dtype=torch.long), start_pos=1023)
