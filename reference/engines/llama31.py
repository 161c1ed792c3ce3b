"""llama31 as an engine: `python -m reference.engines.llama31 --ckpt-dir DIR --golden G --out CAND [--dtype]`.

Runs the golden's prompts through llama31's own paths: one forward per batch group for the prompt positions
(right-padded), and Llama.stream (greedy, KV cache, Meta-style right padding) for the continuation, whose
per-step logits a forward hook records. A prompt longer than CHUNK is prefilled in chunks through the KV cache
and continued from it. reference.make
builds every golden from this function's outputs.
"""

from __future__ import annotations

import sys
from functools import lru_cache, partial

import numpy as np
import torch

from llama31 import Llama, Transformer, __version__
from llama31.text import Tokenizer
from reference.engines.common import (
    EngineOutputs,
    chunked_prompt_then_greedy,
    parse_args,
    parser,
    read_golden,
    run_prompts,
    write_candidate,
)
from reference.logits import hidden_summary, topk_summary

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@torch.inference_mode()
def run(model: Transformer, golden: dict, *, summaries: bool = True) -> EngineOutputs:
    """Run `model` on the golden's prompts. golden: the golden's JSON (prompts, settings)."""
    out = run_prompts(golden, prompt_topk=partial(prompt_topk, model), greedy=partial(greedy, model),
                      long_prompt=partial(long_prompt, model))
    if summaries:
        out.layer_names, out.layer_summary = layer_summaries(model, golden["prompts"][0]["ids"])
        out.rope_inv_freq = model.rope.inv_freq.numpy()
    return out


def prompt_topk(model: Transformer, rows: list[list[int]], k: int):
    """Per row: top-k ids and logprobs and lse at every prompt position, and the last position's full logits."""
    device = model.tok_embeddings.weight.device
    width = max(len(r) for r in rows)
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # right-padded
    logits = model(tokens)  # (bs, width, vocab): causal, so a row's prompt positions never see its padding
    parts = []
    for row, r in zip(logits, rows):
        ids, lp, lse = topk_summary(row[:len(r)], k)
        parts.append((ids, lp, lse, row[len(r) - 1].float().cpu().numpy()))
    return parts


def long_prompt(model: Transformer, ids: list[int], k: int, max_new: int, stop_ids: list[int]):
    """A prompt longer than CHUNK (a real checkpoint's 16K-token probe): prefill it in chunks through the KV
    cache, then decode greedily from that cache. (One forward over 16K positions would hold a (16K, vocab)
    logits matrix.)"""
    device = model.tok_embeddings.weight.device
    model.setup_cache(1, len(ids) + max_new)
    try:
        return chunked_prompt_then_greedy(
            lambda tokens, start: model(torch.tensor([tokens], device=device), start)[0],  # (len(tokens), vocab)
            ids, k, max_new, stop_ids)
    finally:
        model.clear_cache()


def greedy(model: Transformer, rows: list[list[int]], max_new: int, stop_ids: list[int], k: int):
    """Greedy continuations through Llama.stream; per row: ids (stop token included) and per-step top-k."""
    llama = Llama(model, _tokenizer(), max_batch_size=len(rows))
    step_logits = []
    hook = model.register_forward_hook(lambda module, args, logits: step_logits.append(logits[:, -1]))
    generated = [[] for _ in rows]
    chosen_from = [[] for _ in rows]
    try:
        for step in llama.stream(rows, max_new, temperature=0.0, stop_tokens=stop_ids):
            logits = step_logits.pop()  # (bs, vocab): the distribution this step's tokens were chosen from
            for r in range(len(rows)):
                if step.generated[r]:
                    generated[r].append(step.tokens[r])
                    chosen_from[r].append(logits[r])
    finally:
        hook.remove()
    return [(g, *topk_summary(torch.stack(c), k)) for g, c in zip(generated, chosen_from)]


def layer_summaries(model: Transformer, ids: list[int]) -> tuple[list[str], np.ndarray]:
    """Mean, std and L2 norm per position of the embeddings and of every block's output: (layers + 1, 3, n)."""
    states = []
    record = lambda module, args, output: states.append(output[0])  # noqa: E731  (batch of one)
    hooks = [model.tok_embeddings.register_forward_hook(record)]
    hooks += [layer.register_forward_hook(record) for layer in model.layers]
    try:
        model(torch.tensor([ids], device=model.tok_embeddings.weight.device))
    finally:
        for h in hooks:
            h.remove()
    names = ["embeddings"] + [f"block {i}" for i in range(len(model.layers))]
    return names, np.stack([hidden_summary(h) for h in states])


@lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer()  # Llama wants one; with explicit stop ids and prompt ids the loop only reads pad_id


def producer(dtype: str, device: str) -> dict:
    return {"engine": "llama31", "version": __version__, "dtype": dtype, "device": str(device)}


def main(argv=None) -> int:
    args = parse_args(parser("python -m reference.engines.llama31", __doc__), argv)
    golden = read_golden(args.golden)
    model = Transformer.from_pretrained(args.ckpt_dir, dtype=DTYPES[args.dtype], device=args.device)
    outputs = run(model, golden)
    write_candidate(args.out, golden, outputs, producer(args.dtype, args.device))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
