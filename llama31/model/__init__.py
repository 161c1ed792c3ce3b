"""The Llama 3.1 decoder, one concept per module. Read in this order:
norm.py, rope.py, kv_cache.py, attention.py, feedforward.py, transformer.py (layers.py: how projections are built).

It needs torch and nothing else: speed (llama31/cpu/), INT4 (llama31/quant/) and model parallelism
(llama31/parallel.py) are applied from outside, by a layer factory at construction or a module swap after loading.
"""

from llama31.model.layers import Layers
from llama31.model.transformer import Transformer, TransformerBlock

__all__ = ["Layers", "Transformer", "TransformerBlock"]
