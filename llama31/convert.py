"""Convert a checkpoint folder between Meta's and Hugging Face's formats.

    python -m llama31.convert SRC DST --to hf                 Meta (or HF) folder -> HF folder
    python -m llama31.convert SRC DST --to meta --shards 8    HF (or Meta) folder -> Meta folder in 8 files

The HF folder loads in transformers' LlamaForCausalLM; the Meta folder is split as fairscale splits it, so
Meta's reference code (and llama31, with any number of processes) loads it. A tokenizer.model next to the
source weights is copied along.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from llama31.checkpoints import open_checkpoint, save_hf, save_meta

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(src, dst, *, to: str, shards: int = 1, dtype: torch.dtype | None = None) -> None:
    """Convert the checkpoint folder src into a new folder dst in format `to` ("hf" or "meta")."""
    ckpt = open_checkpoint(src)
    if ckpt.quantization:
        raise ValueError(f"{src}: converting quantized checkpoints is not supported; convert the float weights")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty; choose a new folder")
    state = {name: ckpt.read(name) for name in ckpt.keys()}
    if to == "hf":
        save_hf(dst, ckpt.args, state, dtype=dtype)
    elif to == "meta":
        save_meta(dst, ckpt.args, state, n_shards=shards, dtype=dtype)
    else:
        raise ValueError(f"--to must be 'hf' or 'meta', got {to!r}")
    tokenizer = Path(src) / "tokenizer.model"
    if tokenizer.is_file():
        shutil.copy(tokenizer, dst / "tokenizer.model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama31.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a Meta or HF checkpoint folder")
    parser.add_argument("dst", help="the folder to write (must not exist or be empty)")
    parser.add_argument("--to", required=True, choices=["hf", "meta"], help="the format to write")
    parser.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (--to meta)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep their dtype)")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.to == "hf" and args.shards != 1:
        parser.error("--shards applies to --to meta only")
    try:
        convert(args.src, args.dst, to=args.to, shards=args.shards, dtype=DTYPES.get(args.dtype))
    except (OSError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.to} checkpoint to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
