"""Top-p via torch.topk is the full-sort top-p, bit for bit: the same kept probabilities, tokens and random draws."""

import pytest
import torch

from llama31.sampling import TOPK_GUESS, sample, sample_top_p, top_p_filter, top_p_filter_via_topk

VOCAB = 128256  # the real vocabulary: the size the shortcut is for


def reference_sample_top_p(probs, p, generator):
    """sample_top_p as it was before the shortcut: always the full sort."""
    kept, ids = top_p_filter(probs, p)
    return ids.gather(-1, torch.multinomial(kept, 1, generator=generator)).squeeze(-1)


def distributions(seed, bs=3):
    """Logits from peaked (a nucleus of a few tokens) to flat (a nucleus of most of the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    for spread in (0.5, 2.0, 4.0, 8.0):
        yield torch.randn(bs, VOCAB, generator=g) * spread


@pytest.mark.parametrize("temperature, p", [(0.6, 0.9), (1.0, 0.95), (0.3, 0.5), (1.0, 1.0)])
def test_topk_filter_equals_the_full_sort_when_it_answers(temperature, p):
    answered = 0
    for logits in distributions(seed=int(temperature * 10 + p * 100)):
        probs = torch.softmax(logits / temperature, dim=-1)
        kept, ids = top_p_filter_via_topk(probs, p)
        if kept is None:
            continue
        answered += 1
        expected_kept, expected_ids = top_p_filter(probs, p)
        assert torch.equal(kept, expected_kept)  # bit for bit, full width
        nonzero = int((expected_kept > 0).sum(-1).max())
        assert nonzero <= TOPK_GUESS and torch.equal(ids[:, :nonzero], expected_ids[:, :nonzero])
    if p < 1.0:
        assert answered >= 1  # the peaked distributions take the shortcut
    else:
        assert answered == 0  # p = 1 keeps the whole vocabulary: only the full sort can answer


def test_sampling_gives_the_same_tokens_and_leaves_the_generator_in_the_same_state():
    for i, logits in enumerate(distributions(seed=5)):
        probs = torch.softmax(logits / 0.6, dim=-1)
        fast, slow = torch.Generator().manual_seed(i), torch.Generator().manual_seed(i)
        for _ in range(5):
            assert torch.equal(sample_top_p(probs, 0.9, fast), reference_sample_top_p(probs, 0.9, slow))
        assert torch.equal(fast.get_state(), slow.get_state())


def test_ties_and_large_nuclei_fall_back_to_the_full_sort():
    probs = torch.softmax(torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 8, dim=-1)
    assert top_p_filter_via_topk(probs, 0.9)[0] is not None
    tied = probs.clone()
    tied[0, tied[0].argsort(descending=True)[:2]] = tied[0].max()  # the two most probable tokens tie
    tied /= tied.sum()
    assert top_p_filter_via_topk(tied, 0.9)[0] is None
    flat = torch.full((1, VOCAB), 1.0 / VOCAB)
    assert top_p_filter_via_topk(flat, 0.9)[0] is None
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(sample(torch.log(tied), 1.0, 0.9, g1), reference_sample_top_p(tied, 0.9, g2))
