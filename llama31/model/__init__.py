"""The Llama 3.1 decoder, one concept per module. Read in this order:
norm.py, rope.py, kv_cache.py, attention.py, feedforward.py, transformer.py (layers.py: how projections are built).
"""

from llama31.model.layers import Layers
from llama31.model.transformer import Transformer, TransformerBlock

__all__ = ["Layers", "Transformer", "TransformerBlock"]
