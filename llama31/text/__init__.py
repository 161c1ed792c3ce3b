"""Text <-> token ids: the Llama 3.1 tokenizer (tiktoken), streaming detokenization, the chat format, tool calls."""

from llama31.text.chat_format import AssistantReply, ChatFormat, Message, StopReason
from llama31.text.streaming import StreamDecoder
from llama31.text.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer
from llama31.text.tools import (
    BUILTIN_TOOLS,
    ToolCall,
    custom_tools_prompt,
    parse_tool_calls,
    tool_call_message,
    tool_prompt_messages,
    tool_result_message,
    tool_system_prompt,
)

__all__ = ["AssistantReply", "BUILTIN_TOOLS", "ChatFormat", "Message", "SPECIAL_TOKEN_NAMES", "StopReason",
           "StreamDecoder", "Tokenizer", "ToolCall", "custom_tools_prompt", "parse_tool_calls", "tool_call_message",
           "tool_prompt_messages", "tool_result_message", "tool_system_prompt"]
