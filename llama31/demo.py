"""The embedded demo model: what `python examples/generate.py` runs when no checkpoint is given.

No trained Llama weights can ship with the code, so this is a small Llama 3.1-architecture model (the real
128256-token vocabulary, GQA, llama3-scaled RoPE) whose weights are drawn from a fixed seed: every run
builds the same model, and the whole pipeline (real tokenizer, chat format, prefill, KV-cache decoding,
sampling, streaming) runs for real in seconds on a CPU. Its text is NOT meaningful: the weights are random.
"""

import torch

from llama31.config import ModelArgs, RopeScaling
from llama31.model import Transformer

DEMO_ARGS = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, vocab_size=128256, hidden_dim=768,
                      rope_scaling=RopeScaling(), max_seq_len=8192)
DEMO_SEED = 31


def build_demo_model(*, dtype: torch.dtype = torch.float32, device=None) -> Transformer:
    """The demo model, bit-identical on every run: weights ~ N(0, 0.02) from DEMO_SEED, norms 1."""
    model = Transformer(DEMO_ARGS, dtype=dtype, device=device)
    generator = torch.Generator().manual_seed(DEMO_SEED)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a fixed order, so a fixed draw per parameter
            if param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.checkpoint_info = {"format": "demo", "path": None, "files": []}
    return model
