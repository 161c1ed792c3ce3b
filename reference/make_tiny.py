"""The tiny random checkpoints shipped with the goldens, rebuilt bit-identically from their seeds.

    python -m reference.make_tiny --out reference/checkpoints            every recipe below
    python -m reference.make_tiny --out DIR --name tiny-llama3.1           one of them

Each is an HF folder (config.json + model.safetensors, weights in bfloat16 as real 3.1 checkpoints are) plus
vocab_map.json (which 512 Llama 3.1 ids the vocabulary keeps, see reference/prompts.py) and
tiny_recipe.json (the seed and how the weights were drawn).

The weights do not come from torch's or numpy's random generators, whose streams may change between
versions or CPUs: a counter-based generator (splitmix64, integer arithmetic only) gives 23-bit uniform
integers, scaled to the wanted standard deviation and rounded to bfloat16. Every step is exact or correctly
rounded, so the files are the same bytes on every machine.

Initialisation, chosen so that the mistakes engines make change the outputs visibly:
    tok_embeddings   std 0.02 (as trained Llamas): the first RMSNorm sees mean(x^2) ~ 4e-4, so its eps (1e-5)
                     matters and a wrong eps shows
    linear layers    std 1/sqrt(fan_in): activations stay O(1) through the blocks, every weight matters
    output           std 4/sqrt(dim): logits with std ~4, peaked next-token distributions (few near-ties)
    norms            uniform in [0.75, 1.25]: not all ones, so a swapped or missing norm weight shows
The 3.2-style model ties its output to the embedding; there the embedding (std 0.05) and a larger final
norm weight (3 to 4) give the logits their spread.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama31.checkpoints import save_hf
from llama31.config import ModelArgs, RopeScaling
from llama31.model import Transformer
from reference.fileformat import dumps
from reference.prompts import (
    LLAMA31_SPECIAL_IDS,
    VOCAB_MAP_FILE,
    VocabMap,
    default_long_tokens,
    encode_prompts,
    load_prompt_specs,
)

RECIPE_FILE = "tiny_recipe.json"
TINY_VOCAB = 512
DEFAULT_MAX_NEW_TOKENS = 16  # the default of reference.make; it sets the long probe's length


@dataclass(frozen=True)
class TinyRecipe:
    name: str
    seed: int
    args: ModelArgs
    embedding_std: float
    output_gain: float | None  # untied output std = output_gain / sqrt(dim); None when tied
    final_norm: tuple[float, float]  # uniform range of the final RMSNorm weight
    description: str


RECIPES = {r.name: r for r in (
    TinyRecipe(
        "tiny-llama3.1", seed=31,
        # head_dim 64 (dim / n_heads), which every engine's attention kernels support; GQA 4 query heads on 2 kv
        # heads; llama3 scaling with factor 8 at an original context of 64, so that the 384-token long probe runs
        # 6x past it. Bands of the 32 frequencies: 3 unchanged, 3 blended, 26 divided by 8.
        args=ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TINY_VOCAB, hidden_dim=384,
                       norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=64),
                       max_seq_len=1024, tie_word_embeddings=False),
        embedding_std=0.02, output_gain=4.0, final_norm=(0.75, 1.25),
        description="Llama 3.1 layout: GQA (4 query heads, 2 kv heads), untied output, llama3 RoPE scaling "
                    "factor 8 at original context 64 (max 1024 = 16x, as 131072 = 16 x 8192)"),
    TinyRecipe(
        "tiny-llama3.2", seed=32,
        # the 3.2 1B/3B traits: factor 32 and tied embeddings; original context 32 (bands: 1 unchanged, 3 blended,
        # 28 divided by 32), 2 kv heads for 4 query heads
        args=ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=TINY_VOCAB, hidden_dim=384,
                       norm_eps=1e-5, rope_theta=500000.0,
                       rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=32),
                       max_seq_len=512, tie_word_embeddings=True),
        embedding_std=0.05, output_gain=None, final_norm=(3.0, 4.0),
        description="Llama 3.2 1B/3B traits: tied embeddings, llama3 RoPE scaling factor 32 at original "
                    "context 32 (max 512 = 16x), GQA (4 query heads, 2 kv heads)"),
)}


def uniform_weights(shape: tuple[int, ...], seed: int, name: str, std: float) -> torch.Tensor:
    """Deterministic weights, uniform with standard deviation `std`, the same bytes on every machine.

    splitmix64 over counters 1..n, keyed by sha256(seed:name); the top 23 bits of each output give the odd
    integers -(2^23 - 1) .. 2^23 - 1, divided by 2^23 (exact in float32): uniform on (-1, 1), std 1/sqrt(3).
    """
    n = math.prod(shape)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as splitmix64 intends
        z = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    top23 = (z >> np.uint64(41)).astype(np.int64)
    unit = (2 * top23 - (1 << 23) + 1).astype(np.float32) / np.float32(1 << 23)  # (-1, 1), exact
    return torch.from_numpy(unit * np.float32(std * math.sqrt(3))).reshape(shape)


def tiny_state_dict(recipe: TinyRecipe) -> dict[str, torch.Tensor]:
    """Meta-named bfloat16 weights of the recipe's model (no output.weight when tied)."""
    args = recipe.args
    shapes = {name: tuple(p.shape) for name, p in Transformer(args, device="meta").state_dict().items()}
    state = {}
    for name, shape in shapes.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        if name == "tok_embeddings.weight":
            w = uniform_weights(shape, recipe.seed, name, recipe.embedding_std)
        elif name == "output.weight":
            w = uniform_weights(shape, recipe.seed, name, recipe.output_gain / math.sqrt(shape[1]))
        elif len(shape) == 2:
            w = uniform_weights(shape, recipe.seed, name, 1.0 / math.sqrt(shape[1]))
        else:  # RMSNorm weights: uniform in [lo, hi]
            lo, hi = recipe.final_norm if name == "norm.weight" else (0.75, 1.25)
            w = (lo + hi) / 2 + uniform_weights(shape, recipe.seed, name, (hi - lo) / 2 / math.sqrt(3))
        state[name] = w.to(torch.bfloat16)
    return state


def tiny_vocabulary(specs: list[dict], args: ModelArgs, size: int = TINY_VOCAB) -> list[int]:
    """The Llama 3.1 ids a tiny vocabulary keeps, ascending: those the prompts use, the special tokens up to
    python_tag, then the lowest other ids as filler."""
    from llama31.text import Tokenizer

    prompts = encode_prompts(specs, Tokenizer(), VocabMap(None, 128256),
                             long_tokens=default_long_tokens(args, DEFAULT_MAX_NEW_TOKENS))
    kept = set(LLAMA31_SPECIAL_IDS)
    for p in prompts:
        kept.update(p.get("llama31_ids") or [])
    if len(kept) > size:
        raise ValueError(f"the prompts use {len(kept)} distinct Llama 3.1 ids; a tiny vocabulary holds {size}")
    filler = (i for i in range(128000) if i not in kept)
    while len(kept) < size:
        kept.add(next(filler))
    return sorted(kept)


def write_tiny_checkpoint(recipe: TinyRecipe, folder, prompts_file=None) -> Path:
    """Write the recipe's HF folder, vocab_map.json and tiny_recipe.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = tiny_vocabulary(load_prompt_specs(prompts_file), recipe.args)
    mapped = VocabMap(vocab, recipe.args.vocab_size)
    # config.json's bos/eos in the model's own ids (the Llama 3.1 ids 128000.. do not exist in 512 rows)
    special = {"bos_token_id": mapped.to_model([128000], "bos")[0], "eos_token_id": mapped.stop_ids()}
    save_hf(folder, recipe.args, tiny_state_dict(recipe), dtype=torch.bfloat16, extra_config=special)
    _write_json(folder / VOCAB_MAP_FILE, {
        "description": "model token id i stands for Llama 3.1 token id llama31_ids[i] (reference/prompts.py)",
        "llama31_ids": vocab})
    _write_json(folder / RECIPE_FILE, {
        "name": recipe.name, "seed": recipe.seed, "description": recipe.description,
        "made_by": f"python -m reference.make_tiny --name {recipe.name}",
        "init": {"tok_embeddings_std": recipe.embedding_std,
                 "linear_std": "1/sqrt(fan_in)",
                 "output_std": None if recipe.output_gain is None else f"{recipe.output_gain}/sqrt(dim)",
                 "norm_weight_uniform": [0.75, 1.25], "final_norm_weight_uniform": list(recipe.final_norm),
                 "generator": "splitmix64 over counters keyed by sha256(seed:name); stored as bfloat16"}})
    return folder


def _write_json(path: Path, data) -> None:
    path.write_text(dumps(data) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.make_tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="parent folder; each checkpoint goes to OUT/NAME")
    parser.add_argument("--name", choices=sorted(RECIPES), action="append",
                        help="build only this recipe (repeatable; default: all)")
    parser.add_argument("--prompts", help="prompt specs whose tokens the tiny vocabulary must hold "
                                          "(default: reference/prompts.json)")
    args = parser.parse_args(argv)
    for name in args.name or sorted(RECIPES):
        folder = write_tiny_checkpoint(RECIPES[name], Path(args.out) / name, args.prompts)
        size = sum(f.stat().st_size for f in folder.iterdir())
        print(f"wrote {folder} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
