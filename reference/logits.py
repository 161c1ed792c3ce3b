"""What a golden keeps of a model's outputs: top-k of each next-token distribution, and hidden-state summaries.

One position's logits z (vocab,) become
    lse           = log sum_v exp(z_v)                     the log-sum-exp (the softmax's normaliser)
    topk_logprobs = the k largest z_v - lse, descending    log-probabilities of the k most likely tokens
    topk_ids      = their token ids
so that the logits of those tokens are topk_logprobs + lse. Every adapter uses these functions, so all
engines' numbers are reduced the same way.
"""

from __future__ import annotations

import numpy as np
import torch


def topk_summary(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """logits (n, vocab), any float dtype -> topk_ids (n, k) int32, topk_logprobs (n, k) float32, lse (n,) float32.

    Computed in float32 (a bf16 engine's logits are upcast first, as its sampler would).
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)  # (n,)
    logprobs, ids = torch.log_softmax(z, dim=-1).topk(k, dim=-1)  # (n, k) each, descending
    return ids.to(torch.int32).cpu().numpy(), logprobs.cpu().numpy(), lse.cpu().numpy()


def hidden_summary(h: torch.Tensor) -> np.ndarray:
    """h (n, dim) hidden states of n positions -> (3, n) float32: per position mean, std (population), L2 norm.

    Reduced in float64 so that the summary adds no error of its own to the engine's numbers.
    """
    h = h.double()
    return torch.stack([h.mean(-1), h.std(-1, unbiased=False), h.norm(dim=-1)]).float().cpu().numpy()
