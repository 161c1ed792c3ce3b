"""INT4 models: the ``Int4Layers`` factory and ``quantize_model`` (a float Transformer -> an INT4 one).

The decoder never knows it is quantized: ``Transformer(args, layers=Int4Layers(group_size=128))`` asks the
factory for its projections by role (llama31/model/layers.py), and gets ``Int4Linear`` for the seven
linear layers of every block (wq, wk, wv, wo, w1, w2, w3). The token embedding and the output projection
stay 16-bit by default: they are 2 x 0.5 G of the 8B model's weights, the output layer is the most
sensitive one, and published w4a16 checkpoints keep them ("ignore": ["lm_head"]).

quantize_output=True makes the output projection INT4 too: decoding reads it whole at every token, while the
embedding is only indexed. With tied embeddings (3.2 1B / 3B) the one shared matrix cannot be both, so
quantize_model unties it: the lookup keeps the exact 16-bit matrix, the output layer gets an INT4 copy of it,
and the new model's args say tie_word_embeddings=False (they are two tensors now, and a folder saved from the
model stores both: llama31.quant.checkpoint.quantize_checkpoint(quantize_output=True)).
"""

from __future__ import annotations

import torch
from torch import nn

from llama31.model.layers import Layers
from llama31.quant.linear import Int4Linear
from llama31.quant.rtn import quantize_weight


class Int4Layers(Layers):
    """Builds ``Int4Linear`` for the column / row projections (and, if asked, the output layer)."""

    def __init__(self, group_size: int = 128, *, zero_point: bool = False, act_order: bool = False,
                 quantize_output: bool = False, backend: str | None = None):
        self.group_size = group_size
        self.zero_point = zero_point  # asymmetric layers: each carries weight_zero_point
        self.act_order = act_order  # each layer carries input_perm (GPTQ desc_act checkpoints)
        self.quantize_output = quantize_output
        self.backend = backend  # None: follow Int4Linear.backend

    def _int4(self, in_features: int, out_features: int, dtype: torch.dtype, device) -> Int4Linear:
        return Int4Linear(in_features, out_features, group_size=self.group_size, zero_point=self.zero_point,
                          act_order=self.act_order, dtype=dtype, device=device, backend=self.backend)

    def column(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        return self._int4(in_features, out_features, dtype, device)

    def row(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        return self._int4(in_features, out_features, dtype, device)

    def output(self, dim: int, vocab_size: int, *, dtype: torch.dtype, device) -> nn.Module:
        if self.quantize_output:
            return self._int4(dim, vocab_size, dtype, device)
        return super().output(dim, vocab_size, dtype=dtype, device=device)


@torch.no_grad()
def quantize_model(model: nn.Module, group_size: int = 128, *, zero_point: bool = False,
                   quantize_output: bool = False, backend: str | None = None) -> nn.Module:
    """A new INT4 Transformer with ``model``'s weights, every Int4Linear quantized round-to-nearest.

    model: a float ``llama31.model.transformer.Transformer`` (any dtype / device; left unchanged).
    quantize_output: the output projection too (same group size and symmetry). A tied model is untied: its
    embedding stays the exact float matrix and the output layer quantizes that same matrix (see above).
    Builds ``type(model)(args, dtype, device, layers=Int4Layers(...))`` and loads it with strict
    key checking: the quantized tensors for each Int4Linear, every other tensor copied as it is.
    """
    source = model.state_dict()
    first = next(iter(source.values()))
    dtype = next((t.dtype for t in source.values() if t.is_floating_point()), torch.float32)
    layers = Int4Layers(group_size, zero_point=zero_point, quantize_output=quantize_output, backend=backend)
    args = model.args
    if quantize_output and args.tie_word_embeddings:
        args = args.replace(tie_word_embeddings=False)  # source's output.weight (the embedding) is quantized below
    quantized = type(model)(args, dtype=dtype, device=first.device, layers=layers)

    state = {}
    int4_names = {name for name, module in quantized.named_modules() if isinstance(module, Int4Linear)}
    for name in int4_names:
        weight = source.pop(f"{name}.weight")
        for key, tensor in quantize_weight(weight, group_size, symmetric=not zero_point, scale_dtype=dtype).items():
            state[f"{name}.{key}"] = tensor
    state.update(source)  # norms, embeddings, the output layer: unchanged
    quantized.load_state_dict(state, strict=True)
    return quantized
