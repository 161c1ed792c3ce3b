"""Compiled decode steps (llama31/cpu/compiled.py) on the trained demo model against HF transformers, and what
compiling must not change.

The compiled step is the model's own function computed by our CPU kernels and inductor's fused loops: float32
additions in another order, so the tolerance is that of every HF parity test (1e-4 max abs on logits,
tests/test_hf_parity.py). A compile takes seconds to tens of seconds on 2 cores, so one compiled model serves
the float32 tests.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, memory_flags

from llama31 import Llama, Transformer
from llama31.cpu.compiled import CompiledDecoder
from llama31.text import Tokenizer

TOL = 1e-4
GRAPHS_BEFORE = 0
SAMPLE_IDS = json.loads((Path(__file__).parent / "data" / "kjv_heldout_sample.json").read_text())["ids"]


@pytest.fixture(scope="module")
def compiled(demo_folder):
    """(Llama with compile=True on the trained demo model loaded with pack=False, HF's LlamaForCausalLM on the
    same folder); dynamo reset around. The demo model (llama31/demo) is the reference users run first, so the
    compiled path is checked on its trained weights: real attention patterns, peaked next-token distributions."""
    from transformers import LlamaForCausalLM

    torch._dynamo.reset()
    folder = demo_folder
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    llama = Llama(Transformer.from_pretrained(folder, dtype=torch.float32, pack=False), Tokenizer(), compile=True)
    global GRAPHS_BEFORE
    GRAPHS_BEFORE = graphs_compiled()  # dynamo's count is the session's: graphs compiled by other modules before
    yield llama, hf
    torch._dynamo.reset()


def _text_ids(n: int, seed: int) -> list[int]:
    """n token ids of real text (the held-out sample the demo tests use), from a seeded offset."""
    start = torch.randint(0, len(SAMPLE_IDS) - n, (1,), generator=torch.Generator().manual_seed(seed)).item()
    return SAMPLE_IDS[start:start + n]


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_compiled_steps_give_hf_logits_at_every_position(compiled):
    llama, hf = compiled
    tokens = torch.tensor([_text_ids(60, seed=1)])
    with torch.no_grad():
        expected = hf(tokens).logits[0, 20:]
    decoder = llama.decoder
    assert isinstance(decoder, CompiledDecoder)
    before = graphs_compiled()
    with torch.inference_mode():
        decoder.setup_cache(1, 64)
        decoder(tokens[:, :20], 0)  # the prompt: eager
        # compiled; contiguous (1, 1) tensors here, views into a longer row in Llama.generate (next test)
        steps = [decoder(tokens[0, i].reshape(1, 1), i, last_only=True)[0, 0] for i in range(20, 60)]
        decoder.clear_cache()
    assert graphs_compiled() == before + 1  # one graph for all 40 positions
    err = (torch.stack(steps) - expected).abs().max().item()
    print(f"compiled decode steps: max abs logit error vs HF {err:.2e}")
    assert err <= TOL


def test_compiled_greedy_generation_equals_hf_and_new_requests_reuse_the_graph(compiled):
    llama, hf = compiled
    g = torch.Generator().manual_seed(2)
    for length, new in ((17, 30), (41, 12), (5, 25)):  # each request has a KV cache of another length
        prompt = _text_ids(length, seed=int(torch.randint(0, 2**31, (1,), generator=g)))
        # compiled at most once in this module: any further compile (a new cache size) is an error here
        with torch._dynamo.config.patch(error_on_recompile=graphs_compiled() > GRAPHS_BEFORE):
            tokens, logprobs = llama.generate([prompt], max_gen_len=new, temperature=0, logprobs=True,
                                              stop_tokens=[])
        (expected,), (logits,) = hf_greedy(hf, [prompt], new)
        assert tokens[0] == expected
        hf_logprobs = torch.log_softmax(logits, -1).gather(-1, torch.tensor(expected)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs[0]), hf_logprobs, rtol=0, atol=TOL)
    assert graphs_compiled() == GRAPHS_BEFORE + 1


def test_compiled_int4_decodes_the_tokens_of_the_int4_reference_path(demo_folder, monkeypatch):
    """INT4 with the output layer INT4 too, on the demo model in float32 (as in tests/test_int4_cpu_kernels.py):
    compiled steps (the CPU's INT4 kernel inside the graph: ours where it runs, else torch's; the rest fused by
    inductor) greedy-decode the tokens of Int4Linear's reference path, and give the log-probs of the eager
    steps, which run the same kernel."""
    from llama31.quant import Int4Linear, quantize_model

    model = quantize_model(Transformer.from_pretrained(demo_folder, dtype=torch.float32, pack=False), 128,
                           quantize_output=True)
    prompt = "And the LORD spake unto Moses, saying,"
    before = graphs_compiled()
    fast = Llama(model, Tokenizer(), compile=True).text_completion([prompt], max_gen_len=24, temperature=0,
                                                                   logprobs=True)[0]
    assert graphs_compiled() == before + 1
    eager = Llama(model, Tokenizer()).text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]
    monkeypatch.setattr(Int4Linear, "backend", "reference")
    slow = Llama(model, Tokenizer()).text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]
    assert fast.tokens == eager.tokens == slow.tokens
    print(f"compiled INT4: log-probs vs eager {max(abs(a - b) for a, b in zip(fast.logprobs, eager.logprobs)):.1e},"
          f" vs reference {max(abs(a - b) for a, b in zip(fast.logprobs, slow.logprobs)):.1e}")
    # against the reference (fp32 inputs, no bf16 rounding): a few hundredths, as for the eager kernel
    to_reference = max(abs(a - b) for a, b in zip(eager.logprobs, slow.logprobs))
    assert max(abs(a - b) for a, b in zip(fast.logprobs, slow.logprobs)) < 0.05 and to_reference < 0.05
    # compiled and eager run the same kernels on float32 activations that can differ in the last bits (inductor's
    # fused loops, the norms' sums among them, may add in another order: equal for the first 10 steps here, then
    # not); the INT4 kernel rounds its input to bf16, so such a difference can move an activation lying near a
    # rounding boundary by half a bf16 ulp. That moves the log-probs less than rounding every activation does
    # (eager against the reference)
    assert max(abs(a - b) for a, b in zip(fast.logprobs, eager.logprobs)) <= to_reference


def test_compiled_steps_read_the_weights_and_caches_from_huge_page_memory(compiled):
    """CompiledDecoder moves the model's large tensors (here the 128256 x 256 embedding, which the tied output
    layer reads every step) and each KV cache of at least 2 MiB into memory that asks for 2 MiB pages
    (llama31/cpu/hugepages.py), seen in the kernel's flags for the region."""
    from llama31.cpu import hugepages

    if hugepages.unsupported():
        pytest.skip(f"no transparent huge pages here: {hugepages.unsupported()}")
    llama, _ = compiled
    assert "hg" in memory_flags(llama.model.tok_embeddings.weight)
    llama.decoder.setup_cache(16, 1024)  # 16 x 2 kv heads x 1025 x 32 x 4 bytes = 4.0 MiB per layer's k, v
    cache = llama.model.layers[0].attention.cache
    assert cache.k.nbytes >= hugepages.PAGE_BYTES and "hg" in memory_flags(cache.k) and "hg" in memory_flags(cache.v)
    llama.decoder.clear_cache()


def test_what_cannot_be_compiled_is_refused_by_name(hf_folder):
    folder, _ = hf_folder(seed=3, intermediate_size=256)
    with pytest.raises(ValueError, match="packed for oneDNN; load it with pack=False"):
        CompiledDecoder(Transformer.from_pretrained(folder, pack=True))
    from llama31.quant import Int4Linear, quantize_model

    int4 = quantize_model(Transformer.from_pretrained(folder, pack=False), group_size=32)
    int4.layers[0].attention.wq.backend = "reference"  # a path the compiled step does not trace
    with pytest.raises(ValueError, match=r"Int4Linear\(64 -> 64\) runs 'reference'; compiled INT4 decoding runs"):
        CompiledDecoder(int4)
    assert Int4Linear.backend == "auto"
    with pytest.raises(ValueError, match="float32 and bfloat16"):
        CompiledDecoder(Transformer.from_pretrained(folder, dtype=torch.float16, pack=False))
    with pytest.raises(ValueError, match="compile=True needs plain weights"):
        Llama.build(None, compile=True, pack=True)
