"""How fast the CPU INT4 kernels stream weights from memory, against a plain read of the same bytes.

    python examples/bench/bench_int4_stream.py                 the 1B model's shapes, 2 threads, 512 MiB each
    python examples/bench/bench_int4_stream.py --threads 1 --mib 256 --rows 1,4
    python examples/bench/bench_int4_stream.py --quick --json out.json     two small shapes, 16 MiB (the tests)

Decoding reads every weight once per token, so a decode kernel is judged by the bytes it streams per second.
For each weight shape of the Llama 3.2 1B model (and its 128256 x 2048 output matrix), enough INT4 g128 copies
to fill --mib (far larger than the caches) are multiplied, one after the other, by --rows rows of x, by:

    torch op   torch's fused int4 CPU op (Int4Linear backend "cpu_fused", W4A16: bf16 activations)
    w4a16      our W4A16 kernel (backend "cpu_int4", what "auto" takes for decoding: bf16 activations)
    w4a8       our W4A8 kernel (backend "cpu_w4a8": activations rounded to int8 per 32)

and, in the same loop, a read: torch.amax over one float32 tensor of the same number of bytes. Reported: the
median of --reps rounds (each runs all four once), in ms and GB/s, and each kernel's fraction of the read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from llama31.quant import Int4Linear, cpu_fused, cpu_int4

SHAPES = [  # (name, N, K) of the Llama 3.2 1B model
    ("wq / wo 2048x2048", 2048, 2048),
    ("wk / wv 512x2048", 512, 2048),
    ("w1 / w3 8192x2048", 8192, 2048),
    ("w2 2048x8192", 2048, 8192),
    ("output 128256x2048", 128256, 2048),
]
QUICK_SHAPES = [("256x512", 256, 512), ("512x256", 512, 256)]


def bench_shape(n: int, k: int, mib: int, rows: int, reps: int, group_size: int = 128) -> dict:
    torch.manual_seed(0)
    copies = max(1, (mib << 20) // (n * k // 2))
    layers = [Int4Linear.from_float(torch.randn(n, k) * 0.02, group_size, dtype=torch.bfloat16)
              for _ in range(copies)]
    repacked = [layer._cpu_int4_weight() for layer in layers]  # torch's layout, built outside the clock
    nbytes = sum(t.numel() * t.element_size() for layer in layers for t in (layer.weight_packed, layer.weight_scale))
    block = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    calls = {
        "read": lambda: block.amax(),
        "torch op": lambda: [cpu_fused.matmul(x, w) for w in repacked],
        "w4a16": lambda: [cpu_int4.matmul(x, layer.weight_packed, layer.weight_scale, None, group_size)
                          for layer in layers],
        "w4a8": lambda: [cpu_int4.matmul_w4a8(x, layer.weight_packed, layer.weight_scale, None, group_size)
                         for layer in layers],
    }
    return {"bytes": nbytes, "copies": copies, **time_against_read(calls, nbytes, reps)}


def time_against_read(calls: dict, nbytes: int, reps: int) -> dict:
    """Each of calls (one of them named "read") once to warm up (page faults, a kernel's build), then all of
    them in turn, reps times, under inference_mode. Returns name -> the median's ms, GB/s of nbytes and
    fraction of the read's time."""
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()
        for _ in range(reps):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {name: {"ms": 1e3 * t, "GBps": nbytes / t / 1e9, "of_read": medians["read"] / t}
            for name, t in medians.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mib", type=int, default=512, help="bytes of INT4 weights per shape, in MiB")
    parser.add_argument("--rows", default="1,4", help="comma-separated rows of x (tokens in a decode step)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="two small shapes and 16 MiB: seconds, for the tests")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.mib = 16
    torch.set_num_threads(args.threads)
    why = cpu_int4.unsupported(2048, 128)
    if why:
        parser.error(f"our INT4 CPU kernels cannot run here: {why}")
    print(f"torch {torch.__version__}, {args.threads} threads, {args.mib} MiB of INT4 g128 weights per shape")
    results = {}
    for rows in (int(r) for r in args.rows.split(",")):
        for name, n, k in QUICK_SHAPES if args.quick else SHAPES:
            r = bench_shape(n, k, args.mib, rows, args.reps)
            results[f"rows {rows} {name}"] = r
            cells = "  ".join(f"{kernel} {r[kernel]['ms']:7.2f} ms {r[kernel]['GBps']:5.1f} GB/s"
                              + (f" ({r[kernel]['of_read']:.0%})" if kernel != "read" else "")
                              for kernel in ("read", "torch op", "w4a16", "w4a8"))
            print(f"rows {rows}  {name:20s} x{r['copies']:<3d} {cells}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
