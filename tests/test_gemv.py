"""Our CPU matrix-vector kernel (llama31/cpu/gemv.py): it computes F.linear's product (float32 sums; in bf16 of
exact products, the result rounded to bf16) for every shape and row count it takes; GemvLinear sends it only
those products and is an nn.Linear to everything else (checkpoints, tied weights, gradients); and compiled bf16
decoding, which runs it, is as close to the float32 model as eager bf16 is."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama31 import Llama, Transformer
from llama31.cpu import gemv
from llama31.cpu.gemv import MAX_ROWS, GemvLinear, use_gemv
from llama31.text import Tokenizer

if gemv.unsupported():
    pytest.skip(f"the bf16 CPU kernel cannot run here: {gemv.unsupported()}", allow_module_level=True)


def _bound(x, w):
    """How far the kernel's result may lie from the exact sum. Float32 summation: each product passes through at
    most k/16 additions along its lane, 3 joining the accumulators, 4 across the lanes, and its own rounding:
    fewer than k + 8 roundings of 2^-24, times sum |x w| (the standard worst-case bound). In bf16 the result is
    then rounded to 8 significant bits: half an ulp, 2^-8 relative."""
    exact = x.double() @ w.double().T
    k = x.shape[-1]
    summation = (k + 8) * 2**-24 * (x.double().abs() @ w.double().abs().T)
    rounding = 2**-8 * (exact.abs() + summation) if x.dtype == torch.bfloat16 else 0
    return exact, summation + rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(1, 32), (17, 2048), (250, 200), (3, 8192), (64, 7), (33, 129)])
def test_kernel_computes_the_product_for_every_row_count(n, k, dtype):
    # k = 7, 129, 200: a masked tail after the full loads; 2048 / 8192: the Llama shapes (four accumulators);
    # n = 1, 3, 17: fewer rows than threads or than the 16-row grain
    torch.manual_seed(n * k)
    w = torch.randn(n, k).to(dtype)
    for rows in range(0, MAX_ROWS + 1):
        x = torch.randn(rows, k).to(dtype)
        got = gemv.matmul(x, w)
        assert got.dtype == dtype and got.shape == (rows, n)
        exact, bound = _bound(x, w)
        assert ((got.double() - exact).abs() <= bound).all(), (rows, n, k)


def test_kernel_takes_batched_shapes_and_refuses_what_it_cannot_run():
    w = torch.randn(40, 64).bfloat16()
    x = torch.randn(2, 1, 64).bfloat16()  # (bs, seqlen, dim), a decode step of two sequences
    exact, bound = _bound(x.reshape(2, 64), w)
    got = gemv.matmul(x, w)
    assert got.shape == (2, 1, 40) and ((got.reshape(2, 40).double() - exact).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="at most 4 rows of x, got 5"):
        gemv.matmul(torch.randn(5, 64).bfloat16(), w)
    with pytest.raises(RuntimeError, match="must be both float32 or both bfloat16"):
        gemv.matmul(torch.randn(1, 64), w)
    with pytest.raises(RuntimeError, match="x has 32 columns, the weight 64"):
        gemv.matmul(torch.randn(1, 32).bfloat16(), w)


def test_gemv_linear_sends_the_kernel_only_its_products(monkeypatch):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=False, dtype=torch.bfloat16)
    layer = GemvLinear.from_linear(linear)
    assert layer.weight is linear.weight  # nothing copied
    calls = []
    monkeypatch.setattr(gemv, "matmul", lambda x, w: calls.append(x.shape) or F.linear(x, w))
    with torch.no_grad():
        layer(torch.randn(1, 1, 96).bfloat16())  # a decode step: the kernel
        layer(torch.randn(4, 96).bfloat16())  # MAX_ROWS rows: the kernel
        assert calls == [(1, 1, 96), (4, 96)]
        prompt = torch.randn(1, 7, 96).bfloat16()  # more rows: F.linear, bit for bit
        assert torch.equal(layer(prompt), F.linear(prompt, linear.weight))
        x32 = torch.randn(1, 96)  # x and W of two dtypes: F.linear (which refuses the mix, as nn.Linear does)
        with pytest.raises(RuntimeError):
            layer(x32)
        assert len(calls) == 2
    x = torch.randn(1, 96, dtype=torch.bfloat16, requires_grad=True)  # a gradient to compute: F.linear
    layer(x).float().sum().backward()
    assert calls == [(1, 1, 96), (4, 96)] and x.grad is not None


def test_float32_prompts_run_onednn_on_the_plain_weight(monkeypatch):
    """More than MAX_ROWS float32 rows go through oneDNN's linear kernel on the layer's own weight (F.linear's
    float32 kernel is several times slower on AMD CPUs), with float32 sums: within the float32 summation bound of
    the exact product, as F.linear is."""
    if not gemv._HAS_ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear op")
    torch.manual_seed(1)
    layer = GemvLinear.from_linear(nn.Linear(2048, 300, bias=False))
    calls = []
    path = GemvLinear._path
    monkeypatch.setattr(GemvLinear, "_path", lambda self, x: calls.append((x.shape, path(self, x))) or path(self, x))
    monkeypatch.setattr(gemv, "matmul", lambda x, w: pytest.fail("a prompt reached the kernel"))
    x = torch.randn(2, 9, 2048)
    with torch.no_grad():
        got = layer(x)
    assert calls == [((2, 9, 2048), "oneDNN")] and got.shape == (2, 9, 300) and got.dtype == torch.float32
    exact, bound = _bound(x, layer.weight.detach())
    assert ((got.double() - exact).abs() <= bound).all()
    with torch.no_grad():
        bf16 = GemvLinear.from_linear(nn.Linear(2048, 300, bias=False, dtype=torch.bfloat16))
        assert path(bf16, x.bfloat16()) == "F.linear"  # bf16 prompts keep F.linear


def test_use_gemv_keeps_checkpoints_and_tied_weights(hf_folder):
    folder, _ = hf_folder(seed=5, intermediate_size=256, tie_word_embeddings=True)
    model = Transformer.from_pretrained(folder, dtype=torch.bfloat16, pack=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    swapped = use_gemv(model)
    assert swapped == 7 * model.args.n_layers + 1  # wq wk wv wo w1 w2 w3 per block, and the output layer
    assert model.output.weight is model.tok_embeddings.weight  # still one matrix
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert use_gemv(Transformer.from_pretrained(folder, dtype=torch.float16, pack=False)) == 0  # not float16


def _decode_logprobs(step, ids: list[int], start: int) -> torch.Tensor:
    """Log-probs of ids[i + 1] after ids[: i + 1], for i >= start, each from a one-token decode step of `step`
    (model or CompiledDecoder, cache set up) after a prefill of ids[:start]."""
    out = []
    with torch.inference_mode():
        step(torch.tensor([ids[:start]]), 0)
        for i in range(start, len(ids) - 1):
            logits = step(torch.tensor([[ids[i]]]), i, last_only=True)[0, -1]
            out.append(torch.log_softmax(logits.float(), -1)[ids[i + 1]])
    return torch.stack(out)


def test_compiled_bf16_decoding_is_as_close_to_float32_as_eager_bf16(demo_folder):
    """The trained demo model in bf16. The float32 model greedy-decodes 24 tokens; compiled bf16 steps (this
    kernel and the attention kernel inside the graph) and eager bf16 steps (F.linear) then score those tokens one
    decode step at a time. Both round every activation to bf16 (a relative 2^-8), so neither equals float32;
    compiled must be no further from it than eager bf16 is (it rounds less: attention sums in float32), and its own
    greedy continuation is float32's (eager bf16 picks another token at a near-tie, 7th token, on this prompt)."""
    torch._dynamo.reset()
    tokenizer = Tokenizer()
    prompt = "And the LORD spake unto Moses, saying,"
    fp32 = Llama(Transformer.from_pretrained(demo_folder, dtype=torch.float32, pack=False), tokenizer)
    reference = fp32.text_completion([prompt], max_gen_len=24, temperature=0, logprobs=True)[0]
    ids = tokenizer.encode(prompt, bos=True, eos=False) + reference.tokens
    start = len(ids) - len(reference.tokens)
    compiled = Llama(Transformer.from_pretrained(demo_folder, dtype=torch.bfloat16, pack=False), tokenizer,
                     compile=True)
    assert isinstance(compiled.model.output, GemvLinear)
    assert compiled.text_completion([prompt], max_gen_len=24, temperature=0)[0].tokens == reference.tokens
    eager = Transformer.from_pretrained(demo_folder, dtype=torch.bfloat16, pack=False)
    eager.setup_cache(1, len(ids))
    compiled.decoder.setup_cache(1, len(ids))
    truth = torch.tensor(reference.logprobs[1:])
    gap = {name: (_decode_logprobs(step, ids, start) - truth).abs().max().item()
           for name, step in (("eager", eager), ("compiled", compiled.decoder))}
    torch._dynamo.reset()
    print(f"bf16 decode-step log-probs vs float32: eager {gap['eager']:.1e}, compiled {gap['compiled']:.1e}")
    assert gap["compiled"] <= gap["eager"]
