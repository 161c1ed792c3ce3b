"""Measure the demo model on the held-out chapters of its corpus: the table of docs/demo_model.md.

    python examples/kjv_corpus.py                  # out/kjv/ (the same corpus the model was trained on)
    python examples/evaluate_demo.py               # prints the table; --json FILE also writes the numbers
    python examples/evaluate_demo.py --int4-only   # float32 and the INT4 g128 rows, and how they compare

Every row is the mean cross-entropy (nats/token) over the SAME held-out tokens: every token of the held-out
chapters after the first, predicted by the full 128256-way softmax. The model reads them in consecutive
windows of 256 tokens (examples/train.py's heldout_windows; a window's first target sees one token).

  * unigram: p(w) = (c(w) + a) / (N + a V) over the full vocabulary V, counts c from the training split;
  * bigram:  p(w | v) = lam c(v, w) / c(v) + (1 - lam) p_unigram(w)  (the unigram alone where c(v) = 0),
    conditioned on the previous token, which the model always has too (at a window's start, nothing more);
    a and lam are chosen on the training split alone: counts from its first 95%, scored on its last 5%;
  * the shipped model, in float32 (its bfloat16 weights exactly), then INT4 round-to-nearest
    (llama31.quant.quantize_model) at group sizes 32, 64 and 128, at 128 with the output layer INT4 too
    (quantize_output=True), both g128 models again with W4A8 (activations rounded to int8 per block of 32,
    Int4Linear backend "cpu_w4a8"), and the INT4 folder that examples/quantize.py writes (group 128,
    symmetric; embeddings and the output layer stay bfloat16).
Then, for the g128 models, how far their logits are from the float model's (the first 512 held-out
positions, over the trained vocabulary rows: the others are 0 in every model) and how much of their greedy
continuation of the recorded prompt (llama31/demo/record.json) is the float model's. Then a few sampled
continuations (temperature 0.8, top-p 0.9, a fixed seed).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ itself: train.py's windows
from train import FULL_VOCAB_SIZE, heldout_windows  # noqa: E402

SEQ_LEN = 256  # the training context: the windows the model reads the held-out text in
SAMPLE_PROMPTS = ["John 3\n\n", "Blessed are", "And it came to pass, when the king"]
GROUP_SIZES = (32, 64, 128)


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seq_len: int = SEQ_LEN, batch_size: int = 2) -> float:
    """Mean cross-entropy (nats/token) of a full-vocabulary model over ids[1:], in windows of seq_len.

    model: a llama31 Transformer (any layers); ids: (n,) real token ids. The logits of a batch are
    (batch_size, seq_len, 128256) float32: 260 MB at the default batch_size.
    """
    total, count = 0.0, 0
    windows = list(heldout_windows(ids, seq_len))
    for i in range(0, len(windows), batch_size):
        for inputs, targets in _same_length_batches(windows[i:i + batch_size]):
            logits = model(inputs)  # (b, seqlen, vocab_size)
            total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
    return total / count


@torch.no_grad()
def logit_differences(reference, model, ids: torch.Tensor, rows: torch.Tensor, positions: int = 512):
    """(max, mean) of |model logits - reference logits| over the first `positions` positions of ids (read in
    windows of SEQ_LEN, as heldout_loss reads them) and the vocabulary ids `rows` (a boolean (vocab_size,) mask)."""
    windows = list(heldout_windows(ids, SEQ_LEN))[:positions // SEQ_LEN]
    inputs = torch.stack([w[0] for w in windows])  # (positions // SEQ_LEN, SEQ_LEN)
    difference = (model(inputs) - reference(inputs))[..., rows].abs()  # (b, SEQ_LEN, rows)
    return difference.max().item(), difference.mean().item()


def greedy_continuation(model) -> list[int]:
    """The model's greedy continuation (token ids) of the prompt the export run recorded (llama31/demo/record.json)."""
    from llama31.demo import RECORD_FILE
    from llama31.generation import Llama
    from llama31.text import Tokenizer

    greedy = json.loads(RECORD_FILE.read_text())["greedy"]
    llama = Llama(model, Tokenizer(), max_batch_size=1)
    return llama.text_completion([greedy["prompt"]], max_gen_len=greedy["max_gen_len"], temperature=0)[0].tokens


def _same_length_batches(windows):
    by_length: dict[int, list] = {}
    for inputs, targets in windows:
        by_length.setdefault(len(inputs), []).append((inputs, targets))
    for group in by_length.values():
        yield torch.stack([w[0] for w in group]), torch.stack([w[1] for w in group])


# ---------------------------------------------------------------------------------------------- baselines
def unigram_logprobs(ids: np.ndarray, alpha: float, vocab_size: int = FULL_VOCAB_SIZE) -> np.ndarray:
    """log p(w) for every w of the vocabulary: add-alpha smoothed counts of ids. -> (vocab_size,) float64."""
    counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    return np.log((counts + alpha) / (counts.sum() + alpha * vocab_size))


def unigram_loss(fit: np.ndarray, test: np.ndarray, alpha: float) -> float:
    """Mean -log p(w) over test[1:] (the targets the model predicts) under a unigram fit on `fit`."""
    return float(-unigram_logprobs(fit, alpha)[test[1:]].mean())


def bigram_loss(fit: np.ndarray, test: np.ndarray, alpha: float, lam: float) -> float:
    """Mean -log p(w_t | w_t-1) over test[1:] under the bigram of `fit` interpolated with its unigram."""
    log_unigram = unigram_logprobs(fit, alpha)
    pairs = fit[:-1].astype(np.int64) * FULL_VOCAB_SIZE + fit[1:]  # each (v, w) as one integer
    keys, pair_counts = np.unique(pairs, return_counts=True)
    context_counts = np.bincount(fit[:-1], minlength=FULL_VOCAB_SIZE)
    prev, target = test[:-1].astype(np.int64), test[1:].astype(np.int64)
    position = np.searchsorted(keys, prev * FULL_VOCAB_SIZE + target)
    found = (position < len(keys)) & (keys[np.minimum(position, len(keys) - 1)] == prev * FULL_VOCAB_SIZE + target)
    c_vw = np.where(found, pair_counts[np.minimum(position, len(keys) - 1)], 0)
    c_v = context_counts[prev]
    p_unigram = np.exp(log_unigram[target])
    p_bigram = np.divide(c_vw, c_v, out=np.zeros(len(target)), where=c_v > 0)
    p = np.where(c_v > 0, lam * p_bigram + (1 - lam) * p_unigram, p_unigram)
    return float(-np.log(p).mean())


def fit_baselines(train: np.ndarray, heldout: np.ndarray) -> dict:
    """Choose alpha and lambda on the training split (first 95% / last 5%), then score the held-out tokens."""
    cut = int(0.95 * len(train))
    fit, check = train[:cut], train[cut:]
    alpha = min((1.0, 0.1, 0.01, 0.001, 0.0001), key=lambda a: unigram_loss(fit, check, a))
    lam = min(np.arange(0.05, 1.0, 0.05).round(2), key=lambda g: bigram_loss(fit, check, alpha, g))
    return {"alpha": alpha, "lambda": float(lam), "unigram": unigram_loss(train, heldout, alpha),
            "bigram": bigram_loss(train, heldout, alpha, float(lam))}


# ---------------------------------------------------------------------------------------------- the model
def int4_folder_loss(folder: Path, heldout: torch.Tensor, work: Path) -> tuple[float, str]:
    """Quantize the expanded demo folder with examples/quantize.py and measure the folder it writes."""
    from llama31.model import Transformer

    out = work / "demo-int4"
    command = [sys.executable, str(Path(__file__).with_name("quantize.py")), "--ckpt-dir", str(folder),
               "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    model = Transformer.from_pretrained(out, dtype=torch.float32, pack=False)
    shown = f"python examples/quantize.py --ckpt-dir {folder} --out {out}"
    return heldout_loss(model, heldout), shown


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="out/kjv", help="the corpus folder (examples/kjv_corpus.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    parser.add_argument("--int4-only", action="store_true", help="only the float32 model and the INT4 g128 "
                        "rows (output layer bfloat16 / INT4, W4A16 / W4A8) and their comparison: no baselines, "
                        "other group sizes, folder or samples")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llama31.demo import RECORD_FILE, build_demo_model, demo_checkpoint
    from llama31.generation import Llama
    from llama31.quant import quantize_model
    from llama31.text import Tokenizer

    train = np.load(Path(args.data) / "train.npy").astype(np.int64)
    heldout_np = np.load(Path(args.data) / "heldout.npy").astype(np.int64)
    heldout = torch.from_numpy(heldout_np)
    rows = {}
    started = time.perf_counter()
    baselines = {}
    if not args.int4_only:
        baselines = fit_baselines(train, heldout_np)
        rows[f"unigram (add-{baselines['alpha']:g}, training split)"] = baselines["unigram"]
        rows[f"bigram + unigram, lambda = {baselines['lambda']:.2f} (training split)"] = baselines["bigram"]

    model = build_demo_model(dtype=torch.float32)
    rows["demo model, float32 (= its bfloat16 weights)"] = heldout_loss(model, heldout)
    int4_g128 = {}
    for g in (128,) if args.int4_only else GROUP_SIZES:
        quantized = quantize_model(model, group_size=g)
        rows[f"demo model, INT4 g{g} (quantize_model)"] = heldout_loss(quantized, heldout)
        if g == 128:
            int4_g128["output layer bfloat16"] = quantized
    int4_g128["output layer INT4"] = quantize_model(model, group_size=128, quantize_output=True)
    rows["demo model, INT4 g128, output layer INT4 too (quantize_output=True)"] = heldout_loss(
        int4_g128["output layer INT4"], heldout)
    # W4A8: the same INT4 weights, activations rounded to int8 per block of 32 (llama31/quant/cpu_int4.py)
    for output, quantize_output in (("bfloat16", False), ("INT4", True)):
        w4a8 = quantize_model(model, group_size=128, quantize_output=quantize_output, backend="cpu_w4a8")
        rows[f"demo model, INT4 g128, output layer {output}, W4A8 (int8 activations)"] = heldout_loss(w4a8, heldout)
        int4_g128[f"output layer {output}, W4A8"] = w4a8
    command = None
    if not args.int4_only:
        with tempfile.TemporaryDirectory() as work:
            loss, command = int4_folder_loss(demo_checkpoint(), heldout, Path(work))
        rows["demo model, INT4 folder of examples/quantize.py (g128)"] = loss

    print(f"{len(heldout_np) - 1:,} held-out tokens (every 20th chapter), the same for every row\n")
    print("| model | cross-entropy (nats/token) | perplexity |")
    print("|---|---:|---:|")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} | {math.exp(value):.1f} |")
    if command:
        print(f"\nINT4 folder written by: {command}")

    trained_rows = model.output.weight.abs().sum(1) != 0  # the ids the corpus uses; the others' logits are 0
    float_ids = greedy_continuation(model)
    recorded = json.loads(RECORD_FILE.read_text())["greedy"]["ids"]
    comparison = {}
    print(f"\nINT4 g128 against the float32 model: |logit difference| over the first 512 held-out positions x "
          f"{int(trained_rows.sum()):,} trained vocabulary rows; greedy continuation of the recorded prompt (the "
          f"float model's is {'the recorded one' if float_ids == recorded else 'NOT the recorded one'})")
    for name, quantized in int4_g128.items():
        largest, mean = logit_differences(model, quantized, heldout, trained_rows)
        ids = greedy_continuation(quantized)
        same = next((i for i, (a, b) in enumerate(zip(ids, float_ids)) if a != b), min(len(ids), len(float_ids)))
        comparison[name] = {"max_abs_logit_difference": largest, "mean_abs_logit_difference": mean,
                            "greedy_tokens_equal_before_the_first_difference": same, "greedy_tokens": len(float_ids)}
        print(f"  {name}: max {largest:.3f}, mean {mean:.4f}; greedy continuation: {same}/{len(float_ids)} tokens "
              f"equal to the float model's before the first difference:\n    {Tokenizer().decode(ids)!r}")
    if args.int4_only:
        print(f"\n({time.perf_counter() - started:.0f} s)")
        if args.json:
            args.json.write_text(json.dumps({"heldout_tokens": len(heldout_np) - 1, "rows": rows,
                                             "int4_g128_vs_float": comparison}, indent=2) + "\n")
        return 0

    llama = Llama.build()
    samples = []
    for prompt in SAMPLE_PROMPTS:
        completion = llama.text_completion([prompt], max_gen_len=60, temperature=0.8, top_p=0.9, seed=31)[0]
        samples.append({"prompt": prompt, "text": completion.text, "stop": completion.stop_reason})
        print(f"\n--- {prompt!r} (temperature 0.8, top-p 0.9, seed 31)\n{prompt}{completion.text}")
    print(f"\n({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"heldout_tokens": len(heldout_np) - 1, "rows": rows,
                                         "int4_g128_vs_float": comparison, "baselines": baselines,
                                         "samples": samples}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
