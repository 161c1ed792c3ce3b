"""Which matrix-vector kernel streams weights fastest on this CPU, against a plain read of the same bytes.

    python examples/bench/bench_gemv.py                       the 1B model's shapes (and fused ones), 768 MiB per shape
    python examples/bench/bench_gemv.py --dtype bf16          the same in bfloat16
    python examples/bench/bench_gemv.py --quick               seconds: small shapes, 32 MiB (used by the tests)
    python examples/bench/bench_gemv.py --inductor            also inductor's own kernels (compiles each shape first)
    THP_MEM_ALLOC_ENABLE=1 python examples/bench/bench_gemv.py    every tensor in 2 MiB pages (a torch setting)

Decoding one token multiplies one row by every weight matrix, y = W x, so it can go no faster than the weights
stream from memory: that is the roofline examples/bench/benchmark.py judges decoding against. This script shows how
close each available kernel comes, shape by shape. For each shape it builds enough copies to fill --megabytes
(24x a 32 MiB L3 by default: none is served from the cache) and walks them in turn, as a model walks its layers:

  llama31 gemv    our matrix-vector kernel (llama31/cpu/gemv.py), on the plain weights: what compiled decoding
                  (Llama(compile=True), generate.py --compile) and the eager float32 default multiply with where
                  the CPU has AVX512-BF16
  gemv 2M pages   the same kernel on copies of the weights in 2 MiB pages (llama31/cpu/hugepages.py), where
                  compiled decoding keeps them; against the read of the weights in torch's 4 KiB pages
  oneDNN packed   llama31's PackedLinear: oneDNN's layout for one row (the eager bf16 default)
  MKL packed      torch.ops.mkl._mkl_linear on an MKL-packed weight (what torch.compile uses for fp32 linears;
                  fp32 only)
  F.linear        what HF transformers and llama31 with pack=False run
  torch.mv        the plain BLAS matrix-vector product
  inductor        (--inductor) the copies as one module under torch.compile with the options of
                  llama31/cpu/compiled.py (frozen weights, max-autotune: inductor's C++ GEMM kernels timed against
                  ATen's), what compiled decoding multiplies with where our kernel cannot run

Each kernel's walk is bracketed by two walks of amax over the same plain matrices, their bytes read as float32
(a reduction: a plain read of the same bytes, in the same order); the kernel is reported as GB/s and as a
fraction of the faster of those two reads, the median over --reps repetitions, because a shared VM's bandwidth
drifts from one second to the next.

The shapes include the fused matrices a model could use instead of separate ones: wq|wk|wv as one
(3072, 2048) and w1|w3 as one (16384, 2048), to show what fusing them would gain.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch._inductor.config  # noqa: F401  (its patch, for --inductor)
import torch.nn.functional as F

from llama31.cpu import gemv, hugepages
from llama31.cpu.packed import PackedLinear, packing_supported

SHAPES = [  # (name, out_features, in_features) of the Llama 3.2 1B shape
    ("wq / wo 2048x2048", 2048, 2048),
    ("wk / wv 512x2048", 512, 2048),
    ("wq|wk|wv fused 3072x2048", 3072, 2048),
    ("w1 / w3 8192x2048", 8192, 2048),
    ("w1|w3 fused 16384x2048", 16384, 2048),
    ("w2 2048x8192", 2048, 8192),
]
QUICK_SHAPES = [("256x512", 256, 512), ("512x256", 512, 256)]


class AllOf(torch.nn.Module):
    """Every copy as a bias-free linear layer of one module, so that one compiled graph walks them all."""

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype)
                                          for w in weights)
        for layer, w in zip(self.layers, weights):
            layer.weight = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def kernels(weights: list[torch.Tensor], inductor: bool = False) -> dict:
    """name -> (callables computing W x for every matrix, in order). Kernels this torch lacks are left out."""
    x = torch.randn(1, weights[0].shape[1], dtype=weights[0].dtype)
    out = {"F.linear": [lambda w=w: F.linear(x, w) for w in weights],
           "torch.mv": [lambda w=w: torch.mv(w, x[0]) for w in weights]}
    if gemv.unsupported() is None:
        out["llama31 gemv"] = [lambda w=w: gemv.matmul(x, w) for w in weights]
        huge = [hugepages.copy_to_huge_pages(w) for w in weights]
        if all(h is not w for h, w in zip(huge, weights)):  # not where unsupported or under one 2 MiB page
            out["gemv 2M pages"] = [lambda h=h: gemv.matmul(x, h) for h in huge]
    if packing_supported(weights[0]) is None:
        packed = [PackedLinear(w) for w in weights]
        out["oneDNN packed"] = [lambda layer=layer: layer(x) for layer in packed]
    if (weights[0].dtype == torch.float32 and torch.backends.mkl.is_available()
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")):
        mkl = [torch.ops.mkl._mkl_reorder_linear_weight(w, 1) for w in weights]
        out["MKL packed"] = [lambda w=w, m=m: torch.ops.mkl._mkl_linear(x, m, w, None, 1)
                             for w, m in zip(weights, mkl)]
    if inductor:
        from llama31.cpu.compiled import INDUCTOR_OPTIONS

        compiled = torch.compile(AllOf(weights).eval())

        def all_compiled():
            with torch._inductor.config.patch(INDUCTOR_OPTIONS):  # as llama31/cpu/compiled.py applies them
                return compiled(x)

        out["inductor"] = [all_compiled]  # compiled (and autotuned) in the first, uncounted round
    return out


def walk(calls) -> float:
    """Seconds to run every call once, in order."""
    start = time.perf_counter()
    for call in calls:
        call()
    return time.perf_counter() - start


@torch.inference_mode()
def bench_shape(n: int, k: int, megabytes: int, reps: int, dtype: torch.dtype = torch.float32,
                inductor: bool = False) -> dict:
    element = torch.finfo(dtype).bits // 8
    copies = max(1, megabytes * 2**20 // (n * k * element))
    g = torch.Generator().manual_seed(0)
    # random: no page can be deduplicated by the host
    weights = [torch.randn(n, k, generator=g).to(dtype) for _ in range(copies)]
    nbytes = copies * n * k * element
    # The bytes read as float32 whatever the dtype: fp32 amax is the fastest plain read here (46 GB/s where int32
    # amax reaches 39 and a bf16 amax, which converts every value, about 19).
    reads = [w.view(torch.float32).amax for w in weights]
    found = kernels(weights, inductor)
    huge = huge_page_mib()  # the copies of "gemv 2M pages"; with THP_MEM_ALLOC_ENABLE=1, every large tensor
    rates = {name: [] for name in found}
    fractions = {name: [] for name in found}
    names = list(found)
    for rep in range(reps + 1):  # the first round warms up every kernel and is not counted
        for name in names[rep % len(names):] + names[:rep % len(names)]:  # rotate who goes first
            before = nbytes / walk(reads)
            rate = nbytes / walk(found[name])
            after = nbytes / walk(reads)
            if rep:
                rates[name].append(rate / 1e9)
                fractions[name].append(rate / max(before, after))
    return {"copies": copies, "MiB": nbytes / 2**20, "huge_page_MiB": huge,
            "kernels": {name: {"GBps": statistics.median(rates[name]),
                               "fraction_of_read": statistics.median(fractions[name])} for name in names}}


def huge_page_mib() -> int | None:
    """MiB of this process's memory in transparent huge pages (Linux), None where it cannot be read."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and 32 MiB: a smoke run of seconds")
    parser.add_argument("--megabytes", type=int, help="MiB of weights per shape (default 768, quick 32)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions (default 5; medians are reported)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weight and input dtype")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--inductor", action="store_true", help="also time inductor's kernels (torch.compile "
                        "with llama31/cpu/compiled.py's options; compiles each shape)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    megabytes = args.megabytes or (32 if args.quick else 768)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          f", {args.dtype}, {megabytes} MiB of weights per shape, medians of {args.reps}")
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype, "shapes": {}}
    print(f"{'shape':<26} {'kernel':<14} {'GB/s':>6} {'of read':>8}")
    for name, n, k in (QUICK_SHAPES if args.quick else SHAPES):
        shape = bench_shape(n, k, megabytes, args.reps, dtype, args.inductor)
        results["shapes"][name] = shape
        for kernel, r in sorted(shape["kernels"].items(), key=lambda item: -item[1]["GBps"]):
            print(f"{name:<26} {kernel:<14} {r['GBps']:>6.1f} {r['fraction_of_read']:>8.0%}", flush=True)
    most = max((s["huge_page_MiB"] or 0) for s in results["shapes"].values())
    print(f"memory in 2 MiB pages while measuring: up to {most} MiB (the copies of 'gemv 2M pages', and with "
          "THP_MEM_ALLOC_ENABLE=1 every large tensor)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
