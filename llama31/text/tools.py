"""Tool calling in the Llama 3.1 chat format: the prompts that offer tools, and the calls read back from replies.

Llama 3.1 knows two kinds of tools (Meta's prompt-format documentation for Llama 3.1, in the llama-models
repository, models/llama3_1/prompt_format.md):

- Built-in tools, turned on by the system prompt. "Environment: ipython" turns on the code interpreter and
  "Tools: brave_search, wolfram_alpha" the others. The model calls one as <|python_tag|>, then
  ``brave_search.call(query="...")`` (or plain Python code for the interpreter), then <|eom_id|>: end of
  message, not of turn. The caller runs the tool, sends its output back as an ``ipython`` message, and the
  model goes on.
- Custom (zero-shot) tools, described as JSON in a user message. The model answers with a JSON object
  ``{"type": "function", "name": ..., "parameters": {...}}`` or, when the prompt asks for it,
  ``<function=NAME>{...}</function>``. The Python-list form ``[get_weather(city="Paris")]`` of Llama 3.2 and
  3.3 is read too.

    tool_prompt_messages(...)   the system message that turns tools on, and the user message with custom tools
    tool_system_prompt(...)     that system message's text
    custom_tools_prompt(...)    that user message's text
    parse_tool_calls(...)       a reply's text -> ToolCalls (ChatFormat does this for you: AssistantReply.tool_calls)
    tool_call_message(...)      a ToolCall -> the assistant message that makes it, to write a dialog by hand
    tool_result_message(...)    a tool's output -> the ipython message that returns it

Parsing evaluates nothing: Python-call syntax goes through ``ast`` and ``ast.literal_eval`` (literals only),
JSON through ``json``. A reply that is not a well-formed call is text: no tool call, no exception.
"""

from __future__ import annotations

import ast
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:  # chat_format imports this module, so the Message type is for annotations only
    from llama31.text.chat_format import Message

BUILTIN_TOOLS: tuple[str, ...] = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")
KNOWLEDGE_CUTOFF = "December 2023"  # the "Cutting Knowledge Date" of every Llama 3.1 system prompt
CustomFormat = Literal["json", "function_tag", "python_list"]

# The tools called as NAME.call(...); the code interpreter is called with plain code instead.
_CALLED_BUILTINS = ("brave_search", "wolfram_alpha", "photogen")
_BUILTIN_CALL_START = re.compile(rf"(?:{'|'.join(_CALLED_BUILTINS)})\s*\.\s*call\s*\(")
# One <function=NAME>{json}</function>; the closing tag may be missing at the very end of a reply.
_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>\s]+)>(?P<arguments>.*?)(?:</function>|\Z)", re.DOTALL)
# Month names spelt out here: strftime("%B") would follow the process's locale ("septembre" in French).
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")


@dataclass(frozen=True)
class ToolCall:
    """One tool call made by the assistant.

    name: the tool, e.g. "brave_search", "code_interpreter" or a custom function's name.
    arguments: its arguments by name, e.g. {"query": "latest price of gold"}; the code interpreter's are
        {"code": "..."}.
    call_id: None when read from a reply, because no Llama 3.1 format writes an id (Meta's llama-models makes
        up a random one per call); set your own with ``dataclasses.replace`` if your executor needs one.
    """

    name: str
    arguments: dict[str, Any]
    call_id: Optional[str] = None

    @property
    def builtin(self) -> bool:
        """True for the tools Llama 3.1 was trained on (BUILTIN_TOOLS), False for custom functions."""
        return self.name in BUILTIN_TOOLS

    def __str__(self) -> str:
        """The call as Python-like text, e.g. ``brave_search(query="gold price")``."""
        return f"{self.name}({_keyword_arguments(self.arguments)})"


# ---------------------------------------------------------------------- prompts in
def tool_system_prompt(builtin_tools: Sequence[str] = (), *, custom_tools: Sequence[Mapping] = (),
                       today: Optional[datetime.date] = None, instructions: str = "") -> str:
    """The system prompt that offers tools, laid out as Meta's Llama 3.1 prompt-format documentation shows.

        Environment: ipython                        if any tool is offered (turns on the code interpreter)
        Tools: brave_search, wolfram_alpha          the built-in tools other than code_interpreter
        Cutting Knowledge Date: December 2023
        Today Date: 21 September 2024

        {instructions}

    With no built-in tool but code_interpreter, the Tools line is left empty (the documentation's custom-tool
    examples show that empty line). The text ends with a newline, as in the documentation; the default
    ``ChatFormat`` (strip_content=True) drops it, ``ChatFormat(tokenizer, strip_content=False)`` encodes the
    documented ids exactly.

    Args:
        builtin_tools: names from BUILTIN_TOOLS, e.g. ["brave_search", "wolfram_alpha"].
        custom_tools: the custom tool definitions (see custom_tools_prompt); here only whether there are any
            matters: they need "Environment: ipython" too.
        today: the date for "Today Date" (default: today's local date).
        instructions: the usual system prompt, e.g. "You are a helpful assistant."
    """
    builtin_tools = _check_builtin_tools(builtin_tools)
    lines = []
    if builtin_tools or custom_tools:
        lines.append("Environment: ipython")
        named = [name for name in builtin_tools if name != "code_interpreter"]
        lines.append(f"Tools: {', '.join(named)}" if named else "")
    today = today or datetime.date.today()
    lines += [f"Cutting Knowledge Date: {KNOWLEDGE_CUTOFF}",
              f"Today Date: {today.day:02d} {_MONTHS[today.month - 1]} {today.year}"]
    text = "\n".join(lines)
    if instructions:
        text += "\n\n" + instructions
    return text + "\n"


def custom_tools_prompt(tools: Sequence[Mapping], *, custom_format: Literal["json", "function_tag"] = "json") -> str:
    """The user message that describes custom tools and asks for calls in one format (Meta's documentation).

    A tool definition is a dict in the shape of Meta's llama-models ToolDefinition::

        {"name": "trending_songs", "description": "Returns the trending songs on a Music site",
         "parameters": {"n": {"param_type": "int", "description": "The number of songs to return",
                              "required": True},
                        "genre": {"param_type": "str", "description": "...", "required": False}}}

    ("required" defaults to True). custom_format "json" asks for a JSON object per call, "function_tag" for
    ``<function=NAME>{...}</function>``. The text is the documentation's, character for character, including
    two oddities of its JSON listing, kept because that is the prompt Meta published: every parameter is
    given ``"type": "object"`` whatever its param_type, and "properties" is a list of one-entry objects.
    """
    if isinstance(tools, Mapping) or not isinstance(tools, Sequence) or not tools:
        raise TypeError("custom_tools_prompt: tools must be a non-empty list of tool definitions such as "
                        "[{'name': 'get_weather', 'description': '...', 'parameters': {...}}]")
    for index, tool in enumerate(tools):
        _check_tool_definition(tool, f"custom_tools_prompt: tools[{index}]")
    if custom_format == "json":
        listing = "\n".join(_json_tool_listing(tool) for tool in tools)
        return ("Answer the user's question by making use of the following functions if needed.\n"
                "If none of the function can be used, please say so.\n"
                f"Here is a list of functions in JSON format:\n{listing}\n\n"
                "Return function calls in JSON format.")
    if custom_format == "function_tag":
        listing = "".join(_function_tag_tool_listing(tool) for tool in tools)
        return ("You have access to the following functions:\n\n"
                f"{listing}"
                "Think very carefully before calling functions.\n"
                "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
                '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
                "Reminder:\n"
                "- If looking for real time information use relevant functions before falling back to brave_search\n"
                "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
                "- Required parameters MUST be specified\n"
                "- Only call one function at a time\n"
                "- Put the entire function call reply on one line")
    raise ValueError(f"custom_tools_prompt: custom_format must be 'json' or 'function_tag' (the two formats of "
                     f"Llama 3.1's documentation), got {custom_format!r}")


def tool_prompt_messages(builtin_tools: Sequence[str] = (), custom_tools: Sequence[Mapping] = (), *,
                         today: Optional[datetime.date] = None, instructions: str = "",
                         custom_format: Literal["json", "function_tag"] = "json") -> list[Message]:
    """The first messages of a dialog with tools: the system message (tool_system_prompt) and, if there are
    custom tools, the user message that describes them (custom_tools_prompt), as the documentation does.
    Append the user's question after them."""
    messages: list[Message] = [{"role": "system", "content": tool_system_prompt(
        builtin_tools, custom_tools=custom_tools, today=today, instructions=instructions)}]
    if custom_tools:
        messages.append({"role": "user", "content": custom_tools_prompt(custom_tools, custom_format=custom_format)})
    return messages


def _json_tool_listing(tool: Mapping) -> str:
    parameters = tool.get("parameters") or {}
    properties = ",".join(f"""
                {{
                    {json.dumps(name)}: {{
                        "type": "object",
                        "description": {json.dumps(parameter.get("description") or "")}
                    }}
                }}""" for name, parameter in parameters.items())
    required = [name for name, parameter in parameters.items() if parameter.get("required", True)]
    return f"""{{
    "type": "function",
    "function": {{
        "name": {json.dumps(tool["name"])},
        "description": {json.dumps(tool.get("description") or "")},
        "parameters": {{
            "type": "object",
            "properties": [{properties}
            ],
            "required": {json.dumps(required)}
        }}
    }}
}}"""


def _function_tag_tool_listing(tool: Mapping) -> str:
    name, description = tool["name"], tool.get("description") or ""
    # The documentation's example lists the parameters with their keys sorted (name and description stay first).
    parameters = json.dumps(tool.get("parameters") or {}, sort_keys=True)
    return (f"Use the function '{name}' to '{description}':\n"
            f'{{"name": {json.dumps(name)}, "description": {json.dumps(description)}, "parameters": {parameters}}}\n\n')


# ---------------------------------------------------------------------- calls out
def parse_tool_calls(text: str, *, after_python_tag: bool) -> tuple[ToolCall, ...]:
    """The tool calls that a reply makes; () if it makes none or is not well formed.

    Args:
        text: with after_python_tag, the text the model wrote after <|python_tag|> (``AssistantReply.tool_call``);
            otherwise the whole reply (``AssistantReply.content``).
        after_python_tag: the model wrote <|python_tag|>, which it does for built-in tools, code, and JSON calls.

    Recognised, surrounded by nothing but whitespace:

        {"type": "function", "name": "f", "parameters": {...}}     a custom call ("type" is optional)
        <function=f>{"a": 1}</function>                            a custom call; several in a row are several
        [f(a=1, b="x"), g()]                                       custom calls, Python-list form (Llama 3.2)
        brave_search.call(query="...")                             a built-in call, after <|python_tag|> only
        anything else after <|python_tag|>                         code for code_interpreter: {"code": text}

    A reply that starts like a call but does not parse (bad JSON, JSON in single quotes, arguments that are
    not literals) makes no call. Only these exact shapes count: a call inside other text is text.
    """
    body = text.strip()
    if body.startswith("{"):
        return _json_call(body)
    if body.startswith("<function="):
        return _function_tag_calls(body)
    if body.startswith("["):
        calls = _python_list_calls(body)
        if calls or not after_python_tag:
            return calls
    if not after_python_tag or not body:
        return ()
    if _BUILTIN_CALL_START.match(body):
        return _builtin_call(body)
    return (ToolCall("code_interpreter", {"code": body}),)


def _json_call(body: str) -> tuple[ToolCall, ...]:
    try:
        call = json.loads(body)
    except (ValueError, RecursionError):  # json.JSONDecodeError is a ValueError
        return ()
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("parameters"), dict)
            and call.get("type", "function") == "function"):
        return ()
    return (ToolCall(call["name"], call["parameters"]),)


def _function_tag_calls(body: str) -> tuple[ToolCall, ...]:
    calls = []
    while body:
        match = _FUNCTION_TAG.match(body)
        if match is None:
            return ()
        try:
            arguments = json.loads(match["arguments"])
        except (ValueError, RecursionError):
            return ()
        if not isinstance(arguments, dict):
            return ()
        calls.append(ToolCall(match["name"], arguments))
        body = body[match.end():].lstrip()
    return tuple(calls)


def _python_list_calls(body: str) -> tuple[ToolCall, ...]:
    expression = _parse_expression(body)
    if not isinstance(expression, ast.List) or not expression.elts:
        return ()
    calls = []
    for element in expression.elts:
        arguments = _literal_keyword_arguments(element)
        if arguments is None or not isinstance(element.func, ast.Name):
            return ()
        calls.append(ToolCall(element.func.id, arguments))
    return tuple(calls)


def _builtin_call(body: str) -> tuple[ToolCall, ...]:
    expression = _parse_expression(body)
    arguments = _literal_keyword_arguments(expression)
    if arguments is None:
        return ()
    function = expression.func  # NAME.call, checked by _BUILTIN_CALL_START
    if not (isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name)):
        return ()
    return (ToolCall(function.value.id, arguments),)


def _parse_expression(body: str) -> Optional[ast.expr]:
    try:
        return ast.parse(body, mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL character
        return None


def _literal_keyword_arguments(node: Optional[ast.expr]) -> Optional[dict[str, Any]]:
    """{"a": 1, "b": "x"} for the call f(a=1, b="x"); None if node is not a call whose arguments are all
    keywords with literal values (``ast.literal_eval``: strings, numbers, lists, dicts, ..., never a name)."""
    if not isinstance(node, ast.Call) or node.args:
        return None
    arguments = {}
    for keyword in node.keywords:
        if keyword.arg is None:  # **kwargs
            return None
        try:
            arguments[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return None
    return arguments


# ---------------------------------------------------------------------- writing a dialog by hand
def tool_call_message(call: ToolCall, *, custom_format: CustomFormat = "json") -> Message:
    """The assistant message that makes ``call``, written the way Llama 3.1 writes it, for ChatFormat to encode.

    Built-in tools: <|python_tag|>brave_search.call(query="...")<|eom_id|>; code_interpreter:
    <|python_tag|>{code}<|eom_id|>. A custom call in custom_format "json":
    <|python_tag|>{"type": "function", "name": ..., "parameters": ...}<|eom_id|>; in "function_tag":
    <function=NAME>{...}</function><|eot_id|>; in "python_list": [NAME(a=1)]<|eot_id|> (the <|python_tag|>
    and <|eom_id|> or <|eot_id|> as the documentation's example replies show). A reply the model generated
    needs none of this: ``AssistantReply.to_message()`` re-encodes it exactly as generated.
    """
    if call.name == "code_interpreter":
        return {"role": "assistant", "content": "", "tool_call": call.arguments["code"]}
    if call.name in _CALLED_BUILTINS:
        return {"role": "assistant", "content": "",
                "tool_call": f"{call.name}.call({_keyword_arguments(call.arguments)})"}
    if custom_format == "json":
        return {"role": "assistant", "content": "",
                "tool_call": json.dumps({"type": "function", "name": call.name, "parameters": call.arguments})}
    if custom_format == "function_tag":
        return {"role": "assistant", "content": f"<function={call.name}>{json.dumps(call.arguments)}</function>"}
    if custom_format == "python_list":
        return {"role": "assistant", "content": f"[{call.name}({_keyword_arguments(call.arguments)})]"}
    raise ValueError(f"tool_call_message: custom_format must be 'json', 'function_tag' or 'python_list', "
                     f"got {custom_format!r}")


def tool_result_message(output: Any) -> Message:
    """The ipython message that returns a tool's output to the model: a str as it is, anything else as JSON."""
    return {"role": "ipython", "content": output if isinstance(output, str) else json.dumps(output)}


def _keyword_arguments(arguments: Mapping[str, Any]) -> str:
    for name in arguments:
        if not (isinstance(name, str) and name.isidentifier()):
            raise ValueError(f"tool call argument name {name!r} cannot be written as a Python keyword argument")
    return ", ".join(f"{name}={_python_literal(value)}" for name, value in arguments.items())


def _python_literal(value: Any) -> str:
    """Python source for a JSON-like value that ``ast.literal_eval`` reads back: strings in double quotes."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is also a Python string literal
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_python_literal(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"tool call argument {value!r} of type {type(value).__name__} is not a JSON-like value")


# ---------------------------------------------------------------------- checks
def _check_builtin_tools(builtin_tools) -> list[str]:
    if isinstance(builtin_tools, str):
        raise TypeError(f"tool_system_prompt: builtin_tools is a list of names, got the string {builtin_tools!r} "
                        f"(write [{builtin_tools!r}])")
    builtin_tools = list(builtin_tools)
    unknown = [name for name in builtin_tools if name not in BUILTIN_TOOLS]
    if unknown:
        raise ValueError(f"tool_system_prompt: {unknown} not among Llama 3.1's built-in tools "
                         f"{', '.join(BUILTIN_TOOLS)}; describe other tools with custom_tools")
    return builtin_tools


def _check_tool_definition(tool, where: str) -> None:
    if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
        raise TypeError(f"{where}: a tool definition is a dict with a 'name' (str), 'description' and "
                        f"'parameters', got {tool!r}")
    parameters = tool.get("parameters") or {}
    if not isinstance(parameters, Mapping) or not all(isinstance(p, Mapping) for p in parameters.values()):
        raise TypeError(f"{where}: 'parameters' maps each parameter's name to a dict such as "
                        "{'param_type': 'str', 'description': '...', 'required': True}, "
                        f"got {parameters!r}")
