"""llama31: a readable, from-scratch PyTorch reference implementation of the Llama 3.1 decoder."""

from llama31.config import ModelArgs, RopeScaling
from llama31.generation import ChatCompletion, Completion, Llama, Step
from llama31.model import Layers, Transformer
from llama31.text import AssistantReply, ChatFormat, Message, StreamDecoder, Tokenizer

__version__ = "0.1.0"

__all__ = ["AssistantReply", "ChatCompletion", "ChatFormat", "Completion", "Layers", "Llama", "Message",
           "ModelArgs", "RopeScaling", "Step", "StreamDecoder", "Tokenizer", "Transformer", "__version__"]
