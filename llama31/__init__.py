"""llama31: a readable, from-scratch PyTorch reference implementation of the Llama 3.1 decoder.

    from llama31 import Transformer, ModelArgs      # the model: needs torch alone
    from llama31 import Llama, Tokenizer            # generation and text: imported on first use

The model core (llama31.config, llama31.model) is imported here; everything else (text needs tiktoken,
checkpoints need safetensors, model parallelism needs fairscale) is imported when first named, so that
``import llama31.model`` costs torch and nothing more.
"""

import importlib

from llama31.config import ModelArgs, RopeScaling
from llama31.model import Layers, Transformer

__version__ = "0.1.0"

_LAZY = {  # public name -> the module that defines it
    "ChatCompletion": "llama31.generation", "Completion": "llama31.generation", "Llama": "llama31.generation",
    "Step": "llama31.generation",
    "AssistantReply": "llama31.text", "ChatFormat": "llama31.text", "Message": "llama31.text",
    "StreamDecoder": "llama31.text", "Tokenizer": "llama31.text", "ToolCall": "llama31.text",
}

__all__ = ["Layers", "ModelArgs", "RopeScaling", "Transformer", "__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups find it directly
        return value
    raise AttributeError(f"module 'llama31' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
