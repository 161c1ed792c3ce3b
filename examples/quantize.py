"""Quantize a float Llama checkpoint to INT4 (W4A16, round to nearest) as an HF folder in compressed-tensors
"pack-quantized" format, the format of the published Llama 3.1 w4a16 checkpoints:

    python examples/quantize.py --ckpt-dir Meta-Llama-3.1-8B-Instruct/ --out llama-3.1-8b-int4/
    python examples/quantize.py --ckpt-dir SRC --out DST --group-size 64 --asymmetric
    python examples/quantize.py --ckpt-dir SRC --out DST --quantize-output

The seven linear layers of every block are quantized (group-wise along the input dimension, scale =
absmax / 7.5); embeddings, norms and the output layer stay 16-bit. --quantize-output quantizes the output
layer (lm_head) too; a tied model (Llama 3.2 1B / 3B) is then written untied: the embedding in 16 bits, lm_head
an INT4 copy of it, tie_word_embeddings false. Tensors are read and written one at a time, so the source model
is never in memory whole. Prints the size of every part before and after.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llama31.errors import run_command
from llama31.quant.checkpoint import quantize_checkpoint
from llama31.quant.rtn import GROUP_SIZES

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def size_table(sizes, dtype_name: str) -> str:
    rows = [f"{'part':<28} {'before (' + dtype_name + ')':>18} {'after':>12} {'ratio':>7}"]
    for s in sizes:
        ratio = f"{s.after / s.before:.3f}" if s.before else "-"  # a tied model's output layer: a new copy
        rows.append(f"{s.part:<28} {format_bytes(s.before):>18} {format_bytes(s.after):>12} {ratio:>7}")
    before, after = sum(s.before for s in sizes), sum(s.after for s in sizes)
    rows.append(f"{'total':<28} {format_bytes(before):>18} {format_bytes(after):>12} {after / before:>7.3f}")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", required=True, help="a float Meta or HF checkpoint folder")
    parser.add_argument("--out", required=True, help="the HF folder to write (must not exist or be empty)")
    parser.add_argument("--group-size", type=int, default=128, choices=GROUP_SIZES,
                        help="inputs sharing one scale (default 128)")
    parser.add_argument("--asymmetric", action="store_true", help="add an integer zero point per group")
    parser.add_argument("--quantize-output", action="store_true", help="quantize the output layer (lm_head) too; "
                        "a tied model is written untied, its embedding kept in --dtype")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="dtype of the scales and of the unquantized tensors (default bfloat16)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    def body() -> int:
        # --out appears only once complete: quantize_checkpoint writes under a temporary name and renames it
        start = time.perf_counter()
        sizes = quantize_checkpoint(args.ckpt_dir, args.out, args.group_size, symmetric=not args.asymmetric,
                                    quantize_output=args.quantize_output, dtype=DTYPES[args.dtype])
        print(size_table(sizes, args.dtype))
        output = ", output layer quantized" if args.quantize_output else ""
        print(f"wrote {args.out} (compressed-tensors pack-quantized, group size {args.group_size}, "
              f"{'asymmetric' if args.asymmetric else 'symmetric'}{output}) in {time.perf_counter() - start:.1f} s")
        return 0

    return run_command(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
