"""Convert a checkpoint folder between Meta's and Hugging Face's formats, or export it to GGUF for llama.cpp.

    python -m llama31.convert SRC DST --to hf                 Meta (or HF) folder -> HF folder
    python -m llama31.convert SRC DST --to meta --shards 8    HF (or Meta) folder -> Meta folder in 8 files
    python -m llama31.convert SRC OUT.gguf --to gguf          either folder -> one GGUF file, for llama.cpp
                              [--outtype f32|bf16|f16]        (llama31/checkpoints/gguf.py)

The HF folder loads in transformers' LlamaForCausalLM; the Meta folder is split as fairscale splits it, so
Meta's reference code (and llama31, with any number of processes) loads it. A tokenizer.model next to the
source weights is copied along. The source is checked as strictly as loading checks it (every tensor present,
of the shape and floating dtype its config implies), and DST appears only once it is complete.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from llama31.checkpoints import open_checkpoint, save_hf, save_meta
from llama31.checkpoints.atomic import atomic_folder
from llama31.checkpoints.load import check_config_fits_tensors, check_dtype, load_weights
from llama31.errors import InputError, check_int, run_command

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert(src, dst, *, to: str, shards: int = 1, dtype: torch.dtype | None = None,
            outtype: str | None = None) -> None:
    """Convert the checkpoint folder src into a new folder dst in format `to` ("hf" or "meta"), or into the
    GGUF file dst (to="gguf", weights in outtype "f32", "bf16" or "f16"; None: as stored).

    shards: the number of consolidated.NN.pth files (to="meta"). dtype: cast the weights (None: keep theirs).
    dst must not exist or be empty; it is written under a temporary name beside it and renamed when complete,
    so a failed or interrupted conversion leaves no dst behind.
    """
    if to == "gguf" and shards == 1 and dtype is None:
        from llama31.checkpoints.gguf import write_gguf

        write_gguf(src, dst, outtype=outtype)
        return
    if to == "gguf":
        raise InputError("convert", "shards" if shards != 1 else "dtype", "applies to 'hf' and 'meta' only; a "
                         "GGUF file takes outtype")
    if outtype is not None:
        raise InputError("convert", "outtype", f"applies to to='gguf' only, got {outtype!r}")
    if to not in ("hf", "meta"):
        raise InputError("convert", "to", f"must be 'hf', 'meta' or 'gguf', got {to!r}")
    check_int(shards, "shards", "convert", minimum=1)
    if to == "hf" and shards != 1:
        raise InputError("convert", "shards", f"applies to to='meta' only (an HF folder is one set of files), got "
                         f"{shards}")
    check_dtype(dtype, "convert")
    ckpt = open_checkpoint(src)
    if ckpt.quantization:
        raise ValueError(f"{src}: converting quantized checkpoints is not supported; convert the float weights")
    from llama31.model.transformer import Transformer  # only to know every parameter's name and shape

    with atomic_folder(dst) as tmp:
        check_config_fits_tensors(ckpt)
        model = Transformer(ckpt.args, device="meta")
        load_weights(model, ckpt, dtype=None, device="cpu")  # the checks of loading; dtypes as stored
        state = model.state_dict()  # Meta names and layout (tied: output.weight is the embedding, not written)
        if to == "hf":
            save_hf(tmp, ckpt.args, state, dtype=dtype)
        else:
            save_meta(tmp, ckpt.args, state, n_shards=shards, dtype=dtype)
        tokenizer = Path(src) / "tokenizer.model"
        if tokenizer.is_file():
            shutil.copy(tokenizer, tmp / "tokenizer.model")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama31.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a Meta or HF checkpoint folder")
    parser.add_argument("dst", help="the folder to write (must not exist or be empty); --to gguf: the file")
    parser.add_argument("--to", required=True, choices=["hf", "meta", "gguf"], help="the format to write")
    parser.add_argument("--shards", type=int, default=1, help="number of consolidated.NN.pth files (--to meta)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep their dtype)")
    parser.add_argument("--outtype", choices=["f32", "bf16", "f16"],
                        help="--to gguf: the weights' type in the file (default: as stored)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    if args.to == "hf" and args.shards != 1:
        parser.error("--shards applies to --to meta only")
    if args.to == "gguf" and (args.dtype or args.shards != 1):
        parser.error("--dtype and --shards apply to --to hf and meta; a GGUF file takes --outtype")
    if args.to != "gguf" and args.outtype:
        parser.error("--outtype applies to --to gguf only")

    def body() -> int:
        convert(args.src, args.dst, to=args.to, shards=args.shards, dtype=DTYPES.get(args.dtype),
                outtype=args.outtype)
        print(f"wrote {args.to} checkpoint to {args.dst}")
        return 0

    return run_command(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
