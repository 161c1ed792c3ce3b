"""llama31: a readable, from-scratch PyTorch reference implementation of the Llama 3.1 decoder."""

from llama31.config import ModelArgs, RopeScaling
from llama31.model import Layers, Transformer

__version__ = "0.1.0"

__all__ = ["Layers", "ModelArgs", "RopeScaling", "Transformer", "__version__"]
