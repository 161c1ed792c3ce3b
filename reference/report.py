"""The text of a check report: the header, a table per prompt, the first divergence, the figures, the hidden
states and RoPE frequencies, the verdict. reference.check decides; this module only words it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from reference.compare import hidden_state_error
from reference.fileformat import Doc

if TYPE_CHECKING:  # only for the annotations: check imports this module
    from reference.check import PromptReport, Tier


class ReportWriter:
    """Collects the lines of a check report, section by section, in the order check() calls them."""

    def __init__(self):
        self.lines: list[str] = []

    def line(self, s: str = "") -> None:
        self.lines.append(s)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"

    def header(self, golden: Doc, cand: Doc, tier: Tier) -> None:
        n_pos = sum(len(golden.results[p["name"]].ids) for p in golden.prompts)
        prov = golden.provenance
        self.line(f"reference.check, tier {tier.name}")
        self.line(f"  golden:    {golden.path}  ({len(golden.prompts)} prompts, {n_pos} positions, "
                  f"top-{golden.settings.get('top_k')}; {_producer(golden.producer)}"
                  + (f", checkpoint {prov.get('checkpoint', {}).get('name')}" if prov else "") + ")")
        self.line(f"  candidate: {cand.path}  ({_producer(cand.producer)})")
        self.line()

    def table(self, reports: list[PromptReport]) -> None:
        self.line(f"  {'prompt':<22}{'positions':>10}{'max |dlogprob|':>16}{'top-1':>12}{'mean KL':>10}  greedy")
        for r in reports:
            n = len(r.prompt.top1_same)
            dev = float(np.max(r.prompt.deviation()))
            if r.divergence is None:
                greedy = f"{r.g_len}/{r.g_len} ids equal"
            else:
                greedy = f"equal for {r.divergence} of {r.g_len}, then differs"
                if r.divergence >= min(r.g_len, r.c_len):
                    greedy = f"{r.c_len} ids vs the golden's {r.g_len}"
            self.line(f"  {r.name:<22}{n:>10}{dev:>16.2e}{int(r.prompt.top1_same.sum()):>7}/{n:<4}"
                      f"{float(np.mean(r.prompt.kl)):>10.1e}  {greedy}")
        self.line()

    def first_position(self, golden, cand, r: PromptReport, index, pos, tier) -> None:
        g = golden.results[r.name]
        token = g.ids[pos]
        where = (f"FIRST DIVERGENCE: prompt {r.name!r} (#{index}), position {pos} of {len(g.ids)} "
                 f"(the next-token distribution after prompt token {pos}, id {token})")
        self.line(where)
        rc = r.prompt
        if tier.logprob_tol is not None:
            if rc.max_abs[pos] >= rc.unlisted[pos]:
                self.line(f"  |dlogprob| = {rc.max_abs[pos]:.3e} on token {int(rc.worst_token[pos])} "
                          f"(golden {rc.golden_at[pos]:.6f}, candidate {rc.candidate_at[pos]:.6f})")
            else:
                self.line(f"  a token listed by only one side is off by at least {rc.unlisted[pos]:.3e} "
                          "(it is missing from the other side's top-k)")
        c = cand.results[r.name]
        self.line(f"  golden top-3:    {_top(g.topk_ids[pos], g.topk_logprobs[pos])}")
        self.line(f"  candidate top-3: {_top(c.topk_ids[pos], c.topk_logprobs[pos])}")

    def first_step(self, golden, r: PromptReport, index, step, tier) -> None:
        g = golden.results[r.name]
        self.line(f"FIRST DIVERGENCE: prompt {r.name!r} (#{index}): every prompt position agrees; the greedy "
                  f"continuation departs at generated step {step} (golden ids {g.gen_ids[:step + 1]})")
        if r.steps is not None and step < len(r.steps.max_abs):
            self.line(f"  |dlogprob| at that step: {r.steps.deviation()[step]:.3e}")

    def criteria(self, tier: Tier, f: dict) -> None:
        self.line()
        self.line(f"  max |dlogprob| {f['max_deviation']:.2e}   top-1 agreement {f['top1']:.4f}   "
                  f"mean KL {f['mean_kl']:.2e}   top-5 max |dlogprob| {f['max_top5_diff']:.2e}")
        for key in ("log-sum-exp", "last-position logprobs (all tokens)"):
            if key in f:
                self.line(f"  {key}: max difference {f[key]:.2e}")
        key = "exact KL at the last positions (mean)"
        if key in f:
            self.line(f"  {key}: {f[key]:.2e}")

    def layers(self, golden: Doc, cand: Doc, tier: Tier) -> str | None:
        gs, cs = golden.debug.get("layer_summaries"), cand.debug.get("layer_summaries")
        if not gs:
            return None
        if not cs:
            self.line(f"  hidden states: the candidate gave no layer summaries (debug.layer_summaries) of prompt "
                      f"{gs['prompt']!r}; adding them names the first layer that differs")
            return None
        try:
            err = hidden_state_error(gs, cs)
        except ValueError as e:
            self.line(f"  hidden states: cannot compare ({e})")
            return None
        names = gs.get("layers") or [f"layer {i}" for i in range(err.shape[0])]
        per_layer = err.max(1)
        bad = np.nonzero(per_layer > tier.hidden_tol)[0]
        detail = ", ".join(f"{n} {e:.1e}" for n, e in zip(names, per_layer))
        if not len(bad):
            self.line(f"  hidden states of {gs['prompt']!r} agree within {tier.hidden_tol:.0e} ({detail})")
            return None
        i = int(bad[0])
        pos = int(np.argmax(err[i] > tier.hidden_tol))
        before = f"; the layer before, {names[i - 1]}, agrees ({per_layer[i - 1]:.1e})" if i else ""
        self.line(f"  hidden states of {gs['prompt']!r}: first differ at {names[i]} (relative error "
                  f"{per_layer[i]:.1e} > {tier.hidden_tol:.0e}, first at position {pos}){before}")
        self.line(f"    per layer: {detail}")
        return names[i]

    def rope(self, golden: Doc, cand: Doc) -> None:
        g, c = golden.debug.get("rope_inv_freq"), cand.debug.get("rope_inv_freq")
        if g is None or c is None:
            return
        g, c = np.asarray(g, dtype=np.float64), np.asarray(c, dtype=np.float64)
        if g.shape != c.shape:
            self.line(f"  RoPE inverse frequencies: {c.shape[0]} given, the golden has {g.shape[0]} "
                      "(head_dim / 2): is head_dim right?")
            return
        rel = np.abs(c / g - 1)
        # float32 frequencies carry relative error ~6e-8; 1e-6 flags a different formula, not rounding
        if rel.max() <= 1e-6:
            self.line(f"  RoPE inverse frequencies agree (max relative error {rel.max():.1e})")
            return
        i = int(np.argmax(rel > 1e-6))
        self.line(f"  RoPE inverse frequencies differ from index {i} of {len(g)}: golden {g[i]:.6e}, candidate "
                  f"{c[i]:.6e} (golden / candidate = {g[i] / c[i]:.4g})")
        args = golden.model.get("args") or {}
        if args.get("rope_theta") and args.get("head_dim"):
            d = args["head_dim"]
            plain = args["rope_theta"] ** (-np.arange(0, d, 2, dtype=np.float64) / d)  # w_i = theta^(-2i/d)
            if plain.shape == c.shape and np.max(np.abs(c / plain - 1)) <= 1e-6:
                self.line("    the candidate's are the unscaled theta^(-2i/d): the llama3 scaling is not applied")
                return
        self.line("    compare the llama3 scaling: factor, low/high_freq_factor, original_max_position_embeddings")

    def verdict(self, tier: Tier, passed: bool, failures: list[str]) -> None:
        self.line()
        if passed:
            self.line(f"PASS (tier {tier.name})")
        else:
            self.line(f"FAIL (tier {tier.name}):")
            for f in failures[:12]:
                self.line(f"  - {f}")
            if len(failures) > 12:
                self.line(f"  - ... and {len(failures) - 12} more")


def _producer(p: dict) -> str:
    return " ".join(str(p[k]) for k in ("engine", "version", "dtype", "device") if p.get(k)) or "producer unknown"


def _top(ids, lps, n=3) -> str:
    return ", ".join(f"{int(t)} ({lp:.4f})" for t, lp in zip(ids[:n], lps[:n]))
