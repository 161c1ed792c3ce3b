"""What every adapter shares: the golden's prompts and settings in, a candidate file out.

An adapter runs its engine on the golden's prompt ids (never re-tokenized) and reports, per prompt:
    the top-k of the next-token distribution at every prompt position (logits.topk_summary),
    the greedy continuation: up to max_new_tokens, stopping after the first of stop_ids, with the top-k of
    the distribution at each step,
and, if the engine can, the optional extras: log-sum-exps, the last position's full logits, per-layer
hidden-state summaries of the first prompt, the RoPE inverse frequencies.
Prompts that share a "batch" label are run as one batch (unequal lengths: the engine's padding is tested).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np
import torch

from reference.fileformat import FORMAT, FORMAT_VERSION, Tensors, load_json, save
from reference.logits import topk_summary

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class PromptOutputs:
    """One prompt's outputs. n: prompt length, k: top-k, g: generated tokens (stop token included)."""

    topk_ids: np.ndarray            # (n, k) int32
    topk_logprobs: np.ndarray       # (n, k) float32
    lse: np.ndarray                 # (n,) float32
    last_logits: np.ndarray | None  # (vocab,) float32
    gen_ids: list[int]
    gen_topk_ids: np.ndarray        # (g, k)
    gen_topk_logprobs: np.ndarray   # (g, k)
    gen_lse: np.ndarray             # (g,)


@dataclass
class EngineOutputs:
    results: dict[str, PromptOutputs] = field(default_factory=dict)
    layer_names: list[str] | None = None      # e.g. ["embeddings", "block 0", ...]
    layer_summary: np.ndarray | None = None   # (layers + 1, 3, n): mean, std, L2 norm per position, first prompt
    rope_inv_freq: np.ndarray | None = None   # (head_dim / 2,)


CHUNK = 2048  # prompts longer than this are prefilled in chunks (bounds the (chunk, vocab) logits held at once)


def run_prompts(golden: dict, *, prompt_topk, greedy, long_prompt) -> EngineOutputs:
    """The loop every adapter shares: the golden's prompts, batch group by batch group, through an engine's
    three functions (its model already bound, e.g. with functools.partial):

        prompt_topk(rows, k)                       -> per row (topk_ids, topk_logprobs, lse, last_logits)
        greedy(rows, max_new, stop_ids, k)         -> per row (gen_ids, gen_topk_ids, gen_topk_logprobs, gen_lse)
        long_prompt(ids, k, max_new, stop_ids)     -> both of the above for one prompt longer than CHUNK
    """
    settings = golden["settings"]
    k, max_new, stop_ids = settings["top_k"], settings["max_new_tokens"], settings["stop_ids"]
    prompts = golden["prompts"]
    out = EngineOutputs()
    for group in batches(prompts):
        rows = [list(prompts[i]["ids"]) for i in group]
        if len(rows) == 1 and len(rows[0]) > CHUNK:
            parts, gen = long_prompt(rows[0], k, max_new, stop_ids)
        else:
            parts, gen = prompt_topk(rows, k), greedy(rows, max_new, stop_ids, k)
        for i, (ids, lp, lse, last), (gen_ids, gids, glp, glse) in zip(group, parts, gen):
            out.results[prompts[i]["name"]] = PromptOutputs(ids, lp, lse, last, gen_ids, gids, glp, glse)
    return out


def chunked_prompt_then_greedy(forward, ids: list[int], k: int, max_new: int, stop_ids: list[int]):
    """An engine's long_prompt, given its forward(tokens, start) -> (len(tokens), vocab) logits of tokens at
    positions start .. start + len(tokens) - 1, each call extending one KV cache: prefill the prompt CHUNK
    tokens at a time (each chunk's logits summarised before the next), then decode greedily from that cache.
    Returns run_prompts' ([prompt parts], [greedy parts]) for the one row."""
    pieces, generated, chosen_from = [], [], []
    for start in range(0, len(ids), CHUNK):
        logits = forward(ids[start:start + CHUNK], start)  # (chunk, vocab)
        pieces.append(topk_summary(logits, k))
    last = logits[-1]
    while True:
        generated.append(int(last.argmax()))
        chosen_from.append(last)
        if generated[-1] in stop_ids or len(generated) == max_new:
            break
        last = forward(generated[-1:], len(ids) + len(generated) - 1)[-1]
    prompt = tuple(np.concatenate(p) for p in zip(*pieces))
    return [(*prompt, None)], [(generated, *topk_summary(torch.stack(chosen_from), k))]


def batches(prompts: list[dict]) -> list[list[int]]:
    """Indices of the prompts to run together: those sharing a "batch" label form one group (in the order of
    their first appearance); every other prompt runs alone."""
    groups: dict[object, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.get("batch") or ("alone", i), []).append(i)
    return list(groups.values())


def stop_reason(gen_ids: list[int], stop_ids: list[int]) -> str:
    return "stop" if gen_ids and gen_ids[-1] in stop_ids else "length"


def document(golden: dict, outputs: EngineOutputs, producer: dict, *, kind: str = "candidate"
             ) -> tuple[dict, Tensors]:
    """The JSON of a candidate (prompt names and ids copied from the golden) and its tensors."""
    tensors = Tensors()
    results = {}
    for p in golden["prompts"]:
        name, o = p["name"], outputs.results[p["name"]]
        r = {"prompt_topk_ids": tensors.put(f"{name}/prompt_topk_ids", o.topk_ids),
             "prompt_topk_logprobs": tensors.put(f"{name}/prompt_topk_logprobs", o.topk_logprobs),
             "prompt_lse": tensors.put(f"{name}/prompt_lse", o.lse)}
        if o.last_logits is not None:
            r["last_logits"] = tensors.put(f"{name}/last_logits", o.last_logits)
        r["continuation"] = {
            "ids": [int(t) for t in o.gen_ids],
            "stop_reason": stop_reason(o.gen_ids, golden["settings"]["stop_ids"]),
            "topk_ids": tensors.put(f"{name}/gen_topk_ids", o.gen_topk_ids),
            "topk_logprobs": tensors.put(f"{name}/gen_topk_logprobs", o.gen_topk_logprobs),
            "lse": tensors.put(f"{name}/gen_lse", o.gen_lse)}
        results[name] = r
    debug = {}
    if outputs.rope_inv_freq is not None:
        debug["rope_inv_freq"] = tensors.put("debug/rope_inv_freq", outputs.rope_inv_freq)
    if outputs.layer_summary is not None:
        s = outputs.layer_summary
        debug["layer_summaries"] = {
            "prompt": golden["prompts"][0]["name"], "layers": outputs.layer_names,
            "mean": tensors.put("debug/layer_mean", s[:, 0]), "std": tensors.put("debug/layer_std", s[:, 1]),
            "l2": tensors.put("debug/layer_l2", s[:, 2])}
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "producer": producer,
            "prompts": [{"name": p["name"], "ids": list(p["ids"])} for p in golden["prompts"]],
            "results": results}
    if debug:
        data["debug"] = debug
    return data, tensors


def write_candidate(path, golden: dict, outputs: EngineOutputs, producer: dict) -> None:
    data, tensors = document(golden, outputs, producer)
    save(path, data, tensors)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True, help="the checkpoint folder the golden was made from")
    p.add_argument("--golden", required=True, help="the golden JSON file whose prompts to run")
    p.add_argument("--out", required=True,
                   help="the candidate JSON file to write (arrays go to .safetensors beside it)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="the engine's compute dtype (default float32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice; 1 is fastest for the tiny "
                                               "checkpoints, and gives the goldens' exact numbers)")
    return p


def parse_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def read_golden(path) -> dict:
    """The golden's JSON (arrays resolved); an adapter needs only its prompts and settings."""
    return load_json(path)
