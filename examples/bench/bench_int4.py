"""CPU benchmark of INT4 (W4A16) against float weights: single layers at decode shapes, then a whole model.

    python examples/bench/bench_int4.py              decode shapes of the 8B model + a ~1.2B-parameter model decoding
    python examples/bench/bench_int4.py --quick      a few seconds: tiny shapes and a tiny model (used by the tests)
    python examples/bench/bench_int4.py --json out.json
    python examples/bench/bench_int4.py --threads 1  the steadiest numbers on a machine shared with other work (a
                                               2-thread op stalls whenever either thread is descheduled)

1. Layers, batch 1 (one token, as in decoding): y = x @ W.T for W [N, K] in fp32 and bf16 (F.linear, and
   llama31's PackedLinear, its weight in oneDNN's layout, the default on a CPU), and Int4Linear's reference path
   (unpack + dequantize + matmul: slow by design) and its fused CPU path
   (torch's int4 op, bf16 activations). Decoding reads every weight once per token, so time ~ bytes.
2. Layers, many rows (--prefill-rows, default 1024: a prompt being prefilled): bf16 F.linear and packed, and
   Int4Linear's CPU path both ways: torch's int4 op (a matrix-vector kernel, whose time grows with every row)
   and the dequantize-then-matmul route it takes from cpu_fused.DEQUANTIZE_MIN_ROWS rows on.
3. Model: a random model of the Llama 3.2 1B shape (1.24 B parameters, the smallest Llama 3.x) decoding
   greedily at batch 1 with a KV cache, in fp32, bf16 (packed weights, as from_pretrained loads them on a CPU)
   and INT4 (g128, bf16 activations; the output layer packed bf16): tokens/s, the ratio to fp32, and the bytes
   of the quantized linear weights against the same weights in bf16.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import torch
import torch.nn.functional as F

from llama31 import ModelArgs, Transformer
from llama31.cpu.packed import PackedLinear, pack_weights, unpack_weights
from llama31.quant import Int4Linear, cpu_fused, quantize_model

DECODE_SHAPES = [  # (name, N, K) of the 8B model
    ("wq / wo 4096x4096", 4096, 4096),
    ("wk / wv 1024x4096", 1024, 4096),
    ("w1 / w3 14336x4096", 14336, 4096),
    ("w2 4096x14336", 4096, 14336),
]
QUICK_SHAPES = [("256x512", 256, 512), ("512x256", 512, 256)]


def best_time(fn, iters: int, warmup: int = 1) -> float:
    """The fastest of `iters` calls, in seconds: the least disturbed by other work on a shared machine."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_layers(shapes, iters: int, group_size: int) -> list[dict]:
    rows = []
    for name, n, k in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) * 0.02
        x = torch.randn(1, k)
        w_bf16, x_bf16 = w.bfloat16(), x.bfloat16()
        layer = Int4Linear.from_float(w_bf16, group_size, dtype=torch.bfloat16)
        int4_bytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        times = {
            "fp32 F.linear": (best_time(lambda: F.linear(x, w), iters), w.numel() * 4),
            "bf16 F.linear": (best_time(lambda: F.linear(x_bf16, w_bf16), iters), w.numel() * 2),
        }
        for path, weight, inputs in (("fp32 packed", w, x), ("bf16 packed", w_bf16, x_bf16)):
            packed = PackedLinear(weight)
            with torch.no_grad():
                times[path] = (best_time(lambda: packed(inputs), iters), weight.numel() * weight.element_size())
        layer.backend = "reference"
        times["int4 reference"] = (best_time(lambda: layer(x_bf16), max(1, iters // 10)), int4_bytes)
        layer.backend = "cpu_fused"
        layer(x_bf16)  # the one-time repack happens here, outside the timing
        times["int4 cpu_fused"] = (best_time(lambda: layer(x_bf16), iters), int4_bytes)
        fp32 = times["fp32 F.linear"][0]
        for path, (seconds, nbytes) in times.items():
            rows.append({"shape": name, "path": path, "ms": seconds * 1e3, "GB/s": nbytes / seconds / 1e9,
                         "speedup_vs_fp32": fp32 / seconds})
        gc.collect()
    return rows


def bench_prefill_layers(shapes, rows: int, iters: int, group_size: int) -> list[dict]:
    """y = x @ W.T with `rows` rows of bf16 activations: bf16 weights against INT4's two CPU routes."""
    out = []
    for name, n, k in shapes:
        torch.manual_seed(0)
        w_bf16 = (torch.randn(n, k) * 0.02).bfloat16()
        x = torch.randn(rows, k).bfloat16()
        packed = PackedLinear(w_bf16)
        layer = Int4Linear.from_float(w_bf16, group_size, dtype=torch.bfloat16, backend="cpu_fused")
        with torch.no_grad():
            times = {"bf16 F.linear": best_time(lambda: F.linear(x, w_bf16), iters),
                     "bf16 packed": best_time(lambda: packed(x), iters)}
            threshold = cpu_fused.DEQUANTIZE_MIN_ROWS
            try:
                cpu_fused.DEQUANTIZE_MIN_ROWS = rows + 1  # force torch's op
                times["int4 op"] = best_time(lambda: layer(x), iters)
                cpu_fused.DEQUANTIZE_MIN_ROWS = 1  # force dequantize-then-matmul
                times["int4 dequantize+matmul"] = best_time(lambda: layer(x), iters)
            finally:
                cpu_fused.DEQUANTIZE_MIN_ROWS = threshold
        for path, seconds in times.items():
            out.append({"shape": name, "rows": rows, "path": path, "ms": seconds * 1e3,
                        "x bf16 F.linear": times["bf16 F.linear"] / seconds})
        gc.collect()
    return out


def print_prefill_table(rows) -> None:
    print(f"\n{'shape':<22} {'path':<24} {'rows':>5} {'ms':>9} {'x bf16':>7}")
    for r in rows:
        print(f"{r['shape']:<22} {r['path']:<24} {r['rows']:>5} {r['ms']:>9.2f} {r['x bf16 F.linear']:>7.2f}")


def decode_tokens_per_s(model, prompt_len: int, new_tokens: int) -> float:
    """Greedy decoding at batch 1 with a KV cache; times the decode steps only (not the prefill)."""
    model.setup_cache(1, prompt_len + new_tokens)
    tokens = torch.randint(0, model.args.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens, 0, last_only=True)
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        model(next_token, prompt_len)  # warm-up step (first-call allocations, the INT4 repack)
        start = time.perf_counter()
        for step in range(new_tokens - 1):
            logits = model(next_token, prompt_len + 1 + step)
            next_token = logits[:, -1].argmax(-1, keepdim=True)
        elapsed = time.perf_counter() - start
    model.clear_cache()
    return (new_tokens - 1) / elapsed


def linear_bytes(model) -> tuple[int, int]:
    """(bytes of the block linears as stored, bytes of the same weights in bf16)."""
    stored = bf16 = 0
    for module in model.modules():
        if isinstance(module, Int4Linear):
            stored += sum(t.numel() * t.element_size() for t in module.state_dict().values())
            bf16 += module.in_features * module.out_features * 2
    return stored, bf16


def bench_model(args: ModelArgs, group_size: int, prompt_len: int, new_tokens: int) -> dict:
    results = {"model": {"dim": args.dim, "n_layers": args.n_layers, "vocab_size": args.vocab_size,
                         "hidden_dim": args.hidden_dim}}
    torch.manual_seed(0)
    model = Transformer(args, dtype=torch.float32)
    results["params"] = sum(p.numel() for p in model.parameters())
    pack_weights(model)
    results["fp32 tok/s"] = decode_tokens_per_s(model, prompt_len, new_tokens)
    unpack_weights(model)
    model = model.to(torch.bfloat16)
    pack_weights(model)
    gc.collect()
    results["bf16 tok/s"] = decode_tokens_per_s(model, prompt_len, new_tokens)
    unpack_weights(model)
    quantized = quantize_model(model, group_size)  # a bf16 model: bf16 scales, norms and embeddings
    pack_weights(quantized)
    del model
    gc.collect()
    results["int4 tok/s"] = decode_tokens_per_s(quantized, prompt_len, new_tokens)
    results["int4 linear bytes"], results["bf16 linear bytes"] = linear_bytes(quantized)
    return results


def print_layer_table(rows) -> None:
    print(f"{'shape':<22} {'path':<16} {'ms':>9} {'GB/s':>7} {'x fp32':>7}")
    for r in rows:
        print(f"{r['shape']:<22} {r['path']:<16} {r['ms']:>9.3f} {r['GB/s']:>7.1f} {r['speedup_vs_fp32']:>7.2f}")


def print_model_table(r) -> None:
    m = r["model"]
    print(f"\nmodel: dim {m['dim']}, {m['n_layers']} layers, FFN {m['hidden_dim']}, vocab {m['vocab_size']} "
          f"({r['params'] / 1e9:.2f} B parameters), batch 1 greedy decoding")
    for name in ("fp32", "bf16", "int4"):
        tps = r[f"{name} tok/s"]
        print(f"  {name:<5} {tps:8.2f} tok/s   x{tps / r['fp32 tok/s']:.2f} vs fp32")
    print(f"  block linear weights: int4 {r['int4 linear bytes'] / 2**20:.1f} MiB vs bf16 "
          f"{r['bf16 linear bytes'] / 2**20:.1f} MiB (ratio {r['int4 linear bytes'] / r['bf16 linear bytes']:.3f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and model: a smoke run of a few seconds")
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model decoding part")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--iters", type=int, help="timed calls per layer measurement (default 20, quick 3)")
    parser.add_argument("--prefill-rows", type=int, help="rows of the many-row layer timings (default 1024, "
                        "quick 128)")
    parser.add_argument("--new-tokens", type=int, help="decoded tokens per model (default 32, quick 4)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.prefill_rows is not None and args.prefill_rows < 1:
        parser.error("--prefill-rows must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (3 if args.quick else 20)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")

    shapes = QUICK_SHAPES if args.quick else DECODE_SHAPES
    group_size = 32 if args.quick else args.group_size
    layer_rows = bench_layers(shapes, iters, group_size)
    print_layer_table(layer_rows)
    prefill_rows = bench_prefill_layers(shapes, args.prefill_rows or (128 if args.quick else 1024),
                                        max(1, iters // 5), group_size)
    print_prefill_table(prefill_rows)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "layers": layer_rows,
               "prefill_layers": prefill_rows}

    if not args.no_model:
        if args.quick:
            model_args = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=384,
                                   max_seq_len=64)
        else:
            model_args = ModelArgs.preset("llama3.2-1b").replace(max_seq_len=256)
        results["model"] = bench_model(model_args, group_size, prompt_len=8 if args.quick else 16,
                                       new_tokens=args.new_tokens or (4 if args.quick else 32))
        print_model_table(results["model"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
