"""The demo model's shipped file: the vocabulary rows its corpus uses, and the ids they belong to.

The demo model has Llama 3's full 128256-token vocabulary, but the corpus it was trained on uses about 10K of
those ids. Every other row of the token embedding and of the output matrix is zero: the model was trained that
way (examples/train.py), so a never-seen id embeds to zero and gets a logit of exactly 0. Storing the zeros would
add 2 x 118K x dim x 2 bytes (about 120 MB at dim 256); this file stores the used rows and their ids instead,
and ``expand_vocabulary`` puts the rows back where they belong.

    vocab_ids                 (n_seen,) int32, sorted: the real token id of each stored row
    tok_embeddings.weight     (n_seen, dim) bfloat16
    output.weight             (n_seen, dim) bfloat16
    layers.N.*, norm.weight   the blocks and the final norm: Meta's names and layout, bfloat16
    metadata                  {"llama31_demo": JSON of {"format": FORMAT, "config": the full model's HF config.json}}

(One metadata key, so that the same weights always give the same bytes: safetensors writes its metadata keys in
no fixed order.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from llama31.config import ModelArgs

FORMAT = "llama31-demo-compact-1"
VOCAB_ROWS = ("tok_embeddings.weight", "output.weight")  # the two matrices with one row per vocabulary id


def write_compact(file, args: ModelArgs, vocab_ids: torch.Tensor, state_dict: dict[str, torch.Tensor],
                  dtype: torch.dtype = torch.bfloat16) -> None:
    """Write the compact file. args: the full model (vocab_size 128256); vocab_ids: (n_seen,) the real id of
    each row of the two vocabulary matrices in state_dict, which holds n_seen rows (Meta names and layout)."""
    vocab_ids = torch.as_tensor(vocab_ids)
    if not bool((vocab_ids[1:] > vocab_ids[:-1]).all()) or int(vocab_ids.max()) >= args.vocab_size:
        raise ValueError(f"vocab_ids must be sorted, distinct and below vocab_size {args.vocab_size}")
    tensors = {"vocab_ids": vocab_ids.to(torch.int32)}
    for name, tensor in state_dict.items():
        if name in VOCAB_ROWS and tensor.shape != (len(vocab_ids), args.dim):
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected ({len(vocab_ids)}, {args.dim}), "
                             "one row per vocab id")
        tensors[name] = tensor.to(dtype).contiguous()
    header = json.dumps({"format": FORMAT, "config": args.to_hf_config()}, sort_keys=True)
    save_file(tensors, str(file), metadata={"llama31_demo": header})


def read_compact(file) -> tuple[ModelArgs, torch.Tensor, dict[str, torch.Tensor]]:
    """(args of the full model, vocab_ids (n_seen,) int64, the stored tensors under Meta names)."""
    with safe_open(str(file), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("llama31_demo", "{}"))
        if header.get("format") != FORMAT:
            raise ValueError(f"{file}: not a compact demo file (format {header.get('format')!r}, expected {FORMAT!r})")
        args = ModelArgs.from_hf_config(header["config"], source=f"{file} metadata")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return args, tensors.pop("vocab_ids").long(), tensors


def expand_vocabulary(tensors: dict[str, torch.Tensor], vocab_ids: torch.Tensor,
                      vocab_size: int) -> dict[str, torch.Tensor]:
    """The full model's state dict: each vocabulary matrix (n_seen, dim) becomes (vocab_size, dim) with row
    vocab_ids[i] = stored row i and zeros elsewhere; every other tensor is returned as it is."""
    full = dict(tensors)
    for name in VOCAB_ROWS:
        rows = tensors[name]  # (n_seen, dim)
        matrix = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)  # (vocab_size, dim)
        matrix[vocab_ids] = rows
        full[name] = matrix
    return full


def file_sha256(file: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
