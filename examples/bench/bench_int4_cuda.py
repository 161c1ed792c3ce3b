"""Check and time the fused INT4 CUDA path (llama31/quant/csrc) on a GPU; about 3 minutes on an H200.

    python examples/bench/bench_int4_cuda.py                    build the extension, check it, time it
    python examples/bench/bench_int4_cuda.py --json int4.json   also write every result
    python examples/bench/bench_int4_cuda.py --check-only       correctness only
    python examples/bench/bench_int4_cuda.py --device cpu --impl reference --quick
                                                          a dry run of the checking logic without a GPU

1. Correctness, against the reference (dequantize in fp32, then an fp32 matmul with TF32 off), for
   M in {1, 2, 3, 8, 16, 17, 64, 256} activation rows, the shapes (N x K) 4096x4096, 14336x4096,
   4096x14336, 28672x8192, 128256x4096 and 1003x4160 (N not a multiple of the kernel's 16-row tile,
   K not one of 128), group sizes 32 / 64 / 128, bf16 and fp16 activations, plus an asymmetric (zero
   point) layer. The output is filled with NaN first, so an element the kernel fails to write shows.
2. Timing (bf16, g128), CUDA events, CUDA graphs for M <= 16 (launch overhead out of the picture):
   ours against bf16 F.linear and torch's own int4 kernel (_weight_int4pack_mm, when this torch has it),
   with the card's device-to-device copy bandwidth measured in the same run as the roofline.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from llama31.quant.linear import int4_linear_reference
from llama31.quant.packing import dequantize, unpack_int4
from llama31.quant.rtn import quantize_weight

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192), (128256, 4096), (1003, 4160)]  # (N, K)
QUICK_SHAPES = [(256, 512), (67, 320)]
ROWS = [1, 2, 3, 8, 16, 17, 64, 256]
QUICK_ROWS = [1, 3, 17]
GROUP_SIZES = [32, 64, 128]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
HALF_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # relative rounding of one output value


# ---------------------------------------------------------------------------------------------- the paths
def make_impl(name: str):
    """The function under test: (x [M, K], tensors, group_size, out [M, N]) fills out."""
    if name == "cuda":
        from llama31.quant import cuda

        def run(x, tensors, group_size, out):
            cuda.int4_linear(x, tensors["weight_packed"], tensors["weight_scale"],
                             tensors.get("weight_zero_point"), group_size, out=out)
    else:  # the reference, copied into out: lets the checking logic itself run anywhere
        def run(x, tensors, group_size, out):
            out.copy_(int4_linear_reference(x, tensors["weight_packed"], tensors["weight_scale"],
                                            tensors.get("weight_zero_point")))
    return run


# ---------------------------------------------------------------------------------------------- correctness
def check_one(run, x, tensors, w32, group_size, *, rounded_weights: bool = False) -> dict:
    """Poison the output, run, and compare with the fp32 reference element by element.

    rounded_weights: the path rounds W to the 16-bit dtype before multiplying (dequantize + cuBLAS).
    """
    m, n = x.shape[0], w32.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device)
    run(x, tensors, group_size, out)
    unwritten = int(torch.isnan(out).sum())
    ref = x.float() @ w32.T  # (M, N), fp32, TF32 off
    # Error budget per element: the output's own rounding (half an ulp of |ref|), plus noise on the terms
    # x_k * w_k: fp32 accumulation in another order (relative 2**-24 per step; 2**-16 is a generous
    # allowance), or, when W is first rounded to 16 bits, half an ulp of every term. The noise is a sum
    # of independent errors: bounded via its standard deviation, sqrt(sum (x_k w_k)^2) * unit, times 6.
    # A wrong scale for one group of 16 is a ~1e-2 relative error; this budget is far below that for
    # the fused gemv path (the rounded-weights budget is looser, ~3e-2, but still sees layout errors).
    unit = HALF_ULP[x.dtype] if rounded_weights else 2.0**-16
    terms_rms = ((x.float() ** 2) @ (w32 ** 2).T).sqrt()
    tolerance = HALF_ULP[x.dtype] * ref.abs() + 6 * unit * terms_rms + 1e-6
    error = (out.float() - ref).abs()
    bad = int((error > tolerance).sum()) if unwritten == 0 else m * n
    mean_rel = float(error.nan_to_num(float("inf")).mean() / ref.abs().mean())
    return {"unwritten": unwritten, "out_of_tolerance": bad, "mean_rel_error": mean_rel,
            "ok": unwritten == 0 and bad == 0 and mean_rel <= 1e-2}


def run_checks(run, shapes, rows, device, log, *, max_gemv_rows: int | None = None) -> list[dict]:
    """Every (shape, group size, dtype, M) case; max_gemv_rows: above it the path rounds W (see check_one)."""
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        weight = torch.randn(n, k, device=device, generator=gen) * 0.02
        for group_size in GROUP_SIZES:
            if k % group_size:
                continue  # e.g. K = 4160 has no groups of 128
            for dtype_name, dtype in DTYPES.items():
                variants = [False, True] if (n, k) == shapes[0] and group_size == 128 else [False]
                for zero_point in variants:
                    tensors = quantize_weight(weight, group_size, symmetric=not zero_point, scale_dtype=dtype)
                    w32 = dequantize(**tensors)  # exact: (q - zp) * scale in fp32
                    x_all = torch.randn(max(rows), k, device=device, generator=gen).to(dtype)
                    for m in rows:
                        rounded = max_gemv_rows is not None and m > max_gemv_rows
                        r = check_one(run, x_all[:m].contiguous(), tensors, w32, group_size, rounded_weights=rounded)
                        r.update(N=n, K=k, M=m, group_size=group_size, dtype=dtype_name, zero_point=zero_point)
                        results.append(r)
                        if not r["ok"]:
                            log(f"FAIL {r}")
                    del w32
        del weight
        if device == "cuda":
            torch.cuda.empty_cache()
        log(f"checked {n}x{k}: {sum(r['ok'] for r in results if (r['N'], r['K']) == (n, k))} / "
            f"{sum(1 for r in results if (r['N'], r['K']) == (n, k))} cases pass")
    return results


# ---------------------------------------------------------------------------------------------- timing
def time_call(fn, use_graph: bool, calls: int = 20, repeats: int = 5) -> float:
    """Seconds per call of fn on the current stream, by CUDA events; graph-captured when use_graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if use_graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        step = graph.replay
    else:
        def step():
            for _ in range(calls):
                fn()
    step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (calls * repeats)


def copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy GB/s (bytes read + bytes written), the practical roofline of a memory-bound kernel."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), use_graph=False, calls=5, repeats=4)
    return 2 * nbytes / seconds / 1e9


def torch_int4_pack(tensors, group_size):
    """Our canonical tensors -> torch's tinygemm layout: (uint8 [N, K/2] high nibble first, then
    _convert_weight_to_int4pack) and scales_and_zeros [K/g, N, 2], dequant (u - 8) * scale + zero."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm") or "weight_zero_point" in tensors:
        return None
    k = tensors["weight_packed"].shape[1] * 8
    u = (unpack_int4(tensors["weight_packed"], k).to(torch.int32) + 8)  # (N, K), 0..15
    pairs = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8)  # (N, K/2)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)
    except Exception:
        return None
    scale = tensors["weight_scale"].to(torch.bfloat16)
    scales_and_zeros = torch.stack([scale.T, torch.zeros_like(scale.T)], dim=-1).contiguous()  # (K/g, N, 2)
    return packed, scales_and_zeros


def run_timing(shapes, rows, log) -> list[dict]:
    from llama31.quant import cuda

    results = []
    group_size, dtype = 128, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(1)
    for n, k in shapes:
        if k % group_size:
            continue
        weight = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(dtype)
        tensors = quantize_weight(weight, group_size, scale_dtype=dtype)
        int4_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        tiny = torch_int4_pack(tensors, group_size)
        x_all = torch.randn(max(rows), k, device="cuda", generator=gen).to(dtype)
        if tiny is not None:  # time torch's kernel only if it computes the same product (layout check)
            try:
                ours = cuda.int4_linear(x_all[:1], tensors["weight_packed"], tensors["weight_scale"], None,
                                        group_size).float()
                theirs = torch.ops.aten._weight_int4pack_mm(x_all[:1], tiny[0], group_size, tiny[1]).float()
                if float((ours - theirs).abs().mean() / ours.abs().mean()) > 2e-2:
                    log(f"torch int4 kernel disagrees at {n}x{k} (packing assumption wrong?): not timed")
                    tiny = None
            except Exception as e:
                log(f"torch int4 kernel unavailable at {n}x{k}: {type(e).__name__}: {str(e)[:80]}")
                tiny = None
        for m in rows:
            x = x_all[:m].contiguous()
            out = torch.empty(m, n, dtype=dtype, device="cuda")
            io_bytes = (m * k + m * n) * 2
            graph = m <= cuda.MAX_GEMV_ROWS
            row = {"N": n, "K": k, "M": m}
            row["ours_us"] = 1e6 * time_call(lambda t=tensors: cuda.int4_linear(
                x, t["weight_packed"], t["weight_scale"], None, group_size, out=out), graph)
            row["bf16_us"] = 1e6 * time_call(lambda w=weight: F.linear(x, w), graph)
            row["ours_GBps"] = (int4_bytes + io_bytes) / row["ours_us"] / 1e3
            row["bf16_GBps"] = (weight.numel() * 2 + io_bytes) / row["bf16_us"] / 1e3
            row["speedup_vs_bf16"] = row["bf16_us"] / row["ours_us"]
            if tiny is not None:
                try:
                    row["torch_int4_us"] = 1e6 * time_call(
                        lambda t=tiny: torch.ops.aten._weight_int4pack_mm(x, t[0], group_size, t[1]), graph)
                    row["speedup_vs_torch_int4"] = row["torch_int4_us"] / row["ours_us"]
                except Exception as e:  # shapes or dtypes this torch's kernel does not take
                    row["torch_int4_error"] = f"{type(e).__name__}: {str(e)[:80]}"
            results.append(row)
        del weight, tensors, tiny
        torch.cuda.empty_cache()
        log(f"timed {n}x{k}")
    return results


def print_timing(rows, bandwidth) -> None:
    print(f"\ncopy bandwidth (read + write): {bandwidth:.0f} GB/s\n")
    print(f"{'N x K':>14} {'M':>4} {'ours us':>9} {'GB/s':>6} {'%copy':>6} {'bf16 us':>9} {'GB/s':>6} "
          f"{'x bf16':>7} {'torch int4 us':>14} {'x torch':>8}")
    for r in rows:
        torch_us = f"{r['torch_int4_us']:.1f}" if "torch_int4_us" in r else "n/a"
        vs = f"{r['speedup_vs_torch_int4']:.2f}" if "speedup_vs_torch_int4" in r else "n/a"
        print(f"{r['N']:>7}x{r['K']:<6} {r['M']:>4} {r['ours_us']:>9.1f} {r['ours_GBps']:>6.0f} "
              f"{100 * r['ours_GBps'] / bandwidth:>5.0f}% {r['bf16_us']:>9.1f} {r['bf16_GBps']:>6.0f} "
              f"{r['speedup_vs_bf16']:>7.2f} {torch_us:>14} {vs:>8}")


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--impl", default="cuda", choices=["cuda", "reference"],
                        help="the path under test (reference: dry-run the checks, e.g. on CPU)")
    parser.add_argument("--quick", action="store_true", help="two small shapes and three row counts")
    parser.add_argument("--check-only", action="store_true", help="skip the timing")
    parser.add_argument("--json", help="write all results to this file")
    args = parser.parse_args(argv)
    if args.impl == "cuda" and args.device != "cuda":
        parser.error("--impl cuda needs --device cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch; for a CPU dry run use --device cpu --impl reference",
              file=sys.stderr)
        return 2

    def log(message):
        print(message, flush=True)

    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    report = {"torch": torch.__version__, "device": args.device, "impl": args.impl}
    if args.device == "cuda":
        report["gpu"] = torch.cuda.get_device_name()
    if args.impl == "cuda":
        from llama31.quant import cuda

        t0 = time.perf_counter()
        cuda.load_extension(verbose=False)
        report["build_s"] = time.perf_counter() - t0
        log(f"extension ready in {report['build_s']:.1f} s")

    shapes, rows = (QUICK_SHAPES, QUICK_ROWS) if args.quick else (SHAPES, ROWS)
    max_gemv_rows = None
    if args.impl == "cuda":
        from llama31.quant.cuda import MAX_GEMV_ROWS as max_gemv_rows
    checks = run_checks(make_impl(args.impl), shapes, rows, args.device, log, max_gemv_rows=max_gemv_rows)
    report["checks"] = checks
    failed = [c for c in checks if not c["ok"]]
    worst = max(c["mean_rel_error"] for c in checks)
    log(f"correctness: {len(checks) - len(failed)} / {len(checks)} cases pass "
        f"(worst mean relative error {worst:.2e})")

    if not args.check_only and args.device == "cuda" and args.impl == "cuda":
        report["copy_GBps"] = copy_bandwidth()
        report["timing"] = run_timing(shapes, rows, log)
        print_timing(report["timing"], report["copy_GBps"])
    elif not args.check_only:
        log("timing skipped: it needs --device cuda --impl cuda")
    report["elapsed_s"] = time.perf_counter() - started
    log(f"done in {report['elapsed_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
