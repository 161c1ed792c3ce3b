"""One tool round trip in the Llama 3.1 chat format: the prompt that offers a tool, the model's call read back
as a structured ToolCall, the tool's result sent back, and the final answer.

    python examples/tool_call.py                 # a built-in tool (wolfram_alpha)
    python examples/tool_call.py --custom        # a custom function, called with JSON
    python examples/tool_call.py --generate      # then let the demo model continue the dialog

The assistant's replies are written here by hand, as Llama 3.1 Instruct writes them, so the example shows the
exact ids without any weights. With --generate the embedded demo model (random weights: its text is not
meaningful) continues from the tool's result, to show where a real model would pick up.
"""

from __future__ import annotations

import argparse
import datetime
import json

from llama31.text import ChatFormat, Tokenizer, ToolCall, tool_prompt_messages, tool_result_message

TODAY = datetime.date(2024, 9, 21)  # fixed, so that the printed ids do not change from day to day
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "city": {"param_type": "str", "description": "The name of the city", "required": True},
        "unit": {"param_type": "str", "description": "celsius or fahrenheit", "required": False},
    },
}


def run_tool(call: ToolCall) -> str:
    """A stand-in executor: a real one would query Wolfram Alpha or a weather service here."""
    if call.name == "wolfram_alpha":
        return json.dumps({"queryresult": {"success": True, "inputstring": call.arguments["query"],
                                           "pods": [{"title": "Result", "subpods": [{"plaintext": "7"}]}]}})
    if call.name == "get_weather":
        return json.dumps({"city": call.arguments["city"], "temperature": 18, "unit": "celsius", "sky": "cloudy"})
    raise ValueError(f"no tool named {call.name!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--custom", action="store_true", help="offer a custom get_weather function instead of "
                                                              "the built-in wolfram_alpha")
    parser.add_argument("--generate", action="store_true", help="let the demo model (random weights) answer "
                                                                "after the tool's result")
    args = parser.parse_args(argv)

    tokenizer = Tokenizer()
    chat = ChatFormat(tokenizer)
    if args.custom:
        dialog = tool_prompt_messages(custom_tools=[WEATHER_TOOL], today=TODAY,
                                      instructions="You are a helpful assistant.")
        dialog.append({"role": "user", "content": "What is the weather like in Paris?"})
        # What the model writes under "Environment: ipython" when it calls a custom function in JSON.
        written = '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>'
        answer = "It is 18 °C and cloudy in Paris.<|eot_id|>"
    else:
        dialog = tool_prompt_messages(["brave_search", "wolfram_alpha"], today=TODAY,
                                      instructions="You are a helpful assistant.")
        dialog.append({"role": "user", "content": "What is the 100th decimal of pi?"})
        written = '<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>'
        answer = "The 100th decimal of pi is 7.<|eot_id|>"

    prompt = chat.encode_dialog_prompt(dialog)
    print(f"=== the prompt ({len(prompt)} ids) ===\n{tokenizer.decode(prompt)}")

    # The model's reply: ids as generation returns them, up to and including the stop token.
    reply_ids = tokenizer.encode(written, bos=False, eos=False, allowed_special="all")
    reply = chat.decode_assistant_reply(reply_ids)
    print(f"=== the assistant's reply ===\nids: {reply_ids}\nstop reason: {reply.stop_reason} "
          "(end of message: the model waits for the tool's result)")
    for call in reply.tool_calls:
        print(f"tool call: {call.name} with arguments {call.arguments}  (built-in: {call.builtin})")

    result = tool_result_message(run_tool(reply.tool_calls[0]))
    dialog += [reply.to_message(), result]
    print(f"=== the tool's result, sent back as an ipython message ===\nids: {chat.encode_message(result)}")

    prompt = chat.encode_dialog_prompt(dialog)
    print(f"=== the prompt that continues the dialog ({len(prompt)} ids), from the user's question on ===\n"
          f"{tokenizer.decode(prompt).split('<|start_header_id|>user<|end_header_id|>')[-1]}")
    final = chat.decode_assistant_reply(tokenizer.encode(answer, bos=False, eos=False, allowed_special="all"))
    print(f"=== the final answer (written by hand) ===\n{final.content}  (stop reason: {final.stop_reason}, "
          f"tool calls: {len(final.tool_calls)})")

    if args.generate:
        from llama31.generation import Llama

        llama = Llama.build()  # the embedded demo model: no download, random weights
        completion = llama.chat_completion([dialog], max_gen_len=24, temperature=0)[0]
        print(f"=== the demo model's answer (random weights: not meaningful) ===\n{completion.message.content!r} "
              f"(stop reason: {completion.stop_reason}, tool calls: {completion.message.tool_calls})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
