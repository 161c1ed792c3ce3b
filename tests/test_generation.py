"""Generation against HF transformers' generate(), top-p on a hand-written distribution, seeds, stops, errors."""

import pytest
import torch
from conftest import hf_greedy

from llama31 import Transformer
from llama31.generation import Llama
from llama31.sampling import sample, top_p_filter


@pytest.fixture(scope="module")
def tokenizer():
    from llama31.text import Tokenizer

    return Tokenizer()


@pytest.fixture
def tiny(hf_folder, tokenizer):
    """A tiny random model (vocab 320) wrapped in Llama; prompts are raw ids, stop tokens given explicitly."""
    folder, hf = hf_folder(seed=41, num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
    return Llama(Transformer.from_pretrained(folder), tokenizer), hf


def test_greedy_equals_hf_generate_token_for_token(tiny):
    llama, hf = tiny
    prompt = torch.randint(0, 320, (17,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, logprobs = llama.generate([prompt], max_gen_len=30, temperature=0, logprobs=True, stop_tokens=[])
    expected, logits = hf_greedy(hf, [prompt], 30)
    assert tokens == expected
    # logprobs of the chosen tokens: log_softmax of HF's raw logits (float32; ~1e-6 observed)
    hf_lp = torch.log_softmax(logits[0], -1).gather(-1, torch.tensor(expected[0])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(logprobs[0]), hf_lp, rtol=0, atol=1e-4)


def test_batch_of_unequal_prompts_equals_hf_with_left_padding(tiny):
    llama, hf = tiny
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 320, (n,), generator=g).tolist() for n in (5, 23, 12)]
    tokens, _ = llama.generate(prompts, max_gen_len=15, temperature=0, stop_tokens=[])
    expected, _ = hf_greedy(hf, prompts, 15)
    assert tokens == expected


def test_each_row_stops_at_its_own_stop_token(tiny):
    llama, _ = tiny
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 320, (n,), generator=g).tolist() for n in (6, 9)]
    free, _ = llama.generate(prompts, max_gen_len=12, temperature=0, stop_tokens=[])
    stop = free[0][4]  # row 0 produces this token at step 4; make it a stop token
    assert stop not in free[0][:4]
    stopped, _ = llama.generate(prompts, max_gen_len=12, temperature=0, stop_tokens=[stop])
    assert stopped[0] == free[0][:4]  # the stop token itself is not returned (Meta's behaviour)
    cut = free[1].index(stop) if stop in free[1] else 12
    assert stopped[1] == free[1][:cut]


def test_max_gen_len_per_row_and_echo(tiny):
    llama, hf = tiny
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13]]
    tokens, logprobs = llama.generate(prompts, max_gen_len=4, temperature=0, stop_tokens=[], echo=True,
                                      logprobs=True)
    assert [len(t) for t in tokens] == [7, 10]
    assert tokens[0][:3] == prompts[0] and tokens[1][:6] == prompts[1]
    with torch.no_grad():  # the prompt's logprobs: HF's logits at the previous position
        lp = torch.log_softmax(hf(torch.tensor([prompts[1]])).logits[0], -1)
    expected = [0.0] + [lp[i - 1, prompts[1][i]].item() for i in range(1, 6)]
    torch.testing.assert_close(torch.tensor(logprobs[1][:6]), torch.tensor(expected), rtol=0, atol=1e-4)


def test_same_seed_same_tokens_different_seed_different(tiny):
    llama, _ = tiny
    def run(seed):
        return llama.generate([[1, 2, 3]], max_gen_len=20, temperature=1.0, top_p=0.95, seed=seed, stop_tokens=[])[0]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_streaming_yields_the_same_tokens_as_generate(tiny):
    llama, _ = tiny
    steps = list(llama.stream([[4, 5, 6]], max_gen_len=6, temperature=0, stop_tokens=[]))
    assert [s.tokens[0] for s in steps if s.generated[0]] == llama.generate([[4, 5, 6]], 6, temperature=0,
                                                                             stop_tokens=[])[0][0]
    assert steps[-1].finished == [True] and [s.pos for s in steps] == list(range(3, 9))


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # sorted: 0.5 (mass before 0), 0.3 (0.5), 0.15 (0.8), 0.05 (0.95): p = 0.75 drops the last two
    kept, ids = top_p_filter(probs, 0.75)
    assert ids[0, :2].tolist() == [1, 3]
    torch.testing.assert_close(kept[0], torch.tensor([0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]))
    kept, _ = top_p_filter(probs, 0.4)  # the top token alone already reaches p
    assert kept[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    kept, _ = top_p_filter(probs, 1.0)
    assert (kept[0] > 0).all()
    g = torch.Generator().manual_seed(0)
    drawn = {sample(torch.log(probs), 1.0, 0.75, g).item() for _ in range(200)}
    assert drawn == {1, 3}
    assert sample(torch.tensor([[0.1, 3.0, 2.0]]), 0.0, 0.9).item() == 1  # temperature 0 is the argmax


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(prompt_tokens=[]), "non-empty list"),
    (dict(prompt_tokens=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompt_tokens=[[1, 400]]), r"outside 0\.\.319: \[400\]"),
    (dict(max_gen_len=0), "max_gen_len must be a positive integer"),
    (dict(max_gen_len=1020), r"prompt \(5 tokens\) \+ max_gen_len \(1020\) = 1025 exceeds the model's context of 1024"),
    (dict(prompt_tokens=[[1]] * 9), "9 prompts exceed max_batch_size 8"),
])
def test_invalid_arguments_are_rejected(tiny, kwargs, message):
    llama, _ = tiny
    call = dict(prompt_tokens=[[1, 2, 3, 4, 5]], max_gen_len=4)
    call.update(kwargs)
    with pytest.raises(ValueError, match=message):
        llama.generate(**call)


def test_demo_model_chat_completion_runs_and_is_reproducible():
    llama = Llama.build()  # the embedded demo model with the real tokenizer
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    a = llama.chat_completion([dialog], max_gen_len=8, seed=3)[0]
    b = llama.chat_completion([dialog], max_gen_len=8, seed=3)[0]
    assert a.tokens == b.tokens and len(a.tokens) >= 1
    assert a.prompt_tokens[:1] == [128000] and a.prompt_tokens[-4:] == [128006, 78191, 128007, 271]
    assert a.message.content == llama.tokenizer.decode(a.tokens) or a.message.tool_call is not None
    done = llama.text_completion(["The capital of France is"], max_gen_len=5, temperature=0)[0]
    assert done.prompt_tokens[0] == 128000 and len(done.tokens) <= 5
