"""Text <-> token ids: the Llama 3.1 tokenizer (tiktoken), streaming detokenization, the chat format."""

from llama31.text.chat_format import AssistantReply, ChatFormat, Message, StopReason
from llama31.text.streaming import StreamDecoder
from llama31.text.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer

__all__ = ["AssistantReply", "ChatFormat", "Message", "SPECIAL_TOKEN_NAMES", "StopReason", "StreamDecoder", "Tokenizer"]
