"""Prefill prompts of 16K to 128K tokens with chunked prefill, and show that memory grows linearly.

    python examples/bench/long_context.py                                # 16K, 32K, 64K, 128K (128K takes minutes)
    python examples/bench/long_context.py --lengths 16384,32768 --chunk 128

The model is tiny (dim 256, 2 layers, 4 query heads sharing 1 kv head, random weights) but has the real Llama 3.1
RoPE configuration (theta 500000, llama3 scaling with factor 8 from an 8K original context) and a 131072-token
context. Each prompt is prefilled through the KV cache ``--chunk`` positions at a time
(llama31.generation.prefill), so one forward's attention holds at most chunk x T scores, never T x T (at 128K a
single T x T float32 score matrix per head would be 64 GiB).

Each length runs in a fresh subprocess, so that its peak RSS is its own. Reported per length: prefill time,
the time of one decode step right after (it attends to all T cached positions; none after a full 131072-token
context, which leaves no position free), and the peak RSS above the process's RSS once the model is built,
next to what could dominate it:
    KV cache        n_layers x 2 (k, v) x n_kv_heads x head_dim x T x bytes per element
    scores          an upper bound: what a written-out attention would hold for one chunk (n_heads x chunk x T
                    float32, twice while softmax writes its output). llama31's prefill uses PyTorch's fused
                    attention kernel, which never materialises them, so the measured peak stays below KV+scores
                    and is dominated by the KV cache.
Both grow linearly in T; the MiB-per-1K-tokens column shows the slope between successive lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from llama31.config import ModelArgs, RopeScaling

ARGS = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=1024, hidden_dim=768,
                 rope_scaling=RopeScaling(), max_seq_len=131072)  # RopeScaling(): the 3.1 defaults (8, 1, 4, 8192)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kv_cache_bytes(length: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return ARGS.n_layers * 2 * ARGS.n_kv_heads * ARGS.head_dim * length * element


def score_bytes(length: int, chunk: int) -> int:
    """Two float32 buffers of one chunk's scores against all `length` keys: the upper bound of the docstring."""
    return 2 * ARGS.n_heads * min(chunk, length) * length * 4


def measure(length: int, chunk: int, dtype: torch.dtype) -> dict:
    """Run in a fresh process: build the model, prefill `length` random tokens, decode one more if there is room."""
    from llama31.generation import prefill
    from llama31.model import Transformer

    def status_kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1])

    torch.manual_seed(0)
    model = Transformer(ARGS, dtype=dtype).eval()
    tokens = torch.randint(0, ARGS.vocab_size, (1, length))
    with torch.inference_mode():  # one small forward first, so that one-time set-up is not in the peak
        model(tokens[:, :8])
    baseline = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    with torch.inference_mode():
        model.setup_cache(1, min(length + 1, ARGS.max_seq_len))
        start = time.perf_counter()
        logits = prefill(model, tokens, 0, chunk)  # (1, vocab)
        prefill_s = time.perf_counter() - start
        decode_ms = None
        if length < ARGS.max_seq_len:  # a full 131072-token context leaves no position to decode into
            start = time.perf_counter()
            model(logits.argmax(-1, keepdim=True), length)
            decode_ms = 1e3 * (time.perf_counter() - start)
    return {"length": length, "chunk": chunk, "prefill_s": prefill_s, "decode_ms": decode_ms,
            "peak_rss_above_model_bytes": (status_kib("VmHWM") - baseline) * 1024,
            "kv_cache_bytes": kv_cache_bytes(length, dtype), "score_bytes": score_bytes(length, chunk)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16384,32768,65536,131072",
                        help="comma-separated prompt lengths, each at most 131072 (default 16K, 32K, 64K, 128K)")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk, in tokens (default 128)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and KV cache (default fp32)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--out-json", help="also write the results here")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # one length, run by the parent
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.child:
        print(json.dumps(measure(opts.child, opts.chunk, DTYPES[opts.dtype])))
        return 0

    if not Path("/proc/self/clear_refs").exists():
        parser.error("the peak-memory measurement needs Linux (/proc/self/status and /proc/self/clear_refs)")
    lengths = [int(x) for x in opts.lengths.split(",") if x]
    if not lengths or min(lengths) < 1 or max(lengths) > ARGS.max_seq_len or opts.chunk < 1:
        parser.error(f"--lengths must be in 1..{ARGS.max_seq_len} and --chunk positive")
    print(f"model: dim {ARGS.dim}, {ARGS.n_layers} layers, {ARGS.n_heads} heads / {ARGS.n_kv_heads} kv head, "
          f"head_dim {ARGS.head_dim}, context {ARGS.max_seq_len}, llama3 RoPE {ARGS.rope_scaling}; {opts.dtype}, "
          f"chunk {opts.chunk}, {opts.threads} threads")
    head = (f"{'tokens':>8} {'prefill s':>10} {'tok/s':>8} {'decode ms':>10} {'peak MiB':>9} {'KV MiB':>8} "
            f"{'scores MiB':>11} {'KV+scores':>10} {'MiB/1K tok':>11}")
    print(head)
    rows, previous = [], None
    for length in lengths:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                             os.environ.get("PYTHONPATH", "")]))
        child = subprocess.run([sys.executable, __file__, "--child", str(length), "--chunk", str(opts.chunk),
                                "--dtype", opts.dtype, "--threads", str(opts.threads)],
                               capture_output=True, text=True, env=env)
        if child.returncode != 0:
            print(f"{length:>8} failed (exit {child.returncode}): {child.stderr.strip()[-500:]}")
            break
        row = json.loads(child.stdout.strip().splitlines()[-1])
        rows.append(row)
        peak, kv, scores = (row[k] / 2**20 for k in ("peak_rss_above_model_bytes", "kv_cache_bytes", "score_bytes"))
        slope = "" if previous is None else \
            f"{(peak - previous[1]) / ((length - previous[0]) / 1024):.2f}"
        decode = "-" if row["decode_ms"] is None else f"{row['decode_ms']:.1f}"
        print(f"{length:>8} {row['prefill_s']:>10.1f} {length / row['prefill_s']:>8.0f} {decode:>10} "
              f"{peak:>9.0f} {kv:>8.0f} {scores:>11.0f} {kv + scores:>10.0f} {slope:>11}", flush=True)
        previous = (length, peak)
    kv_per_1k = kv_cache_bytes(1024, DTYPES[opts.dtype]) / 2**20
    print(f"slope expected from the model: KV cache {kv_per_1k:.2f} MiB per 1K tokens + score buffers "
          f"{score_bytes(1024, opts.chunk) / 2**20:.2f} MiB per 1K tokens = "
          f"{kv_per_1k + score_bytes(1024, opts.chunk) / 2**20:.2f}")
    if opts.out_json:
        Path(opts.out_json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
