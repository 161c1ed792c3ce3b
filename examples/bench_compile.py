"""What does torch.compile gain for decoding on a CPU? One decode step, eager (packed and plain) vs compiled.

    python examples/bench_compile.py                      # the benchmark's 3.2-1B-shaped random model, fp32 + bf16
    python examples/bench_compile.py --preset tiny        # where Python overhead dominates

Loads the random model that examples/benchmark.py saves (same --preset, --cache-dir) three ways, in this
process, one after the other:
    eager packed   Transformer.from_pretrained as users get it (large linear weights packed for oneDNN)
    eager plain    pack=False (F.linear)
    compiled       llama31.compiled.CompiledDecoder over the plain model, as Llama(compile=True) and
                   generate.py --compile run it: torch.compile(dynamic=True) with frozen weights and
                   max-autotune (inductor's C++ GEMM kernels timed against ATen's for each weight shape)
and times --steps single-token decode steps after a --prompt-token prefill. Reports the compile time (the
first two steps: autotuning included unless inductor's disk cache already has the kernels), the median step,
and the speed-up of the compiled step over the eager packed one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import DTYPES, PRESETS, model_folder  # noqa: E402  (the same random model and cache folder)

from llama31 import Transformer  # noqa: E402
from llama31.compiled import CompiledDecoder  # noqa: E402


@torch.inference_mode()
def time_decode(model, step, prompt_len: int, steps: int, vocab: int) -> tuple[float, float]:
    """(seconds of the first two steps, median seconds of the next `steps`), one cache for all of them."""
    model.setup_cache(1, prompt_len + steps + 2)
    tokens = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    token = model(tokens, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    start = time.perf_counter()
    for pos in (prompt_len, prompt_len + 1):
        token = step(token, pos, last_only=True)[:, -1].argmax(-1, keepdim=True)
    first = time.perf_counter() - start
    times = []
    for pos in range(prompt_len + 2, prompt_len + 2 + steps):
        start = time.perf_counter()
        token = step(token, pos, last_only=True)[:, -1].argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
    model.clear_cache()
    return first, statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b", choices=sorted(PRESETS))
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed (default 30)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding (default 32)")
    default_cache = Path("~/.cache") / "llama31-benchmark"
    parser.add_argument("--cache-dir", default=str(default_cache), help=f"as benchmark.py (default {default_cache})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = model_folder(args.preset, Path(args.cache_dir).expanduser())
    print(f"{args.preset}, {args.threads} thread(s), {args.steps} steps after a {args.prompt}-token prompt")
    print(f"{'':6}{'eager packed':>16}{'eager plain':>16}{'compiled':>16}{'compile time':>15}"
          f"{'speed-up of compiled':>22}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        row = {}
        for mode in ("packed", "plain", "compiled"):
            pack = None if mode == "packed" else False  # None: as from_pretrained packs by default
            model = Transformer.from_pretrained(folder, dtype=dtype, pack=pack).eval()
            step = CompiledDecoder(model) if mode == "compiled" else model
            if mode != "compiled":  # warm-up, not recorded (the compiled run's first two steps are its warm-up)
                time_decode(model, step, args.prompt, 4, model.args.vocab_size)
            first, median = time_decode(model, step, args.prompt, args.steps, model.args.vocab_size)
            row[mode] = (first, median)
            del model, step
            torch._dynamo.reset()
        packed, plain, compiled = (1e3 * row[m][1] for m in ("packed", "plain", "compiled"))
        print(f"{name:6}{packed:>13.2f} ms{plain:>13.2f} ms{compiled:>13.2f} ms{row['compiled'][0]:>13.1f} s"
              f"{packed / compiled:>21.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
