"""One model-parallel process of tests/test_parallel.py, started by torchrun:

    torchrun --nproc_per_node N tests/parallel_worker.py OUT FOLDER... [--expect-error FOLDER...] [--fail FOLDER]

For each FOLDER it loads the model exactly as a user would (Transformer.from_pretrained; under torchrun that
splits it over the processes), and records the logits of fixed tokens and a greedy continuation. For each
--expect-error FOLDER it records the error that loading raises on this rank. All of it goes to OUT/rank{r}.pt,
written before --fail FOLDER is loaded with nothing to catch its error (the process must then exit).
"""

import argparse
import sys
from pathlib import Path

import torch

from llama31 import Transformer, parallel

VOCAB = 320  # the tiny test model's (tests/conftest.py)


def prompt_tokens() -> torch.Tensor:
    """The same (2, 40) prompt on every rank and in the single-process reference."""
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(11))


def greedy(model: Transformer, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Prefill the KV cache with prompt (bs, n), then `steps` argmax decode steps: (bs, steps) token ids."""
    bs, n = prompt.shape
    model.setup_cache(bs, n + steps)
    with torch.no_grad():
        token = model(prompt, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)  # (bs, 1)
        out = [token]
        for pos in range(n, n + steps - 1):
            token = model(token, pos)[:, -1].argmax(-1, keepdim=True)
            out.append(token)
    model.clear_cache()
    return torch.cat(out, dim=1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument("--expect-error", nargs="*", type=Path, default=[])
    parser.add_argument("--fail", type=Path)
    args = parser.parse_args()

    results = {}
    for folder in args.folders:
        model = Transformer.from_pretrained(folder)
        with torch.no_grad():
            logits = model(prompt_tokens())
        results[folder.name] = {"logits": logits, "greedy": greedy(model, prompt_tokens(), 8),
                                "local_heads": model.layers[0].attention.n_heads,
                                "numel": sum(p.numel() for p in model.parameters())}
    for folder in args.expect_error:
        try:
            Transformer.from_pretrained(folder)
            results[folder.name] = "no error"
        except Exception as e:  # the test checks which error, on which rank
            results[folder.name] = f"{type(e).__name__}: {e}"
    results["world_size"] = parallel.world_size()
    torch.save(results, args.out / f"rank{parallel.rank()}.pt")
    if args.fail:
        # raises on some rank: every process must exit rather than wait in the forward pass's all-reduces
        model = Transformer.from_pretrained(args.fail)
        model(prompt_tokens())
        print("loaded without error", file=sys.stderr)
    parallel.close()


if __name__ == "__main__":
    main()
