"""What does torch.compile gain for decoding on a CPU? One decode step, eager (default and plain) vs compiled.

    python examples/bench/bench_compile.py                 # the benchmark's 3.2-1B-shaped random model, fp32 + bf16
    python examples/bench/bench_compile.py --preset tiny        # where Python overhead dominates
    python examples/bench/bench_compile.py --layers 8 --against '{"pattern_matcher": true}'   # inductor settings, A/B

Loads the random model that examples/bench/benchmark.py saves (same --preset, --cache-dir) three ways, in this
process, one after the other:
    eager default  Transformer.from_pretrained as users get it (its default CPU kernels, llama31/cpu/defaults.py)
    eager plain    pack=False (F.linear)
    compiled       llama31.cpu.compiled.CompiledDecoder over the plain model, as Llama(compile=True) and
                   generate.py --compile run it: torch.compile(dynamic=True) with frozen weights and
                   max-autotune (inductor's C++ GEMM kernels timed against ATen's for each weight shape)
and times --steps single-token decode steps after a --prompt-token prefill. Reports the compile time (the
first two steps: autotuning included unless inductor's disk cache already has the kernels), the median step,
and the speed-up of the compiled step over the eager default one.

--against JSON measures inductor settings instead: two copies of the model, one compiled with the settings of
llama31/cpu/compiled.py (INDUCTOR_OPTIONS) and one with those replaced by JSON, their steps alternated (--reps
repetitions of --steps steps each, the memory bandwidth read before and after each by benchmark.py's ReadProbe),
and reports the median ratio of the paired step times and each one's fraction of the faster of those two reads
(the roofline, as examples/bench/benchmark.py draws it). Pairing
matters on a shared VM: its bandwidth moves by 2x from one minute to the next, more than most settings change.
--layers N keeps the first N layers (two compiled copies of the 1B shape need ~4x its 5 GB of weights in fp32).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._inductor.config  # noqa: F401  (its patch: --against is checked before loading)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import (  # noqa: E402  (the same model, cache,
    DTYPES,
    PRESETS,
    ReadProbe,
    model_folder,
    weight_bytes_read,  # bandwidth probe and bytes per step as examples/bench/benchmark.py)
)

from llama31 import Transformer  # noqa: E402
from llama31.cpu.compiled import CompiledDecoder  # noqa: E402


@torch.inference_mode()
def time_decode(model, step, prompt_len: int, steps: int, vocab: int) -> tuple[float, float]:
    """(seconds of the first two steps, median seconds of the next `steps`), one cache for all of them."""
    step.setup_cache(1, prompt_len + steps + 2)  # CompiledDecoder's: a spare position, or the last step recompiles
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
    step.clear_cache()
    return first, statistics.median(times)


@torch.inference_mode()
def compare_options(folder: Path, dtype: torch.dtype, layers: int | None, against: dict, reps: int,
                    steps: int) -> None:
    """Paired A/B of INDUCTOR_OPTIONS (A) against them with `against` replaced (B); see the module doc."""
    decoders = []
    for name, options in (("A", {}), ("B", against)):
        model = Transformer.from_pretrained(folder, dtype=dtype, pack=False).eval()
        if layers:
            model.layers = model.layers[:layers]
        decoder = CompiledDecoder(model, options)  # another model object: dynamo compiles it separately
        decoder.setup_cache(1, 2 + reps * steps)
        start = time.perf_counter()
        token = torch.zeros(1, 1, dtype=torch.long)
        for pos in range(2):  # the compile (and autotuning), not recorded
            token = decoder(token, pos, last_only=True)[:, -1].argmax(-1, keepdim=True)
        print(f"{name}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
        decoders.append(decoder)
    weight_bytes = weight_bytes_read(decoders[0].model)
    probe = ReadProbe(512)
    ratios, fractions = [], ([], [])
    pos = 2
    for _ in range(reps):
        before = probe.gbps(3)
        medians = []
        for decoder in decoders:
            token, times = torch.zeros(1, 1, dtype=torch.long), []
            for i in range(steps):
                start = time.perf_counter()
                token = decoder(token, pos + i, last_only=True)[:, -1].argmax(-1, keepdim=True)
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
        pos += steps
        read = max(before, probe.gbps(3))  # as examples/bench/benchmark.py: the faster read bounds the step
        for f, m in zip(fractions, medians):
            f.append(weight_bytes / m / 1e9 / read)
        ratios.append(medians[0] / medians[1])
        print(f"read {read:5.1f} GB/s   A {1e3 * medians[0]:7.2f} ms {100 * fractions[0][-1]:4.0f}%   "
              f"B {1e3 * medians[1]:7.2f} ms {100 * fractions[1][-1]:4.0f}%   A/B {ratios[-1]:.3f}", flush=True)
    print(f"median over {reps}: speed of B / A {statistics.median(ratios):.3f}; of the read bandwidth: "
          f"A {100 * statistics.median(fractions[0]):.1f}%, B {100 * statistics.median(fractions[1]):.1f}%")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama3.2-1b", choices=sorted(PRESETS))
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed (default 30)")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding (default 32)")
    default_cache = Path("~/.cache") / "llama31-benchmark"
    parser.add_argument("--cache-dir", default=str(default_cache), help=f"as benchmark.py (default {default_cache})")
    parser.add_argument("--against", metavar="JSON", help="A/B: inductor settings replacing those of "
                        "llama31/cpu/compiled.py in a second compiled copy, e.g. '{\"pattern_matcher\": true}'")
    parser.add_argument("--layers", type=int, help="with --against: keep the first N layers only")
    parser.add_argument("--reps", type=int, help="with --against: paired repetitions (default 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    unknown = [name for name in args.dtypes.split(",") if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    if args.against is None and (args.layers is not None or args.reps is not None):
        parser.error("--layers and --reps apply only with --against")
    if args.against is not None:
        try:
            against = json.loads(args.against)
        except json.JSONDecodeError as e:
            parser.error(f"--against must be a JSON object of inductor settings: {e}")
        if not isinstance(against, dict):
            parser.error(f"--against must be a JSON object of inductor settings, got {args.against!r}")
        try:
            with torch._inductor.config.patch(against):  # unknown names fail here, not after loading the model
                pass
        except AttributeError as e:
            parser.error(f"--against: {e} (the settings are those of torch/_inductor/config.py)")
        for option, value in (("--layers", args.layers), ("--reps", args.reps)):
            if value is not None and value < 1:
                parser.error(f"{option} must be at least 1, got {value}")
        folder = model_folder(args.preset, Path(args.cache_dir).expanduser())
        for name in args.dtypes.split(","):
            print(f"{args.preset} {name}, first {args.layers or 'all'} layers, {args.threads} thread(s); "
                  f"A: llama31/cpu/compiled.py's settings, B: with {against}")
            compare_options(folder, DTYPES[name], args.layers, against, args.reps or 20, args.steps)
            torch._dynamo.reset()
        return 0
    folder = model_folder(args.preset, Path(args.cache_dir).expanduser())
    print(f"{args.preset}, {args.threads} thread(s), {args.steps} steps after a {args.prompt}-token prompt")
    print(f"{'':6}{'eager default':>16}{'eager plain':>16}{'compiled':>16}{'compile time':>15}"
          f"{'speed-up of compiled':>22}")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        row = {}
        for mode in ("default", "plain", "compiled"):
            pack = None if mode == "default" else False  # None: from_pretrained's default kernels
            model = Transformer.from_pretrained(folder, dtype=dtype, pack=pack).eval()
            step = CompiledDecoder(model) if mode == "compiled" else model
            if mode != "compiled":  # warm-up, not recorded (the compiled run's first two steps are its warm-up)
                time_decode(model, step, args.prompt, 4, model.args.vocab_size)
            first, median = time_decode(model, step, args.prompt, args.steps, model.args.vocab_size)
            row[mode] = (first, median)
            del model, step
            torch._dynamo.reset()
        default, plain, compiled = (1e3 * row[m][1] for m in ("default", "plain", "compiled"))
        print(f"{name:6}{default:>13.2f} ms{plain:>13.2f} ms{compiled:>13.2f} ms{row['compiled'][0]:>13.1f} s"
              f"{default / compiled:>21.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
