"""The embedded demo model: what `python examples/generate.py` runs when no checkpoint is given.

A small Llama 3.1 that this project trained itself on a public-domain English text, the King James Version of
the Bible (docs/demo_model.md: the corpus, the training run, its held-out loss against simple baselines).
It writes KJV-style English; it knows nothing else and follows no instructions (it never saw a chat turn).
The architecture is Llama 3.1's, at a small size: the real 128256-token vocabulary (the Llama 3 tokenizer),
RMSNorm, grouped-query attention (8 query heads share 2 key/value heads), SwiGLU, llama3-scaled RoPE.

What ships is compact (llama31/demo/compact.py): only the vocabulary rows the corpus uses, in bfloat16.
``demo_checkpoint`` expands it once into an ordinary Hugging Face folder (config.json + model.safetensors, the
full vocabulary) in a cache directory, and ``build_demo_model`` loads that folder the way any HF checkpoint is
loaded, so the demo runs the same code as a real Llama 3.1, and HF transformers can load the folder too.

    cache directory: $LLAMA31_CACHE, else $XDG_CACHE_HOME/llama31, else ~/.cache/llama31
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from llama31.checkpoints import save_hf
from llama31.checkpoints.atomic import atomic_folder
from llama31.checkpoints.hf import is_hf_folder
from llama31.config import ModelArgs, RopeScaling
from llama31.demo.compact import expand_vocabulary, file_sha256, read_compact
from llama31.model import Transformer

DEMO_FILE = Path(__file__).with_name("kjv.safetensors")  # the compact weights (bfloat16)
RECORD_FILE = Path(__file__).with_name("record.json")  # what the export run measured: loss, a greedy continuation
DEMO_ARGS = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=128256, hidden_dim=768,
                      rope_scaling=RopeScaling(), max_seq_len=8192)


def cache_root() -> Path:
    """$LLAMA31_CACHE, else $XDG_CACHE_HOME/llama31, else ~/.cache/llama31."""
    if os.environ.get("LLAMA31_CACHE"):
        return Path(os.environ["LLAMA31_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "llama31"
    return Path.home() / ".cache" / "llama31"


def demo_checkpoint(cache_dir=None, *, compact_file=DEMO_FILE) -> Path:
    """The demo model as a full-vocabulary HF folder (config.json + model.safetensors, bfloat16); built on the
    first call, found on later ones.

    cache_dir: where the folder goes (default ``cache_root()``). The folder is named by the compact file's
    sha256, so new weights get a new folder. It is written under a temporary name and renamed when complete
    (llama31.checkpoints.atomic): a run that dies half way leaves a hidden ".NAME....partial" folder that is
    never taken for the model. compact_file: the shipped weights (another file only to test an export).
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = root / f"demo-kjv-{file_sha256(compact_file)[:16]}"
    if is_hf_folder(folder):
        return folder

    args, vocab_ids, tensors = read_compact(compact_file)
    if args != DEMO_ARGS:
        raise ValueError(f"{compact_file} describes {args}, but llama31.demo.DEMO_ARGS is {DEMO_ARGS}; "
                         "the file and the code are out of step (re-export the demo model)")
    try:
        with atomic_folder(folder) as partial:  # written beside it, renamed to it once complete
            save_hf(partial, args, expand_vocabulary(tensors, vocab_ids, args.vocab_size))
    except OSError:
        if not is_hf_folder(folder):  # else another process finished the same folder first: keep it
            raise
    return folder


def build_demo_model(*, dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """The demo model (llama31.model.Transformer, DEMO_ARGS) loaded from ``demo_checkpoint()``'s HF folder.

    dtype, device: of the weights (the file's bfloat16 values, exactly representable in float32). The linear
    weights stay plain (pack=False): the caller gives them faster CPU kernels if it wants (Llama.build does,
    llama31/cpu/defaults.py).
    """
    folder = demo_checkpoint()
    model = Transformer.from_pretrained(folder, dtype=dtype, device=device, pack=False)
    model.checkpoint_info = {**model.checkpoint_info, "format": "demo"}
    return model


__all__ = ["DEMO_ARGS", "DEMO_FILE", "RECORD_FILE", "build_demo_model", "cache_root", "demo_checkpoint"]
