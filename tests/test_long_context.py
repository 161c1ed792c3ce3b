"""Long prompts: chunked prefill gives the logits of a one-shot prefill; RoPE tables hold up to position 131071.

(The 8B RoPE tables at 0 .. 131071 are checked in test_rope.py; here the head_dim 64 configurations of
examples/bench/long_context.py and of Llama 3.2 1B.)
"""

import pytest
import torch
from test_rope import formula_float64

from llama31 import ModelArgs, RopeScaling, Transformer
from llama31.generation import Llama, prefill
from llama31.model.rope import RotaryEmbedding

# Chunked and one-shot prefill do the same arithmetic in matmuls of different shapes: only the order of
# float32 additions differs (about 1e-6 seen on these models). 1e-5 is the bound issue 7 asks for.
ATOL = 1e-5


@pytest.fixture
def tiny(hf_folder):
    """A tiny random model with a 1024-token context; RoPE's original context is 32, so that prompts of 100+
    tokens run far into the scaled frequencies."""
    folder, _ = hf_folder(seed=71, num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
    return Transformer.from_pretrained(folder)


def prompt_of(n, seed=0, vocab=320):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
@pytest.mark.parametrize("chunk", [1, 7, 64, 150, 1000])
def test_chunked_prefill_gives_the_logits_of_one_forward_at_every_position(tiny, chunk):
    tokens = prompt_of(150)
    tiny.clear_cache()
    expected = tiny(tokens)  # (1, 150, vocab): no cache, one forward with the full causal mask
    tiny.setup_cache(1, 150)
    got = torch.cat([tiny(tokens[:, b:b + chunk], b) for b in range(0, 150, chunk)], dim=1)
    tiny.clear_cache()
    assert (got - expected).abs().max().item() <= ATOL


@torch.inference_mode()
def test_prefill_returns_the_last_logits_and_forwards_at_most_chunk_positions(tiny, monkeypatch):
    tokens = prompt_of(100, seed=1)
    tiny.setup_cache(1, 100)
    whole = prefill(tiny, tokens)
    seen = []
    forward = tiny.forward
    monkeypatch.setattr(tiny, "forward", lambda t, start_pos=0, **kw: seen.append((start_pos, t.shape[1]))
                        or forward(t, start_pos, **kw))
    chunked = prefill(tiny, tokens, chunk=30)
    tiny.clear_cache()
    assert seen == [(0, 30), (30, 30), (60, 30), (90, 10)]
    assert whole.shape == chunked.shape == (1, 320)
    assert (chunked - whole).abs().max().item() <= ATOL


def test_generate_with_chunked_prefill_gives_the_same_tokens_and_logprobs(tiny):
    from llama31.text import Tokenizer

    llama = Llama(tiny, Tokenizer())
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 320, (n,), generator=g).tolist() for n in (120, 97)]  # unequal: 97 prefilled
    kwargs = dict(max_gen_len=20, temperature=0, logprobs=True, stop_tokens=[])
    tokens, logprobs = llama.generate(prompts, **kwargs)
    for chunk in (1, 33):  # one position at a time, and chunks that end mid-prompt
        chunked_tokens, chunked_logprobs = llama.generate(prompts, prefill_chunk=chunk, **kwargs)
        assert chunked_tokens == tokens
        diff = (torch.tensor(chunked_logprobs) - torch.tensor(logprobs)).abs().max().item()
        assert diff <= ATOL


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_invalid_prefill_chunk_is_rejected(tiny, bad):
    from llama31.text import Tokenizer

    with pytest.raises(ValueError, match="prefill_chunk must be a positive integer"):
        Llama(tiny, Tokenizer()).generate([[1, 2, 3]], max_gen_len=2, prefill_chunk=bad)


@pytest.mark.parametrize("args", [
    # the model of examples/bench/long_context.py: head_dim 64 with the real 3.1 scaling
    ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=1024, hidden_dim=768,
              rope_scaling=RopeScaling(), max_seq_len=131072),
    ModelArgs.preset("llama3.2-1b"),  # head_dim 64, factor 32
], ids=["long_context_example", "llama3.2-1b"])
def test_rope_tables_up_to_position_131071_match_float64(args):
    rope = RotaryEmbedding(args)
    s = args.rope_scaling
    expected, _ = formula_float64(args.head_dim, args.rope_theta, s.factor, s.low_freq_factor,
                                  s.high_freq_factor, s.original_max_position_embeddings)
    for p in (16383, 32767, 65535, 100000, 131071):
        cos, sin = rope.tables(p, 1, "cpu")
        angles = p * expected
        # float32 tables: only the float32 rounding of each cos/sin value is left (<= 6e-8)
        torch.testing.assert_close(cos[0].double(), angles.cos(), rtol=0, atol=1e-7)
        torch.testing.assert_close(sin[0].double(), angles.sin(), rtol=0, atol=1e-7)
