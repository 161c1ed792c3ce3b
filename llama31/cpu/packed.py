"""Packed weights for CPU decoding: linear layers whose weight is kept in oneDNN's blocked layout.

Why: decoding one token multiplies one row per sequence by every weight matrix. That is a matrix-vector
product, and it can go no faster than the weights stream from memory. On a CPU, F.linear's kernels for one row
stream large weights well below the memory's read speed; oneDNN's linear kernel, on a weight reordered once
into its blocked layout (the layout torch.compile's CPU backend picks for frozen weights), streams them faster.
The product is the same; only the order of the float additions differs (float32: ~1e-7 relative, like any
other matmul kernel). docs/benchmarks.md has the measurements and the commands that reproduce them.

The model never knows: packing is a module swap applied after loading, the way INT4 is.

    model = Transformer.from_pretrained(path, dtype=torch.bfloat16)  # on the CPU bf16 packs by default
                                                 # (defaults.py; pack=False keeps nn.Linear)
    pack_weights(model)                          # every large nn.Linear -> PackedLinear
    unpack_weights(model)                        # PackedLinear -> nn.Linear (to train, or change device/dtype)

    y = x W^T        x: (..., in_features)  W: (out_features, in_features)  y: (..., out_features)

A packed layer is for inference: its weight is an opaque tensor (``weight.is_mkldnn``) that takes no gradient
(gradients still flow back to the layer's input) and cannot change device or dtype. Checkpoints do not see the
packing: ``state_dict()`` returns the plain (out_features, in_features) weight, bit-identical to what was packed,
and ``load_state_dict`` takes a plain one and packs it again.
"""

from __future__ import annotations

import torch
from torch import nn

# Layers with fewer weights stay nn.Linear: a oneDNN call costs several times F.linear's fixed overhead, which
# outweighs its faster streaming on small matrices (2^19 float32 weights = 2 MiB, about a core's L2 cache).
PACK_MIN_WEIGHTS = 1 << 19


def packing_supported(weight: torch.Tensor) -> str | None:
    """None if ``weight`` can be packed here, else why not (a sentence for an error message)."""
    if weight.device.type != "cpu":
        return f"the weight is on {weight.device}; packing is for CPU inference"
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return f"the weight is {weight.dtype}; oneDNN packing here covers float32 and bfloat16"
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "this torch build has no oneDNN (mkldnn) linear kernels"
    if weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no native bfloat16 support in oneDNN (AVX512-BF16 / AMX)"
    return None


def packed_product(rows: torch.Tensor, packed_weight: torch.Tensor) -> torch.Tensor:
    """rows (n, in_features) @ W^T -> (n, out_features), W packed by PackedLinear."""
    return torch.ops.mkldnn._linear_pointwise(rows, packed_weight, None, "none", [], "")


class _PackedProduct(torch.autograd.Function):
    """packed_product with the gradient for its input, dL/drows = dL/dy W (a packed weight takes none)."""

    @staticmethod
    def forward(ctx, rows, packed_weight):
        ctx.save_for_backward(packed_weight)
        return packed_product(rows, packed_weight)

    @staticmethod
    def backward(ctx, grad_y):
        (packed_weight,) = ctx.saved_tensors
        return grad_y @ packed_weight.to_dense().to(grad_y.dtype), None


class PackedLinear(nn.Module):
    """A bias-free ``nn.Linear`` whose weight is stored in oneDNN's layout for a batch of one row."""

    def __init__(self, weight: torch.Tensor):
        """weight: the plain (out_features, in_features) matrix; ValueError if it cannot be packed here."""
        super().__init__()
        reason = packing_supported(weight)
        if reason:
            raise ValueError(f"cannot pack a ({weight.shape[0]}, {weight.shape[1]}) linear weight: {reason}")
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(_pack(weight), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        if linear.bias is not None:
            raise ValueError("PackedLinear packs bias-free layers (every Llama projection is one)")
        return cls(linear.weight)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` (bias=False) with the same weight."""
        weight = self.weight.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=False, dtype=weight.dtype, device="meta")
        linear.weight = nn.Parameter(weight)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        rows = x.reshape(-1, self.in_features).contiguous()  # (n, in_features): oneDNN takes a 2-D matrix
        if torch.is_grad_enabled() and rows.requires_grad:
            y = _PackedProduct.apply(rows, self.weight)  # oneDNN's op has no backward of its own
        else:
            y = packed_product(rows, self.weight)  # (n, out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout=oneDNN"

    # checkpoints see the plain weight
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight.detach().to_dense()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, the "
                              f"packed layer is ({self.out_features}, {self.in_features})")
            return
        with torch.no_grad():
            self.weight = nn.Parameter(_pack(weight.to(self.weight.dtype)), requires_grad=False)


def _pack(weight: torch.Tensor) -> torch.Tensor:
    # the second argument is the batch size the layout is chosen for: one row, as in decoding
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


@torch.no_grad()
def pack_weights(model: nn.Module, *, min_weights: int = PACK_MIN_WEIGHTS, required: bool = False) -> int:
    """Swap every bias-free ``nn.Linear`` of ``model`` with at least min_weights weights for a PackedLinear.

    Layers that cannot be packed here (not on the CPU, float16, INT4, fairscale's model-parallel layers) stay as
    they are. Returns how many layers were packed; with required=True, ValueError if none could be. Call it last:
    a packed model cannot change device or dtype.

    With tied embeddings (3.2 1B / 3B) the output layer gets its own packed copy of the embedding matrix (the
    lookup needs the plain one): vocab_size x dim more weights in memory. An INT4 output layer
    (llama31.quant.quantize_model(quantize_output=True), which unties a tied model) is left as it is, and the
    embedding stays the one float copy of the matrix.
    """
    swaps = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.Linear and module.bias is None and module.weight.numel() >= min_weights
             and packing_supported(module.weight) is None]
    for name, linear in swaps:
        _set_submodule(model, name, PackedLinear.from_linear(linear))
    if required and not swaps:
        linear = next((m for m in model.modules() if type(m) is nn.Linear), None)
        why = packing_supported(linear.weight) if linear is not None else "the model has no plain nn.Linear layer"
        raise ValueError(f"no layer of the model can be packed: {why or 'every layer is smaller than min_weights'}"
                         ". Packing needs float32 or bfloat16 weights on the CPU in one process; load with "
                         "pack=False (or None)")
    return len(swaps)


@torch.no_grad()
def unpack_weights(model: nn.Module) -> None:
    """Undo pack_weights: every PackedLinear becomes an nn.Linear again (tied output and embedding share again)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PackedLinear):
            _set_submodule(model, name, module.to_linear())
    args = getattr(model, "args", None)
    if getattr(args, "tie_word_embeddings", False):
        model.output.weight = model.tok_embeddings.weight


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
