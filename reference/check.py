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
import math
import sys
from dataclasses import dataclass, field

import numpy as np

from llama31.errors import check_number, run_command
from reference.compare import RowComparison, compare_topk, exact_kl, first_divergent_step
from reference.fileformat import Doc, FormatError, load
from reference.report import ReportWriter

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

    def __post_init__(self):
        # A bound that is NaN compares false with everything: every check would pass. Each must be a finite
        # number in its range (a negative tolerance would fail a perfect candidate).
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if value is not None:
                check_number(value, name, f"Tier {self.name!r}", minimum=low, maximum=high)


BOUNDS = {"logprob_tol": (0.0, None), "min_top1": (0.0, 1.0), "max_mean_kl": (0.0, None),
          "max_top5_diff": (0.0, None), "hidden_tol": (0.0, None)}


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
    out = ReportWriter()
    out.header(golden, cand, tier)
    out.table(reports)
    failures: list[str] = []
    first = _first_divergence(reports, golden, cand, tier, out)

    prompt_rows = [r.prompt for r in reports]
    top1 = float(np.mean(np.concatenate([r.top1_same for r in prompt_rows])))
    mean_kl = float(np.mean(np.concatenate([r.kl for r in prompt_rows])))
    worst = _worst(float(np.max(r.deviation())) for r in prompt_rows)
    top5 = _top5_diff(golden, cand)
    figures = {"max_deviation": worst, "top1": top1, "mean_kl": mean_kl, "max_top5_diff": top5}

    if tier.logprob_tol is not None:
        step_worst = _worst(float(np.max(r.steps.deviation())) for r in reports if r.steps is not None)
        worst_all = _worst((worst, step_worst))
        figures["max_deviation"] = worst_all
        if not worst_all <= tier.logprob_tol:
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
    # "not x <= bound": a NaN figure fails
    if tier.min_top1 is not None and not top1 >= tier.min_top1:
        failures.append(f"top-1 agreement {top1:.4f} < {tier.min_top1}")
    if tier.max_mean_kl is not None and not mean_kl <= tier.max_mean_kl:
        failures.append(f"mean KL {mean_kl:.2e} > {tier.max_mean_kl:.0e}")
    if tier.max_top5_diff is not None and not top5 <= tier.max_top5_diff:
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
            err, name = max(errs, key=lambda e: math.inf if math.isnan(e[0]) else e[0])
            figures[what] = err
            if not err <= tol:
                failures.append(f"{what} differ by up to {err:.2e} (prompt {name!r}; allowed {tol:.0e})")
    return failures


def _worst(errors) -> float:
    """The largest of some error figures, NaN counting as infinite (max() would skip a NaN after the first item,
    and a NaN error compares false with every tolerance); 0.0 for none."""
    return max((math.inf if math.isnan(e) else e for e in errors), default=0.0)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("golden", help="the golden JSON file")
    parser.add_argument("candidate", help="the candidate JSON file written by your engine")
    parser.add_argument("--tier", choices=sorted(TIERS), default="fp32",
                        help="fp32 (default): tight; bf16 and int4: statistical")
    parser.add_argument("--fp32-tol", type=_bound("logprob_tol"),
                        help=f"override the fp32 logprob tolerance ({FP32_TOL}); a finite number >= 0")
    parser.add_argument("--max-kl", type=_bound("max_mean_kl"),
                        help="override the tier's mean-KL bound; a finite number >= 0")
    parser.add_argument("--min-top1", type=_bound("min_top1"),
                        help="override the tier's top-1 agreement bound; a number in [0, 1]")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    def body() -> int:
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

    return run_command(body, debug=args.debug)


def _bound(name: str):
    """An argparse type for a tier bound: a float in BOUNDS[name]'s range (argparse reports the error)."""
    low, high = BOUNDS[name]

    def parse(text: str) -> float:
        try:
            return check_number(float(text), name, "reference.check", minimum=low, maximum=high)
        except ValueError:  # not a number, or out of range
            allowed = f"a finite number >= {low}" + (f" and <= {high}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None

    return parse


if __name__ == "__main__":
    sys.exit(main())
