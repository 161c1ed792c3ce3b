"""The Llama 3.1 chat format: dialogs -> prompt token ids, and generated ids -> the assistant's reply.

    <|begin_of_text|>
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>          one per message
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                          prompts the reply

Roles: system, user, assistant, ipython (the result of a tool call). An assistant message that calls a tool
is ``<|python_tag|>{call}<|eom_id|>``: end of message, not of turn, because the tool's result comes next as
an ipython message and then the assistant continues. ("Environment: ipython" in the system prompt enables
the code interpreter; the system prompt is ordinary content here, nothing is added to it.) The prompts that
offer tools, and the structured calls read back from a reply (``AssistantReply.tool_calls``), are in
llama31/text/tools.py.

Stripping: by default the content (and tool call) of every message is stripped of leading and trailing
whitespace before encoding, as Meta's original Llama 3 chat format does (``content.strip()``) and HF's chat
template does (``| trim``); the instruct models were tuned on stripped turns, and a stray trailing newline
would otherwise change the prompt's last tokens. ``ChatFormat(tokenizer, strip_content=False)`` encodes
content verbatim, as Meta's later llama-models code does. Content is always plain text: "<|eot_id|>" typed by
a user is encoded as the characters it consists of, never as the special token.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional, TypedDict

from llama31.text.tokenizer import Tokenizer
from llama31.text.tools import ToolCall, parse_tool_calls

Role = Literal["system", "user", "assistant", "ipython"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "ipython")
StopReason = Literal["eot", "eom", "end_of_text", "length"]


class _MessageFields(TypedDict):
    role: Role
    content: str


class Message(_MessageFields, total=False):
    """One turn of a dialog: {"role": ..., "content": ...}, plus "tool_call" for an assistant's tool call.

    tool_call: the text after <|python_tag|>, e.g. code for the interpreter or
        'brave_search.call(query="...")'. Content, usually empty then, comes before the tag, in the order
        in which the model writes them (so that ``AssistantReply.to_message`` re-encodes a reply exactly).
    """

    tool_call: str


@dataclass(frozen=True)
class AssistantReply:
    """The assistant's reply parsed from generated ids.

    content: the text before any <|python_tag|> (verbatim, not stripped).
    tool_call: the text after <|python_tag|>, or None if the reply has no <|python_tag|>.
    stop_reason: "eot" (the turn is over), "eom" (a tool call awaits its result), "end_of_text", or
        "length" (generation stopped before any stop token: a call may be cut short).
    tool_calls: the calls the reply makes, each a ToolCall(name, arguments), read from the text above
        (tools.parse_tool_calls); () for a plain answer. content and tool_call keep the raw text the calls were
        read from, so that ``to_message`` re-encodes the reply exactly as generated.
    """

    content: str
    tool_call: Optional[str]
    stop_reason: StopReason

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        """The tool calls in this reply, e.g. (ToolCall("brave_search", {"query": "..."}),); () if none."""
        if self.tool_call is not None:
            return parse_tool_calls(self.tool_call, after_python_tag=True)
        return parse_tool_calls(self.content, after_python_tag=False)

    def to_message(self) -> Message:
        """The reply as a Message, ready to append to the dialog for the next turn."""
        message: Message = {"role": "assistant", "content": self.content}
        if self.tool_call is not None:
            message["tool_call"] = self.tool_call
        return message


class ChatFormat:
    """Encodes dialogs in the Llama 3.1 instruct format and parses the model's replies.

    Args:
        tokenizer: a llama31 Tokenizer.
        strip_content: strip leading/trailing whitespace of each message's content (module docstring).
    """

    def __init__(self, tokenizer: Tokenizer, *, strip_content: bool = True):
        self.tokenizer = tokenizer
        self.strip_content = strip_content

    def encode_header(self, role: str) -> list[int]:
        """<|start_header_id|>{role}<|end_header_id|>\\n\\n as ids."""
        _check_role(role, "ChatFormat.encode_header")
        return [
            self.tokenizer.token_to_id("<|start_header_id|>"),
            *self.tokenizer.encode(role, bos=False, eos=False),
            self.tokenizer.token_to_id("<|end_header_id|>"),
            *self.tokenizer.encode("\n\n", bos=False, eos=False),
        ]

    def encode_message(self, message: Message) -> list[int]:
        """Header, content, then <|eot_id|>; with a tool call: header, content, <|python_tag|>, call, <|eom_id|>."""
        _check_message(message, "ChatFormat.encode_message")
        tokens = self.encode_header(message["role"])
        tokens += self._encode_text(message["content"])
        tool_call = message.get("tool_call")
        if tool_call is None:
            tokens.append(self.tokenizer.eot_id)
        else:
            tokens.append(self.tokenizer.python_tag_id)
            tokens += self._encode_text(tool_call)
            tokens.append(self.tokenizer.eom_id)
        return tokens

    def encode_dialog_prompt(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """<|begin_of_text|>, every message, then (by default) the assistant header that prompts a reply."""
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise TypeError("ChatFormat.encode_dialog_prompt: messages must be a list of messages such as "
                            f"[{{'role': 'user', 'content': 'Hi'}}], got {type(messages).__name__}")
        tokens = [self.tokenizer.bos_id]
        for index, message in enumerate(messages):
            _check_message(message, f"ChatFormat.encode_dialog_prompt: messages[{index}]")
            tokens += self.encode_message(message)
        if add_generation_prompt:
            tokens += self.encode_header("assistant")
        return tokens

    def decode_assistant_reply(self, ids: Sequence[int]) -> AssistantReply:
        """Parse the ids generated after the assistant header (the prompt excluded).

        The reply ends at the first stop token (<|eot_id|>, <|eom_id|> or <|end_of_text|>); ids after it are
        ignored. Without a stop token the stop reason is "length". Text after a <|python_tag|> is the tool call.
        """
        # plain ints (a tensor's elements would not match dict keys); anything that is not a token id is an error
        ids = [self.tokenizer.check_id(i, f"ids[{n}]", "ChatFormat.decode_assistant_reply") for n, i in enumerate(ids)]
        stop_reasons = {self.tokenizer.eot_id: "eot", self.tokenizer.eom_id: "eom",
                        self.tokenizer.eos_id: "end_of_text"}
        stop_reason: StopReason = "length"
        for position, token_id in enumerate(ids):
            if token_id in stop_reasons:
                stop_reason = stop_reasons[token_id]
                ids = ids[:position]
                break
        if self.tokenizer.python_tag_id in ids:
            tag = ids.index(self.tokenizer.python_tag_id)
            return AssistantReply(content=self.tokenizer.decode(ids[:tag]),
                                  tool_call=self.tokenizer.decode(ids[tag + 1:]), stop_reason=stop_reason)
        return AssistantReply(content=self.tokenizer.decode(ids), tool_call=None, stop_reason=stop_reason)

    def _encode_text(self, text: str) -> list[int]:
        # allowed_special="none": whatever the text says, it cannot produce a special token.
        return self.tokenizer.encode(text.strip() if self.strip_content else text, bos=False, eos=False,
                                     allowed_special="none")


def _check_role(role, where: str) -> None:
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {', '.join(ROLES)} "
                         "(a tool's result is sent with role 'ipython')")


def _check_message(message, where: str) -> None:
    if not isinstance(message, Mapping):
        raise TypeError(f"{where}: a message is a dict like {{'role': 'user', 'content': 'Hi'}}, "
                        f"got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"{where}: the message has no {key!r}; it has keys {sorted(message)}")
    _check_role(message["role"], where)
    if not isinstance(message["content"], str):
        raise TypeError(f"{where}: content must be a str, got {type(message['content']).__name__}")
    unknown = sorted(set(message) - {"role", "content", "tool_call"})
    if unknown:
        raise ValueError(f"{where}: unknown message key(s) {unknown}; a message has role, content and, for "
                         "an assistant's tool call, tool_call")
    tool_call = message.get("tool_call")
    if tool_call is not None:
        if message["role"] != "assistant":
            raise ValueError(f"{where}: only assistant messages may carry a tool_call, this one is "
                             f"{message['role']!r}; a tool's result is an 'ipython' message with content")
        if not isinstance(tool_call, str):
            raise TypeError(f"{where}: tool_call must be a str (the text after <|python_tag|>), "
                            f"got {type(tool_call).__name__}")
