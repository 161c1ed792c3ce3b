"""Run the Llama 3.1 decoder (interim: a forward pass on an embedded tiny model, or on --ckpt-dir)."""

import argparse
import time

import torch

from llama31 import ModelArgs, Transformer


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ckpt-dir", help="a Meta or HF checkpoint folder (default: a tiny random model)")
    args = parser.parse_args()
    if args.ckpt_dir:
        model = Transformer.from_pretrained(args.ckpt_dir)
    else:
        torch.manual_seed(0)
        model = Transformer(ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=768, max_seq_len=2048))
    tokens = torch.randint(0, model.args.vocab_size, (1, 16))
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(tokens)
    print(f"forward pass of {tokens.shape[1]} tokens: logits {tuple(logits.shape)} in "
          f"{time.perf_counter() - start:.3f} s; next token {logits[0, -1].argmax().item()}")


if __name__ == "__main__":
    main()
