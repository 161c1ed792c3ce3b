"""Tool calling (llama31/text/tools.py and AssistantReply.tool_calls), checked against Meta's own llama-models.

Two independent oracles, both from Meta's `llama-models` package (PyPI, installed by the test extra):
- its code: ChatFormat.decode_assistant_message_from_content (which uses ToolUtils) reads tool calls from a reply,
  and ChatFormat.encode_dialog_prompt encodes dialogs with tool calls and tool results;
- its documentation of the Llama 3.1 prompt format, llama_models/llama3_1/prompt_format.md, shipped in the same
  package: the example prompts (the text of the ids Meta's code produced when it generated the page) and the
  model's replies to them.
Where Meta's code departs from its own documentation or reads a reply loosely, the test says which and why, and
pins both behaviours, so that a change on either side shows up here.
"""

from __future__ import annotations

import datetime
import importlib.resources
import importlib.util
import re
from pathlib import Path

import pytest
from llama_models.datatypes import BuiltinTool, RawMessage, StopReason, ToolPromptFormat
from llama_models.datatypes import ToolCall as MetaToolCall
from llama_models.llama3.chat_format import ChatFormat as MetaChatFormat
from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

from llama31.text import (
    AssistantReply,
    ChatFormat,
    Tokenizer,
    ToolCall,
    custom_tools_prompt,
    parse_tool_calls,
    tool_call_message,
    tool_prompt_messages,
    tool_result_message,
    tool_system_prompt,
)

ROOT = Path(__file__).resolve().parents[1]
PYTHON_TAG = 128010
TODAY = datetime.date(2024, 9, 21)  # the date of the documentation's examples
SONGS_TOOL = {  # the custom tool of the documentation's examples
    "name": "trending_songs",
    "description": "Returns the trending songs on a Music site",
    "parameters": {
        "n": {"param_type": "int", "description": "The number of songs to return", "required": True},
        "genre": {"param_type": "str", "description": "The genre of the songs to return", "required": False},
    },
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def chat(tok) -> ChatFormat:
    # Meta's llama-models encodes content verbatim; the default (stripped) encoding is tested in test_chat_format.
    return ChatFormat(tok, strip_content=False)


@pytest.fixture(scope="module")
def meta_tok() -> MetaTokenizer:
    return MetaTokenizer.get_instance()  # the tokenizer.model shipped inside llama-models


@pytest.fixture(scope="module")
def meta_chat(meta_tok) -> MetaChatFormat:
    return MetaChatFormat(meta_tok)


@pytest.fixture(scope="module")
def documented() -> dict[str, tuple[str, str]]:
    """The documentation's examples: section title -> (prompt text, the model's reply text)."""
    page = (importlib.resources.files("llama_models") / "llama3_1" / "prompt_format.md").read_text()
    examples = {}
    for section in page.split("\n## ")[1:]:
        found = re.search(r"##### Input Prompt Format\n```\n(.*?)\n```\n\n##### Model Response Format\n```\n(.*?)\n```",
                          section, re.DOTALL)
        if found:
            examples[section.splitlines()[0].strip()] = (found[1], found[2])
    return examples


def our_calls(chat, meta_tok, text: str) -> list[tuple[str, dict]]:
    """The calls we read from a reply given as text, special tokens written out; ids from Meta's tokenizer."""
    ids = meta_tok.encode(text, bos=False, eos=False, allowed_special="all")
    return [(call.name, call.arguments) for call in chat.decode_assistant_reply(ids).tool_calls]


def meta_calls(meta_chat, text: str) -> list[tuple[str, dict]]:
    """The calls Meta's ChatFormat reads from the same text."""
    message = meta_chat.decode_assistant_message_from_content(text, StopReason.end_of_turn)
    return [(call.tool_name.value if isinstance(call.tool_name, BuiltinTool) else call.tool_name, call.arguments)
            for call in message.tool_calls]


# ---------------------------------------------------------------------- replies: where we agree with Meta
GOLD = '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>'
CODE = "def is_prime(n):\n    if n <= 1:\n        return False\n    return all(n % i for i in range(2, n))\n\n" \
       "print(is_prime(7))"
AGREED = [  # (reply text as the model writes it, the calls it makes)
    # built-in tools, after <|python_tag|>
    (GOLD, [("brave_search", {"query": "latest price of 1oz gold"})]),
    ('<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>',
     [("wolfram_alpha", {"query": "100th decimal of pi"})]),
    ('<|python_tag|>photogen.call(query="a red fox in the snow")<|eom_id|>',
     [("photogen", {"query": "a red fox in the snow"})]),
    ('<|python_tag|>brave_search.call(query="Zürich Wetter heute 🙂")<|eom_id|>',
     [("brave_search", {"query": "Zürich Wetter heute 🙂"})]),
    ('<|python_tag|>brave_search.call(query="")<|eom_id|>', [("brave_search", {"query": ""})]),
    ('<|python_tag|>wolfram_alpha.call(query="integrate x^2 dx")<|eot_id|>',  # eot instead of eom: still a call
     [("wolfram_alpha", {"query": "integrate x^2 dx"})]),
    ('Let me look that up.<|python_tag|>brave_search.call(query="weather in Menlo Park")<|eom_id|>',
     [("brave_search", {"query": "weather in Menlo Park"})]),
    # code for the interpreter
    ("<|python_tag|>print(2 ** 100)<|eom_id|>", [("code_interpreter", {"code": "print(2 ** 100)"})]),
    (f"<|python_tag|>{CODE}<|eom_id|>", [("code_interpreter", {"code": CODE})]),
    ("<|python_tag|>import math\nprint(math.factorial(20))<|eom_id|>",
     [("code_interpreter", {"code": "import math\nprint(math.factorial(20))"})]),
    ("<|python_tag|>def f(:\n  return<|eom_id|>", [("code_interpreter", {"code": "def f(:\n  return"})]),  # the
    # interpreter reports the syntax error back to the model; the documentation's own example has one
    ("<|python_tag|>[print(i) for i in range(3)]<|eom_id|>",  # a list, but not of calls: code
     [("code_interpreter", {"code": "[print(i) for i in range(3)]"})]),
    # custom tools, JSON
    ('<|python_tag|>{\n    "type": "function",\n    "name": "trending_songs",\n    "parameters": {\n        "n": "10",'
     '\n        "genre": "all"\n    }\n}<|eom_id|>', [("trending_songs", {"n": "10", "genre": "all"})]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>', [("get_weather", {"city": "Paris"})]),
    ('{"type": "function", "name": "get_weather", "parameters": {"city": "San Francisco", "unit": "celsius"}}'
     '<|eot_id|>', [("get_weather", {"city": "San Francisco", "unit": "celsius"})]),
    ('{"name": "book", "parameters": {"seats": 2, "window": true, "note": null, "price": 12.5}}<|eot_id|>',
     [("book", {"seats": 2, "window": True, "note": None, "price": 12.5})]),
    ('{"name": "search", "parameters": {"tags": ["a", "b"], "filter": {"year": 2024}}}<|eot_id|>',
     [("search", {"tags": ["a", "b"], "filter": {"year": 2024}})]),
    ('{"name": "get_time", "parameters": {}}<|eot_id|>', [("get_time", {})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Tōkyō"}}<|eom_id|>',
     [("get_weather", {"city": "Tōkyō"})]),
    # custom tools, <function=NAME>{json}</function>
    ('<function=trending_songs>{"n": 10}</function><|eot_id|>', [("trending_songs", {"n": 10})]),
    ('<function=get_weather>{"city": "San Francisco", "unit": "celsius"}</function><|eot_id|>',
     [("get_weather", {"city": "San Francisco", "unit": "celsius"})]),
    ('<function=get_weather>{"city": "Oslo"}<|eot_id|>', [("get_weather", {"city": "Oslo"})]),  # no closing tag
    ('<|python_tag|><function=get_weather>{"city": "Rome"}</function><|eom_id|>', [("get_weather", {"city": "Rome"})]),
    # custom tools, the Python-list form of Llama 3.2 and 3.3
    ('[get_weather(city="Paris")]<|eot_id|>', [("get_weather", {"city": "Paris"})]),
    ("[get_weather(city='Paris', days=3)]<|eot_id|>", [("get_weather", {"city": "Paris", "days": 3})]),
    ('[search(tags=["a", "b"], exact=True, limit=None)]<|eot_id|>',
     [("search", {"tags": ["a", "b"], "exact": True, "limit": None})]),
    ("[get_time()]<|eot_id|>", [("get_time", {})]),
    # plain answers: no call
    ("The capital of France is Paris.<|eot_id|>", []),
    ("I'm sorry, I can't help with that.<|eot_id|>", []),
    ("<|eot_id|>", []),
    ('{"answer": 42}<|eot_id|>', []),  # JSON, but not a call
    ("[1, 2, 3]<|eot_id|>", []),  # a Python list, but not of calls
    ("[get_weather('Paris')]<|eot_id|>", []),  # a positional argument: not the format
    # malformed calls: text, no exception
    ('<function=get_weather>{"city": "Paris",}</function><|eot_id|>', []),  # bad JSON (trailing comma)
    ('{"name": "get_weather", "parameters": {"city": "Paris"}<|eot_id|>', []),  # bad JSON (unclosed)
    ('<function=get_weather>["Paris"]</function><|eot_id|>', []),  # arguments not an object
    ('[get_weather(city="Paris"]<|eot_id|>', []),  # bad Python
]


@pytest.mark.parametrize("text, expected", AGREED, ids=[f"agreed{i}" for i in range(len(AGREED))])
def test_calls_read_from_a_reply_agree_with_llama_models(chat, meta_tok, meta_chat, text, expected):
    assert our_calls(chat, meta_tok, text) == expected
    assert meta_calls(meta_chat, text) == expected


# ---------------------------------------------------------------------- replies: where we read them differently
DIFFERENT = [  # (reply text, our calls, Meta's calls or the exception it raises), and why
    # Meta searches the whole reply for `NAME.call(query="...")`; Llama 3.1 writes a built-in call after
    # <|python_tag|> only (the documentation), so without the tag, or for a NAME that is no built-in tool, we read
    # text / code: a reply that merely mentions a call is not one.
    pytest.param('You could run brave_search.call(query="gold price") yourself.<|eot_id|>',
                 [], [("brave_search", {"query": "gold price"})], id="builtin-without-python-tag"),
    pytest.param('<|python_tag|>my_search.call(query="x")<|eom_id|>',
                 [("code_interpreter", {"code": 'my_search.call(query="x")'})], [("my_search", {"query": "x"})],
                 id="not-a-builtin-tool"),
    # Meta's pattern for a built-in call has no escapes (query="[^"]*"), so a quote inside the query turns the call
    # into code for the interpreter; we read Python syntax with ast, escapes included.
    pytest.param('<|python_tag|>brave_search.call(query="the \\"Hello\\" song")<|eom_id|>',
                 [("brave_search", {"query": 'the "Hello" song'})],
                 [("code_interpreter", {"code": 'brave_search.call(query="the \\"Hello\\" song")'})],
                 id="escaped-quote-in-query"),
    # Meta reads a <function=...> call's arguments with a non-greedy {.*?}: a nested object is cut at its first }.
    pytest.param('<function=search>{"filter": {"year": 2024}}</function><|eot_id|>',
                 [("search", {"filter": {"year": 2024}})], [], id="function-tag-nested-object"),
    # Meta replaces every ' with " before json.loads: JSON in single quotes becomes a call (we keep it as text:
    # unknown quoting), and an apostrophe inside a string breaks a well-formed call.
    pytest.param("<function=get_weather>{'city': 'Paris'}</function><|eot_id|>",
                 [], [("get_weather", {"city": "Paris"})], id="function-tag-single-quotes"),
    pytest.param('<function=find_song>{"title": "Don\'t Stop Me Now"}</function><|eot_id|>',
                 [("find_song", {"title": "Don't Stop Me Now"})], [], id="function-tag-apostrophe"),
    # Meta finds a <function=...> call anywhere in the text and drops the text around it; the documented prompt
    # asks for the call "with no prefix or suffix", and we take only that.
    pytest.param('Sure! <function=get_weather>{"city": "Paris"}</function><|eot_id|>',
                 [], [("get_weather", {"city": "Paris"})], id="function-tag-after-text"),
    # Meta returns the first call of a Python list only (a FIXME in its code); we return them all.
    pytest.param('[get_weather(city="Paris"), get_weather(city="Rome")]<|eot_id|>',
                 [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})],
                 [("get_weather", {"city": "Paris"})], id="python-list-two-calls"),
    # Meta calls a JSON call to a built-in tool's name a built-in call and renames its first argument to query.
    pytest.param('{"name": "brave_search", "parameters": {"q": "gold price"}}<|eot_id|>',
                 [("brave_search", {"q": "gold price"})], [("brave_search", {"query": "gold price"})],
                 id="json-call-of-builtin-name"),
    # Meta looks for JSON only at the start of the reply, with the tag removed; text before <|python_tag|> (which
    # ChatFormat keeps as content) hides the call from it.
    pytest.param('Let me check.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
                 [("get_weather", {"city": "Paris"})], [], id="json-after-text-and-python-tag"),
    # Meta hands malformed JSON after <|python_tag|> to the code interpreter; it is a malformed call: no call.
    pytest.param('<|python_tag|>{"name": "get_weather", "parameters": {"city": }}<|eom_id|>',
                 [], [("code_interpreter", {"code": '{"name": "get_weather", "parameters": {"city": }}'})],
                 id="python-tag-bad-json"),
    # Meta raises on these; we read them as text.
    pytest.param("[get_weather(city=home_town)]<|eot_id|>", [], ValueError, id="python-list-not-a-literal"),
    pytest.param('{"name": "get_weather", "city": "Paris"}<|eot_id|>', [], KeyError, id="json-without-parameters"),
]


@pytest.mark.parametrize("text, ours, metas", DIFFERENT)
def test_calls_read_differently_from_llama_models(chat, meta_tok, meta_chat, text, ours, metas):
    assert our_calls(chat, meta_tok, text) == ours
    if isinstance(metas, type):
        with pytest.raises(metas):
            meta_calls(meta_chat, text)
    else:
        assert meta_calls(meta_chat, text) == metas


# ---------------------------------------------------------------------- the documentation's examples
def test_documented_prompts_are_the_ones_we_build(chat, tok, meta_chat, documented):
    """The four documented tool prompts, built with our helpers, encode to exactly the documented text, and to
    the ids of Meta's ChatFormat (the dialog with a call: test_round_trip_ids_match_llama_models)."""
    helpful = "You are a helpful assistant."
    songs_question = {"role": "user", "content": "Use tools to get latest trending songs"}
    pi_result = documented["Built-in tools full interaction"][0].split("ipython<|end_header_id|>\n\n")[1]
    dialogs = {
        "Builtin Tool Calling": [
            *tool_prompt_messages(["brave_search", "wolfram_alpha"], today=TODAY, instructions=helpful),
            {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}],
        "Built-in tools full interaction": [  # its system prompt is written by hand in the documentation
            {"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"},
            {"role": "user", "content": "What is the 100th decimal of pi?"},
            tool_call_message(ToolCall("wolfram_alpha", {"query": "100th decimal of pi"})),
            tool_result_message(pi_result.split("<|eot_id|>")[0])],
        "JSON based tool calling": [
            *tool_prompt_messages(custom_tools=[SONGS_TOOL], today=TODAY, instructions=helpful), songs_question],
        "`<function>` based tool calling": [
            *tool_prompt_messages(custom_tools=[SONGS_TOOL], today=TODAY, instructions=helpful,
                                  custom_format="function_tag"), songs_question],
    }
    for title, dialog in dialogs.items():
        ours = chat.encode_dialog_prompt(dialog)
        assert tok.decode(ours) == documented[title][0], title
        if not any("tool_call" in message for message in dialog):
            metas = meta_chat.encode_dialog_prompt([RawMessage(role=m["role"], content=m["content"]) for m in dialog])
            assert ours == metas.tokens, title


@pytest.mark.parametrize("title, expected", [
    ("Builtin Tool Calling", [("brave_search", {"query": "latest price of 1oz gold"})]),
    ("Builtin Code Interpreter", [("code_interpreter", {"code": "def is_prime(n):\n    if n <= 1\n        return "
                                  "False\n    for i in range(2, int(n**0.5) + 1):\n        if n % i == 0:\n"
                                  "            return False\n    return True\n\nprint(is_prime(7))  # Output: True"})]),
    ("Built-in tools full interaction", []),
    ("JSON based tool calling", [("trending_songs", {"n": "10", "genre": "all"})]),
    ("`<function>` based tool calling", [("trending_songs", {"n": 10})]),
])
def test_documented_replies_parse_as_llama_models_reads_them(chat, meta_tok, meta_chat, documented, title, expected):
    reply = documented[title][1]
    assert our_calls(chat, meta_tok, reply) == expected
    assert meta_calls(meta_chat, reply) == expected


# ---------------------------------------------------------------------- encoding whole round trips
SYSTEM = tool_system_prompt(["brave_search", "wolfram_alpha"], today=TODAY, instructions="You are a helpful assistant.")
SONGS_PROMPT = custom_tools_prompt([SONGS_TOOL])
ROUND_TRIPS = {  # name: (dialog steps, the custom-tool format); a step is (kind, value)
    "code": ([("system", "Environment: ipython"), ("user", "What is 2 to the power 100?"),
              ("call", ToolCall("code_interpreter", {"code": "print(2 ** 100)"})),
              ("result", "1267650600228229401496703205376"), ("assistant", "2^100 = 1267650600228229401496703205376.")],
             "json"),
    "function_tag": ([("system", SYSTEM), ("user", custom_tools_prompt([SONGS_TOOL], custom_format="function_tag")),
                      ("user", "Use tools to get latest trending songs"),
                      ("call", ToolCall("trending_songs", {"n": 10, "genre": "pop"})),
                      ("result", '["great song1", "awesome song2"]'), ("assistant", "Here are two trending songs.")],
                     "function_tag"),
    "python_list": ([("system", SYSTEM), ("user", "Weather in Paris?"),
                     ("call", ToolCall("get_weather", {"city": "Paris", "days": 3, "metric": True})),
                     ("result", '{"temperature": 18}'), ("assistant", "It is 18 degrees.")], "python_list"),
    "builtin": ([("system", SYSTEM), ("user", "What is the 100th decimal of pi?"),
                 ("call", ToolCall("wolfram_alpha", {"query": "100th decimal of pi"})),
                 ("result", '{"queryresult": {"success": true}}'), ("assistant", "It is 7.")], "json"),
    "json": ([("system", SYSTEM), ("user", SONGS_PROMPT), ("user", "Use tools to get latest trending songs"),
              ("call", ToolCall("trending_songs", {"n": "10", "genre": "all"})),
              ("result", '["great song1", "awesome song2"]'), ("assistant", "Here you go.")], "json"),
    "two_calls": ([("system", SYSTEM), ("user", "Gold price, then pi?"),
                   ("call", ToolCall("brave_search", {"query": "gold price"})), ("result", "2,650 USD"),
                   ("call", ToolCall("code_interpreter", {"code": "import math\nprint(math.pi)"})),
                   ("result", "3.141592653589793"), ("assistant", "Gold: 2,650 USD; pi: 3.14159.")], "json"),
}


def our_dialog(steps, custom_format):
    convert = {"system": lambda v: {"role": "system", "content": v}, "user": lambda v: {"role": "user", "content": v},
               "assistant": lambda v: {"role": "assistant", "content": v}, "result": tool_result_message,
               "call": lambda v: tool_call_message(v, custom_format=custom_format)}
    return [convert[kind](value) for kind, value in steps]


def meta_dialog(steps, custom_format):
    def convert(kind, value):
        if kind == "call":  # a call written after <|python_tag|> (built-in, code, JSON) ends with eom
            waits = value.builtin or custom_format == "json"
            return RawMessage(role="assistant", content="",
                              tool_calls=[MetaToolCall(call_id="0", tool_name=value.name, arguments=value.arguments)],
                              stop_reason=StopReason.end_of_message if waits else StopReason.end_of_turn)
        return RawMessage(role="tool" if kind == "result" else kind, content=value)

    return [convert(kind, value) for kind, value in steps]


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip_ids_match_llama_models(chat, meta_chat, name):
    steps, custom_format = ROUND_TRIPS[name]
    ours = chat.encode_dialog_prompt(our_dialog(steps, custom_format))
    metas = meta_chat.encode_dialog_prompt(meta_dialog(steps, custom_format), ToolPromptFormat(custom_format)).tokens
    calls = [value for kind, value in steps if kind == "call"]
    tagged = [call for call in calls if call.builtin or custom_format == "json"]  # written after <|python_tag|>
    assert ours.count(PYTHON_TAG) == len(tagged)
    if all(call.name == "code_interpreter" for call in tagged):
        assert ours == metas
    else:
        # Meta's encode_message writes <|python_tag|> before code_interpreter calls only, but its documentation
        # shows the tag before built-in calls ("Built-in tools full interaction") and JSON calls ("JSON based tool
        # calling"), and the model writes it there; we follow the documentation. Everything else is the same.
        assert metas.count(PYTHON_TAG) == len([call for call in tagged if call.name == "code_interpreter"])
        assert [i for i in ours if i != PYTHON_TAG] == [i for i in metas if i != PYTHON_TAG]


# ---------------------------------------------------------------------- our own properties
@pytest.mark.parametrize("custom_format", ["json", "function_tag", "python_list"])
@pytest.mark.parametrize("call", [
    ToolCall("brave_search", {"query": 'the "Hello" song, and a \\ backslash'}),
    ToolCall("wolfram_alpha", {"query": "∫ x² dx"}),
    ToolCall("code_interpreter", {"code": "for i in range(3):\n    print(i)"}),
    ToolCall("get_weather", {"city": "Zürich", "unit": "celsius", "days": 3, "hourly": False, "note": None}),
    ToolCall("search", {"tags": ["a", "b"], "filter": {"year": 2024, "exact": True}, "quote": "it's \"fine\""}),
    ToolCall("get_time", {}),
], ids=str)
def test_a_written_call_reads_back_as_the_same_call(chat, tok, call, custom_format):
    message = tool_call_message(call, custom_format=custom_format)
    generated = chat.encode_message(message)[len(chat.encode_header("assistant")):]  # what the model would write
    reply = chat.decode_assistant_reply(generated)
    assert reply.tool_calls == (call,)
    assert reply.stop_reason == ("eom" if "tool_call" in message else "eot")
    assert chat.encode_message(reply.to_message()) == chat.encode_message(message)


MALFORMED_CALLS = [  # they start like a call but are none: no call, with or without <|python_tag|>
    "{", "<function=", "<function=f>", "<function=f>{", "{" * 2000, '{"name": "f", "parameters": ' * 500,
    '{"name": 1, "parameters": {}}', '{"type": "tool", "name": "f", "parameters": {}}',
    '{"name": "f", "parameters": []}',
    "<function=f>{}</function> and some text", "<function=f>{'a': 1}</function>", "brave_search.call(query=x)",
    "brave_search.call(query=1/0)", "brave_search.call('x')", 'brave_search.call(query="x"); import os',
    "wolfram_alpha.call(query=\"unterminated)",
]
NOT_CALLS = [  # not calls either: text without <|python_tag|>, code after it
    "[", "[f(a=1", "[f(**kw)]", "[f.g(a=1)]", "[f(a=1), 2]", "[" * 2000, "\x00", "[f(a='\x00')]", "[f(a={1: 2}[1])]",
    "[f(a=[1, 2][0])]", "[f(a={[1]: 2})]", "[f(a=-'x')]", "print('hi')", "x = 1",
]


@pytest.mark.parametrize("text", MALFORMED_CALLS + NOT_CALLS)
def test_malformed_calls_are_text_and_never_raise(text):
    assert parse_tool_calls(text, after_python_tag=False) == ()
    after_tag = parse_tool_calls(text, after_python_tag=True)
    assert after_tag == (() if text in MALFORMED_CALLS else (ToolCall("code_interpreter", {"code": text.strip()}),))


def test_reply_fields_stay_backwards_compatible(chat, tok):
    ids = tok.encode(GOLD, bos=False, eos=False, allowed_special="all")
    reply = chat.decode_assistant_reply(ids)
    # the raw fields as before, and their equality: tool_calls is read from them, it is not a field
    assert reply == AssistantReply(content="", tool_call='brave_search.call(query="latest price of 1oz gold")',
                                   stop_reason="eom")
    assert reply.tool_calls == (ToolCall("brave_search", {"query": "latest price of 1oz gold"}),)
    assert reply.tool_calls[0].builtin and reply.tool_calls[0].call_id is None
    assert str(reply.tool_calls[0]) == 'brave_search(query="latest price of 1oz gold")'
    assert chat.encode_message(reply.to_message()) == chat.encode_header("assistant") + ids
    assert AssistantReply("Hi.", None, "eot").tool_calls == ()


def test_system_prompt_lines(tok):
    assert tool_system_prompt(today=datetime.date(2025, 3, 5)) == (
        "Cutting Knowledge Date: December 2023\nToday Date: 05 March 2025\n")
    assert tool_system_prompt(["code_interpreter"], today=TODAY) == (  # no Tools line: the code interpreter
        "Environment: ipython\n\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n")  # is implied
    assert tool_system_prompt(["brave_search"], custom_tools=[SONGS_TOOL], today=TODAY, instructions="Be brief.") == (
        "Environment: ipython\nTools: brave_search\nCutting Knowledge Date: December 2023\n"
        "Today Date: 21 September 2024\n\nBe brief.\n")
    assert tool_prompt_messages(["wolfram_alpha"], today=TODAY) == [
        {"role": "system", "content": tool_system_prompt(["wolfram_alpha"], today=TODAY)}]
    with pytest.raises(ValueError, match="not among Llama 3.1's built-in tools"):
        tool_system_prompt(["web_search"])
    with pytest.raises(TypeError, match="a list of names"):
        tool_system_prompt("brave_search")
    with pytest.raises(ValueError, match="custom_format must be 'json' or 'function_tag'"):
        custom_tools_prompt([SONGS_TOOL], custom_format="yaml")
    with pytest.raises(TypeError, match="a tool definition is a dict"):
        custom_tools_prompt([{"description": "no name"}])
    with pytest.raises(ValueError, match="custom_format must be"):
        tool_call_message(ToolCall("f", {}), custom_format="xml")


def test_tool_result_message():
    assert tool_result_message("42") == {"role": "ipython", "content": "42"}
    assert tool_result_message({"temperature": 18}) == {"role": "ipython", "content": '{"temperature": 18}'}


def load_example(name: str):
    """An examples/ script as a module, to call its functions in this process (no second torch import)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("extra, call", [([], "wolfram_alpha with arguments {'query': '100th decimal of pi'}"),
                                         (["--custom"], "get_weather with arguments {'city': 'Paris'}")])
def test_example_runs_a_round_trip(capsys, extra, call):
    assert load_example("tool_call").main(extra) == 0
    printed = capsys.readouterr().out
    assert f"tool call: {call}" in printed and "stop reason: eom" in printed
    assert "<|start_header_id|>ipython<|end_header_id|>" in printed and "tool calls: 0" in printed


def test_docs_worked_round_trip_prints_what_the_page_says(capsys):
    page = (ROOT / "docs" / "tools.md").read_text()
    section = page.split("## A worked round trip")[1]
    code, printed = re.search(r"```python\n(.*?)```\n\nprints\n\n```text\n(.*?)```", section, re.DOTALL).groups()
    exec(compile(code, "docs/tools.md", "exec"), {})
    assert capsys.readouterr().out == printed


def test_generate_chat_prints_tool_calls_as_calls(chat, tok, capsys):
    generate = load_example("generate")
    generate.show_tool_calls(chat.decode_assistant_reply(tok.encode(GOLD, bos=False, eos=False, allowed_special="all")))
    assert capsys.readouterr().out == ("[tool call: brave_search, arguments: {'query': 'latest price of 1oz gold'}]\n"
                                       "[end of message: the model waits for the tool's result; type it after "
                                       "'ipython:']\n")
    generate.show_tool_calls(AssistantReply("Paris.", None, "eot"))
    assert capsys.readouterr().out == ""
