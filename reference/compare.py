"""Comparing a candidate's top-k lists with the golden's, position by position.

Each side lists, per position, its k most likely tokens with their logprobs (k may differ between sides).
For a token both sides list, the difference is exact. For a token only one side lists, the other side's
logprob of it is not known but is bounded: it is at most that side's smallest listed logprob. So

    shared tokens:   |golden - candidate|                                  the logprob difference
    listed by one:   golden(t) - min(candidate's list)  (or vice versa)     a lower bound on the difference

and a position agrees within tol when both are <= tol. (Two engines that are each within tol/2 of the truth
always pass; a token pushed out of the other's list by a real error fails.)

KL divergence KL(golden || candidate) is estimated per position from the top-k lists over k + 1 bins: the
golden's k listed tokens and "everything else":

    p_t = exp(golden logprob of t),  p_rest = 1 - sum_t p_t
    q_t = exp(candidate logprob of t)  (a token the candidate does not list gets its upper bound, the
          candidate's smallest listed logprob),  q_rest = 1 - sum_t q_t  (at least 1e-9)
    KL ~= sum_t p_t log(p_t / q_t) + p_rest log(p_rest / q_rest)

Merging tokens into bins can only lower a KL divergence, so with exact q this is a lower bound; the tail bins
are small when k = 20 (the golden's top-20 hold most of the mass). Logprobs are logits minus the log-sum-exp,
so an engine that reports top-k logits and its lse gives the same numbers (reference/fileformat.py accepts both).
When both sides give the last position's full logits, the exact KL there is reported too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Q_REST_FLOOR = 1e-9


@dataclass
class RowComparison:
    """Per-row (position or step) figures; r rows."""

    max_abs: np.ndarray       # (r,) max |golden - candidate| over shared tokens (inf when a value is not finite)
    worst_token: np.ndarray   # (r,) the token of max_abs
    golden_at: np.ndarray     # (r,) golden logprob of worst_token
    candidate_at: np.ndarray  # (r,) candidate logprob of worst_token
    unlisted: np.ndarray      # (r,) largest lower bound from a token only one side lists (-inf if none)
    unlisted_golden: np.ndarray  # (r,) the same, over the golden's tokens only
    top1_same: np.ndarray     # (r,) bool
    kl: np.ndarray            # (r,) estimated KL(golden || candidate)

    def deviation(self) -> np.ndarray:
        """(r,) the larger of the two per-row error measures."""
        return np.maximum(self.max_abs, self.unlisted)


def compare_topk(g_ids: np.ndarray, g_lp: np.ndarray, c_ids: np.ndarray, c_lp: np.ndarray) -> RowComparison:
    """g_ids, g_lp: (r, kg); c_ids, c_lp: (r, kc); rows sorted by descending logprob."""
    r = g_ids.shape[0]
    same = g_ids[:, :, None] == c_ids[:, None, :]  # (r, kg, kc)
    g_listed_by_c = same.any(2)  # (r, kg)
    c_listed_by_g = same.any(1)  # (r, kc)
    c_at_g = np.where(g_listed_by_c, np.where(same, c_lp[:, None, :], 0.0).sum(2), np.nan)  # (r, kg)

    diff = np.abs(g_lp - c_at_g)
    diff = np.where(g_listed_by_c & ~np.isfinite(diff), np.inf, diff)  # NaN/inf from the engine: a failure
    any_shared = g_listed_by_c.any(1)
    worst = np.where(any_shared[:, None], np.nan_to_num(diff, nan=-1.0), -1.0).argmax(1)
    rows = np.arange(r)
    max_abs = np.where(any_shared, diff[rows, worst], np.inf)

    c_min, g_min = c_lp.min(1), g_lp.min(1)
    from_golden = np.where(~g_listed_by_c, g_lp - c_min[:, None], -np.inf).max(1)
    from_candidate = np.where(~c_listed_by_g, c_lp - g_min[:, None], -np.inf).max(1)
    unlisted = np.maximum(from_golden, from_candidate)
    unlisted = np.where(np.isnan(unlisted), np.inf, unlisted)

    # KL over k + 1 bins (module docstring)
    q_lp = np.where(g_listed_by_c, c_at_g, c_min[:, None])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        p, q = np.exp(g_lp), np.exp(q_lp)
        p_rest = np.clip(1.0 - p.sum(1), 0.0, None)
        q_rest = np.clip(1.0 - q.sum(1), Q_REST_FLOOR, None)
        kl = (p * (g_lp - q_lp)).sum(1) + np.where(p_rest > 0, p_rest * np.log(p_rest / q_rest), 0.0)
    kl = np.where(np.isfinite(kl), np.maximum(kl, 0.0), np.inf)

    return RowComparison(max_abs=max_abs, worst_token=g_ids[rows, worst], golden_at=g_lp[rows, worst],
                         candidate_at=c_at_g[rows, worst], unlisted=unlisted,
                         unlisted_golden=np.where(np.isnan(from_golden), np.inf, from_golden),
                         top1_same=g_ids[:, 0] == c_ids[:, 0], kl=kl)


def exact_kl(g_logits: np.ndarray, c_logits: np.ndarray) -> float:
    """KL(softmax(g) || softmax(c)) of one position's full logits (vocab,)."""
    g = g_logits - _logsumexp(g_logits)
    c = c_logits - _logsumexp(c_logits)
    return float(max(0.0, (np.exp(g) * (g - c)).sum()))


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def first_divergent_step(g_ids: list[int], c_ids: list[int]) -> int | None:
    """The first step at which two greedy continuations differ (a token, or one ending earlier); None if equal."""
    for j, (a, b) in enumerate(zip(g_ids, c_ids)):
        if a != b:
            return j
    return None if len(g_ids) == len(c_ids) else min(len(g_ids), len(c_ids))


def hidden_state_error(golden: dict, candidate: dict) -> np.ndarray:
    """(layers + 1, n) relative difference of the per-position summaries:
    max(|d mean| / std, |d std| / std, |d L2| / L2), each relative to the golden's std or L2 norm."""
    g_mean, g_std, g_l2 = (np.asarray(golden[k], dtype=np.float64) for k in ("mean", "std", "l2"))
    c_mean, c_std, c_l2 = (np.asarray(candidate[k], dtype=np.float64) for k in ("mean", "std", "l2"))
    if c_mean.shape != g_mean.shape:
        raise ValueError(f"layer summaries of shape {c_mean.shape}, the golden's are {g_mean.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.maximum.reduce([np.abs(c_mean - g_mean) / g_std, np.abs(c_std - g_std) / g_std,
                                 np.abs(c_l2 - g_l2) / g_l2])
    return np.where(np.isnan(err), np.inf, err)
