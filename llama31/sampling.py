"""Choosing the next token from the model's logits: greedy, temperature, and top-p (nucleus) sampling.

    temperature 0       greedy: the argmax
    temperature T > 0   probabilities softmax(logits / T), then top-p:
    top-p               sort the probabilities in decreasing order and keep the smallest prefix whose mass
                        reaches p (a token is dropped when the mass before it already exceeds p),
                        renormalise, and sample from it

Reproducible sampling needs an explicit torch.Generator: the same seed gives the same tokens.
"""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (bs, vocab) float32 -> next token ids (bs,) int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
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
    kept, ids = top_p_filter(probs, p)
    choice = torch.multinomial(kept, num_samples=1, generator=generator)  # (bs, 1): a rank in the sorted order
    return ids.gather(-1, choice).squeeze(-1)
