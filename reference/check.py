"""Is a candidate's Llama 3.1 right? `python -m reference.check GOLDEN CANDIDATE [--tier fp32|bf16|int4]`.

Exit status 0 when the candidate passes the tier, 1 when it fails or the file is malformed. The report says
where the candidate first diverges: which prompt, which position (or generated step), which token, and, if
the candidate gave per-layer hidden-state summaries, which layer; and whether its RoPE frequencies agree.

Tiers (the numbers and why: TIERS below, and reference/README.md):
    fp32   the engine in float32: every top-k logprob within FP32_TOL of the golden, greedy ids identical
           (a step where the golden's two candidates are within 2 x FP32_TOL is a tie, not a failure)
    bf16   statistical: top-1 agreement, mean KL, largest logprob difference on the golden's top-5 tokens,
           and vLLM's rule at the first greedy divergence (each side's token in the other's top-5)
    int4   statistical, looser: top-1 agreement and mean KL
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field

import numpy as np

from reference.compare import RowComparison, compare_topk, exact_kl, first_divergent_step, hidden_state_error
from reference.fileformat import Doc, FormatError, load

# fp32 tolerance on logprobs. Two correct float32 engines differ by rounding only: different but equivalent
# operation orders (interleaved vs half-split RoPE, grouped vs repeated kv heads, fused kernels) leave a few
# ulps per operation, which accumulate to ~1e-6 on logprobs of magnitude ~10 (measured on the shipped goldens:
# HF transformers vs llama31 at most 5e-6, see README). Real mistakes are orders of magnitude larger: the
# smallest measured, an RMSNorm eps of 1e-6 instead of 1e-5, moves the logprobs by >= 1e-3. 1e-4 sits between,
# with a factor >= 20 of room on either side.
FP32_TOL = 1e-4


@dataclass(frozen=True)
class Tier:
    name: str
    logprob_tol: float | None = None            # every prompt position and compared step within this
    identical_greedy: bool = False              # greedy ids equal (ties allowed)
    min_top1: float | None = None               # fraction of prompt positions whose top token agrees
    max_mean_kl: float | None = None            # mean estimated KL(golden || candidate) over prompt positions
    max_top5_diff: float | None = None          # largest |d logprob| on the golden's top-5 tokens
    vllm_rule: bool = False                     # at the first greedy divergence, each token in the other's top-5
    hidden_tol: float = 1e-4                    # relative error of hidden-state summaries that counts as differing


TIERS = {
    "fp32": Tier("fp32", logprob_tol=FP32_TOL, identical_greedy=True, hidden_tol=1e-4),
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation): logprobs move by ~0.01-0.3. Measured on
    # the shipped goldens, llama31 and HF transformers (eager and sdpa) in bf16: top-1 agreement >= 0.973, mean
    # KL <= 7e-4, top-5 difference <= 0.23, vLLM's rule holds. The bounds leave a margin of 2-7x on each and are
    # in line with what a real bf16 Llama shows against fp32 (top-1 ~0.98-0.99, KL ~1e-4..1e-3).
    "bf16": Tier("bf16", min_top1=0.95, max_mean_kl=5e-3, max_top5_diff=0.5, vllm_rule=True, hidden_tol=3e-2),
    # 4-bit weights: a broken kernel (nibble order, scales, zero points, group mapping) gives near-random
    # outputs, KL >> 1; a correct one costs some accuracy. Plain round-to-nearest with groups of 32 measured on
    # the shipped goldens: KL 0.26 / 0.12, top-1 0.62 / 0.67 (random tiny models have no redundancy; real Llamas
    # show KL ~0.02-0.1, top-1 ~0.9: tighten with --max-kl / --min-top1 for a real checkpoint). The gross bugs
    # measured: KL >= 0.5 and top-1 <= 0.40. These bounds catch broken int4 engines, not poor quantizations.
    "int4": Tier("int4", min_top1=0.5, max_mean_kl=0.5, hidden_tol=0.3),
}


@dataclass
class PromptReport:
    name: str
    prompt: RowComparison
    steps: RowComparison | None
    divergence: int | None        # first greedy step where the ids differ (or one side ends), None if equal
    g_len: int
    c_len: int


@dataclass
class Report:
    tier: str
    passed: bool
    text: str
    failures: list[str] = field(default_factory=list)
    first: dict | None = None     # where the candidate first diverges: {"prompt", "index", "position"|"step", ...}
    first_layer: str | None = None
    figures: dict = field(default_factory=dict)


def check(golden: Doc, cand: Doc, tier: str | Tier = "fp32") -> Report:
    """Compare a validated candidate with its golden at a tier (a name in TIERS, or a Tier with other bounds);
    the report's text is what the CLI prints."""
    tier = TIERS[tier] if isinstance(tier, str) else tier
    tier_name = tier.name
    reports = [_compare_prompt(golden.results[p["name"]], cand.results[p["name"]]) for p in golden.prompts]
    out = _Writer()
    out.header(golden, cand, tier)
    out.table(reports)
    failures: list[str] = []
    first = _first_divergence(reports, golden, cand, tier, out)

    prompt_rows = [r.prompt for r in reports]
    top1 = float(np.mean(np.concatenate([r.top1_same for r in prompt_rows])))
    mean_kl = float(np.mean(np.concatenate([r.kl for r in prompt_rows])))
    worst = max(float(np.max(r.deviation())) for r in prompt_rows)
    top5 = _top5_diff(golden, cand)
    figures = {"max_deviation": worst, "top1": top1, "mean_kl": mean_kl, "max_top5_diff": top5}

    if tier.logprob_tol is not None:
        step_worst = max((float(np.max(r.steps.deviation())) for r in reports if r.steps is not None),
                         default=0.0)
        worst_all = max(worst, step_worst)
        figures["max_deviation"] = worst_all
        if worst_all > tier.logprob_tol:
            failures.append(f"top-k logprobs differ by up to {worst_all:.2e} (allowed {tier.logprob_tol:.0e})")
        failures += _fp32_extras(golden, cand, tier.logprob_tol, figures)
    if tier.identical_greedy:
        for r in reports:
            if r.divergence is None:
                continue
            if _is_tie(golden, cand, r, tier.logprob_tol):
                out.line(f"  note: prompt {r.name!r} departs from the golden's greedy ids at step {r.divergence}, at "
                         f"a tie (its top two within {2 * tier.logprob_tol:.0e}); later steps are not compared")
            else:
                failures.append(f"greedy ids differ: prompt {r.name!r} from step {r.divergence}")
    if tier.min_top1 is not None and top1 < tier.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {tier.min_top1}")
    if tier.max_mean_kl is not None and mean_kl > tier.max_mean_kl:
        failures.append(f"mean KL {mean_kl:.2e} > {tier.max_mean_kl:.0e}")
    if tier.max_top5_diff is not None and top5 > tier.max_top5_diff:
        failures.append(f"logprobs of the golden's top-5 tokens differ by up to {top5:.3f} > {tier.max_top5_diff}")
    if tier.vllm_rule:
        failures += _vllm_rule(golden, cand, reports)
    kls = [exact_kl(golden.results[n].last_logits, cand.results[n].last_logits) for n in golden.results
           if golden.results[n].last_logits is not None and cand.results[n].last_logits is not None]
    if kls:
        figures["exact KL at the last positions (mean)"] = float(np.mean(kls))

    out.criteria(tier, figures)
    first_layer = out.layers(golden, cand, tier)
    out.rope(golden, cand)
    passed = not failures
    out.verdict(tier, passed, failures)
    return Report(tier_name, passed, out.text(), failures, first, first_layer, figures)


# ---------------------------------------------------------------------------------------------- comparisons
def _compare_prompt(g, c) -> PromptReport:
    prompt = compare_topk(g.topk_ids, g.topk_logprobs, c.topk_ids, c.topk_logprobs)
    div = first_divergent_step(g.gen_ids, c.gen_ids)
    # steps with the same context on both sides: up to and including the first differing token
    m = min(len(g.gen_ids), len(c.gen_ids)) if div is None else min(div + 1, len(g.gen_ids), len(c.gen_ids))
    steps = compare_topk(g.gen_topk_ids[:m], g.gen_topk_logprobs[:m], c.gen_topk_ids[:m],
                         c.gen_topk_logprobs[:m]) if m else None
    return PromptReport(g.name, prompt, steps, div, len(g.gen_ids), len(c.gen_ids))


def _is_tie(golden: Doc, cand: Doc, r: PromptReport, tol: float) -> bool:
    """At the first differing step, were the two tokens within 2 x tol in the golden? (Then rounding decides.)"""
    j = r.divergence
    g, c = golden.results[r.name], cand.results[r.name]
    if j >= len(g.gen_ids) or j >= len(c.gen_ids):
        return False  # one side stopped, the other went on: not a rounding question
    lp = dict(zip(g.gen_topk_ids[j].tolist(), g.gen_topk_logprobs[j].tolist()))
    chosen, other = g.gen_ids[j], c.gen_ids[j]
    return other in lp and lp[chosen] - lp[other] <= 2 * tol


def _top5_diff(golden: Doc, cand: Doc) -> float:
    """Largest |d logprob| over the golden's top-5 tokens at every prompt position (for a token the candidate
    does not list: the lower bound of compare.py)."""
    worst = 0.0
    for p in golden.prompts:
        g, c = golden.results[p["name"]], cand.results[p["name"]]
        r = compare_topk(g.topk_ids[:, :5], g.topk_logprobs[:, :5], c.topk_ids, c.topk_logprobs)
        shared = np.where(np.isposinf(r.max_abs) & np.isfinite(r.unlisted_golden), -np.inf, r.max_abs)
        worst = max(worst, float(np.max(np.maximum(shared, r.unlisted_golden))))
    return worst


def _fp32_extras(golden: Doc, cand: Doc, tol: float, figures: dict) -> list[str]:
    """The optional arrays, when the candidate gives them: log-sum-exps and the last position's full logits."""
    failures = []
    lse_err, last_err = [], []
    for p in golden.prompts:
        g, c = golden.results[p["name"]], cand.results[p["name"]]
        if c.lse is not None and g.lse is not None:
            lse_err.append((float(np.max(np.abs(c.lse - g.lse))), p["name"]))
        if c.last_logits is not None and g.last_logits is not None:
            gl = g.last_logits - np.logaddexp.reduce(g.last_logits)
            cl = c.last_logits - np.logaddexp.reduce(c.last_logits)
            last_err.append((float(np.max(np.abs(cl - gl))), p["name"]))
    for what, errs in (("log-sum-exp", lse_err), ("last-position logprobs (all tokens)", last_err)):
        if errs:
            err, name = max(errs)
            figures[what] = err
            if not err <= tol:
                failures.append(f"{what} differ by up to {err:.2e} (prompt {name!r}; allowed {tol:.0e})")
    return failures


def _vllm_rule(golden: Doc, cand: Doc, reports: list[PromptReport]) -> list[str]:
    failures = []
    for r in reports:
        j = r.divergence
        if j is None:
            continue
        g, c = golden.results[r.name], cand.results[r.name]
        if j >= len(g.gen_ids) or j >= len(c.gen_ids):
            failures.append(f"vLLM rule: prompt {r.name!r}: one continuation ends at step {j}, the other goes on")
            continue
        g_tok, c_tok = g.gen_ids[j], c.gen_ids[j]
        if g_tok not in c.gen_topk_ids[j, :5] or c_tok not in g.gen_topk_ids[j, :5]:
            failures.append(f"vLLM rule: prompt {r.name!r} step {j}: golden token {g_tok} / candidate token "
                            f"{c_tok} not each in the other's top-5")
    return failures


def _first_divergence(reports, golden, cand, tier, out) -> dict | None:
    """Find and describe the first prompt position (then generated step) where the candidate departs."""
    tol = tier.logprob_tol
    for index, r in enumerate(reports):
        bad = r.prompt.deviation() > tol if tol is not None else ~r.prompt.top1_same
        if bad.any():
            pos = int(np.argmax(bad))
            first = {"prompt": r.name, "index": index, "position": pos}
            out.first_position(golden, cand, r, index, pos, tier)
            return first
        if r.steps is not None and tol is not None:
            bad_steps = r.steps.deviation() > tol
            if bad_steps.any():
                step = int(np.argmax(bad_steps))
                out.first_step(golden, r, index, step, tier)
                return {"prompt": r.name, "index": index, "step": step}
        if r.divergence is not None and (tol is None or not _is_tie(golden, cand, r, tol)):
            out.first_step(golden, r, index, r.divergence, tier)
            return {"prompt": r.name, "index": index, "step": r.divergence}
    out.line("no divergence: every prompt position and greedy step agrees" + (
        f" within {tol:.0e}" if tol is not None else " on the top token"))
    return None


# ---------------------------------------------------------------------------------------------- the report
class _Writer:
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("golden", help="the golden JSON file")
    parser.add_argument("candidate", help="the candidate JSON file written by your engine")
    parser.add_argument("--tier", choices=sorted(TIERS), default="fp32",
                        help="fp32 (default): tight; bf16 and int4: statistical")
    parser.add_argument("--fp32-tol", type=float, help=f"override the fp32 logprob tolerance ({FP32_TOL})")
    parser.add_argument("--max-kl", type=float, help="override the tier's mean-KL bound")
    parser.add_argument("--min-top1", type=float, help="override the tier's top-1 agreement bound")
    args = parser.parse_args(argv)
    try:
        golden = load(args.golden)
        cand = load(args.candidate, golden=golden)
    except FormatError as e:
        print(f"malformed file: {e}", file=sys.stderr)
        return 1
    tier = TIERS[args.tier]
    overrides = {"logprob_tol": args.fp32_tol if args.tier == "fp32" else None,
                 "max_mean_kl": args.max_kl, "min_top1": args.min_top1}
    tier = dataclasses.replace(tier, **{k: v for k, v in overrides.items() if v is not None})
    report = check(golden, cand, tier)
    print(report.text, end="")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
