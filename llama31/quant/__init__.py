"""INT4 weight-only quantization (W4A16), read in this order:

    packing.py    the canonical layout (compressed-tensors pack-quantized), pack / unpack / dequantize
    rtn.py        round-to-nearest quantization of one weight matrix
    linear.py     Int4Linear: reference, CPU (torch's op, ours), CUDA and W4A8 forward paths behind one interface
    cpu_fused.py  torch's CPU int4 op (repacking)
    cpu_int4.py   our CPU kernels (csrc/), built on first use: W4A16 for decoding, W4A8 (int8 activations) as an option
    cuda.py       the fused CUDA extension (csrc/), built on first use
    formats.py    GPTQ and compressed-tensors checkpoints <-> Int4Linear tensors, quantization_config
    model.py      Int4Layers (the model factory) and quantize_model
    checkpoint.py INT4 folders: layers_for_checkpoint, hf_int4_layer (per module), quantize_checkpoint
                  (imported on its own: it needs llama31.checkpoints)
"""

from llama31.quant.formats import (
    Int4Settings,
    compressed_tensors_config,
    convert_layer,
    from_compressed_tensors,
    from_gptq,
    parse_quantization_config,
    permute_output_rows,
    to_compressed_tensors,
)
from llama31.quant.linear import Int4Linear, int4_linear_reference
from llama31.quant.model import Int4Layers, quantize_model
from llama31.quant.packing import dequantize, pack_int4, unpack_int4
from llama31.quant.rtn import quantize_weight, rtn_quantize

__all__ = [
    "Int4Layers",
    "Int4Linear",
    "Int4Settings",
    "compressed_tensors_config",
    "convert_layer",
    "dequantize",
    "from_compressed_tensors",
    "from_gptq",
    "int4_linear_reference",
    "pack_int4",
    "parse_quantization_config",
    "permute_output_rows",
    "quantize_model",
    "quantize_weight",
    "rtn_quantize",
    "to_compressed_tensors",
    "unpack_int4",
]
