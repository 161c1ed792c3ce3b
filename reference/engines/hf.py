"""HF transformers as an engine: `python -m reference.engines.hf --ckpt-dir DIR --golden G --out CAND [--dtype]`.

LlamaForCausalLM with eager attention (the tightest fp32 match; --attn sdpa to test that path). A Meta folder
is converted to an HF folder first (llama31.convert, in a temporary folder). Batch groups are left-padded
with an attention mask and explicit position ids, as HF users batch; the continuation is HF's own
generate() (greedy), whose raw per-step logits (output_logits) give the top-k.
"""

from __future__ import annotations

import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

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
PAD = 0  # the id written into padding positions; the attention mask hides them


def load(ckpt_dir, dtype: torch.dtype = torch.float32, device="cpu", attn: str = "eager"):
    """LlamaForCausalLM from an HF folder, or from a Meta folder converted to one."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from llama31.checkpoints import open_checkpoint

    hf_logging.disable_progress_bar()

    if open_checkpoint(ckpt_dir).format == "hf":
        return LlamaForCausalLM.from_pretrained(ckpt_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    from llama31.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        convert(ckpt_dir, Path(tmp) / "hf", to="hf")
        model = LlamaForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype, attn_implementation=attn)
        return model.to(device).eval()


@torch.inference_mode()
def run(model, golden: dict, *, summaries: bool = True) -> EngineOutputs:
    """Run an HF causal LM on the golden's prompts. golden: the golden's JSON (prompts, settings)."""
    out = run_prompts(golden, prompt_topk=partial(prompt_topk, model), greedy=partial(greedy, model),
                      long_prompt=partial(long_prompt, model))
    if summaries:
        out.layer_names, out.layer_summary = layer_summaries(model, golden["prompts"][0]["ids"])
        out.rope_inv_freq = model.model.rotary_emb.inv_freq.double().cpu().numpy()
    return out


def _left_padded(model, rows):
    """input_ids, attention_mask, position_ids (bs, width) for left-padded rows; positions count real tokens."""
    width = max(len(r) for r in rows)
    device = model.device
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def prompt_topk(model, rows, k):
    ids, mask, positions = _left_padded(model, rows)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (bs, width, vocab)
    parts = []
    for row, r in zip(logits, rows):
        row = row[row.shape[0] - len(r):]  # drop the left padding
        parts.append((*topk_summary(row, k), row[-1].float().cpu().numpy()))
    return parts


def long_prompt(model, ids, k, max_new, stop_ids):
    """A prompt longer than CHUNK: chunked prefill into a DynamicCache, then greedy decoding from it."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)

    def forward(tokens, start):
        positions = torch.arange(start, start + len(tokens), device=model.device)[None]
        return model(input_ids=torch.tensor([tokens], device=model.device), position_ids=positions, cache=cache,
                     use_cache=True).logits[0]  # (len(tokens), vocab)

    return chunked_prompt_then_greedy(forward, ids, k, max_new, stop_ids)


def greedy(model, rows, max_new, stop_ids, k):
    """HF generate(), greedy, left-padded; per row the ids up to and including the first stop id, and top-k."""
    from transformers import GenerationConfig

    ids, mask, _ = _left_padded(model, rows)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=list(stop_ids) or None,
                              pad_token_id=PAD, output_logits=True, return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    new = out.sequences[:, ids.shape[1]:]  # (bs, steps)
    logits = torch.stack(out.logits, dim=1)  # (bs, steps, vocab): raw logits before any processor
    results = []
    for r in range(len(rows)):
        gen = new[r].tolist()
        end = next((j + 1 for j, t in enumerate(gen) if t in stop_ids), len(gen))
        results.append((gen[:end], *topk_summary(logits[r, :end], k)))
    return results


def layer_summaries(model, ids):
    states = []

    def record(module, args, output):
        states.append((output[0] if isinstance(output, tuple) else output)[0])

    hooks = [model.model.embed_tokens.register_forward_hook(record)]
    hooks += [layer.register_forward_hook(record) for layer in model.model.layers]
    try:
        model(input_ids=torch.tensor([ids], device=model.device))
    finally:
        for h in hooks:
            h.remove()
    names = ["embeddings"] + [f"block {i}" for i in range(len(model.model.layers))]
    return names, np.stack([hidden_summary(h) for h in states])


def producer(dtype: str, device: str, attn: str) -> dict:
    import transformers

    return {"engine": "hf-transformers", "version": transformers.__version__, "dtype": dtype,
            "device": str(device), "attn_implementation": attn}


def main(argv=None) -> int:
    p = parser("python -m reference.engines.hf", __doc__)
    p.add_argument("--attn", default="eager", choices=["eager", "sdpa"], help="attention implementation")
    args = parse_args(p, argv)
    golden = read_golden(args.golden)
    model = load(args.ckpt_dir, DTYPES[args.dtype], args.device, args.attn)
    write_candidate(args.out, golden, run(model, golden), producer(args.dtype, args.device, args.attn))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
