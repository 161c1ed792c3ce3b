"""Choosing the next token from the model's logits: greedy, temperature, and top-p (nucleus) sampling.

    temperature 0       greedy: the argmax
    temperature T > 0   probabilities softmax(logits / T), then top-p:
    top-p               sort the probabilities in decreasing order and keep the smallest prefix whose mass
                        reaches p (a token is dropped when the mass before it already exceeds p),
                        renormalise, and sample from it

Reproducible sampling needs an explicit torch.Generator: the same seed gives the same tokens.
"""

from __future__ import annotations

import math
import numbers

import torch

from llama31.errors import InputError, InputTypeError


def check_sampling(temperature, top_p, where: str = "sample") -> None:
    """The sampling arguments as a user passes them: temperature a finite number >= 0 (0 is greedy; an infinite
    one would sample uniformly over the vocabulary whatever the logits say), top_p a number in (0, 1].
    InputError (a ValueError) naming `where` and the argument otherwise."""
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputTypeError(where, key, f"must be a number, got {type(value).__name__} {value!r}")
    try:
        finite = math.isfinite(temperature)
    except OverflowError:  # an int too large for a float
        finite = False
    if not (finite and temperature >= 0):
        raise InputError(where, "temperature", f"must be >= 0 (0 is greedy) and finite, got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(where, "top_p", f"must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (bs, vocab) float32 -> next token ids (bs,) int64."""
    check_sampling(temperature, top_p)
    # one reduction per row, per step, checks every logit: a NaN makes the max NaN, and +inf makes it inf
    top = logits.amax(dim=-1, keepdim=True)  # (bs, 1)
    if not torch.isfinite(top).all():
        raise InputError("sample", "logits", "hold NaN or +inf: the model's weights or inputs are broken (a NaN in "
                         "the checkpoint, or an overflow in float16)")
    # A temperature below the logits' smallest normal float would round to 0 in their dtype (x / 0): take its
    # limit, greedy.
    if temperature < torch.finfo(logits.dtype).tiny:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if not torch.isfinite(top / temperature).all() or not torch.isfinite(logits.amin() / temperature):
        # a temperature so small that logits / T overflows: softmax of the shifted logits is the same
        # distribution (and tends to the argmax, the limit T -> 0) without inf - inf
        scaled = (logits - top) / temperature
    probs = torch.softmax(scaled, dim=-1)
    return sample_top_p(probs, top_p, generator)


def top_p_filter(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the nucleus of each row. probs: (bs, vocab), rows summing to 1.

    Returns (kept probabilities renormalised, sorted in decreasing order) and the token ids of those columns,
    both (bs, vocab); dropped tokens have probability 0.
    """
    probs_sorted, ids = probs.sort(dim=-1, descending=True)
    mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted  # mass of the tokens ranked above each one
    probs_sorted = probs_sorted.masked_fill(mass_before > p, 0.0)
    return probs_sorted / probs_sorted.sum(dim=-1, keepdim=True), ids


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one token per row from the top-p nucleus of probs (bs, vocab) -> (bs,) int64."""
    kept, ids = top_p_filter_via_topk(probs, p)
    if kept is None:  # the nucleus is large (a flat distribution) or tied near its edge: sort everything
        kept, ids = top_p_filter(probs, p)
    choice = torch.multinomial(kept, num_samples=1, generator=generator)  # (bs, 1): a rank in the sorted order
    return ids.gather(-1, choice).squeeze(-1)


# A real model's nucleus at p = 0.9 is usually a few to a few hundred tokens; sorting all 128256 probabilities
# to find it costs ~30 ms per step on a CPU core, torch.topk of 257 about 1 ms.
TOPK_GUESS = 256
# Kept ranks are decided on cumulative sums whose float rounding is a few 1e-8 at most: a margin of 1e-6
# above p makes "every rank after the top k is dropped" certain, not just likely.
_MASS_MARGIN = 1e-6


def top_p_filter_via_topk(probs: torch.Tensor, p: float, k: int = TOPK_GUESS
                          ) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """top_p_filter's result without sorting the vocabulary, or (None, None) when that cannot be guaranteed.

    Guaranteed when, in every row, the k most probable tokens already hold more than p (so every later rank
    is dropped) and no kept probability equals the next one (so the kept ranks are in the order a full sort
    gives them, whatever its tie-breaking). The kept probabilities come back full width (bs, vocab), zeros
    after rank k: exactly top_p_filter's tensor, so its renormalising sum and torch.multinomial's random draws
    are the same and sampling gives the same token, bit for bit. The ids come back for the first k ranks
    only: (bs, k).
    """
    vocab = probs.shape[-1]
    if k + 1 >= vocab or probs.device.type != "cpu":  # the guarantee rests on the CPU's sequential cumsum;
        return None, None                               # a GPU sorts 128K values in ~0.1 ms anyway
    top, ids = probs.topk(k + 1, dim=-1)  # (bs, k + 1), decreasing
    # the same cumulative sums as top_p_filter's: a prefix of a sequential scan does not depend on its length
    mass_before = top.cumsum(dim=-1) - top
    # a tie between a kept rank and the next one could be ordered either way by a full sort
    tie_in_nucleus = (top[:, :-1] <= top[:, 1:]) & (mass_before[:, :-1] <= p)
    if not (mass_before[:, k] > p + _MASS_MARGIN).all() or tie_in_nucleus.any():
        return None, None
    kept = torch.zeros_like(probs)
    kept[:, :k] = top[:, :k].masked_fill(mass_before[:, :k] > p, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True), ids[:, :k]
