"""Benchmark llama31 against HF transformers (and llama.cpp) on the same random weights: decode, prefill, TTFT, memory.

    python examples/bench/benchmark.py                                   # the Llama 3.2 1B shape, fp32 + bf16 (+ INT4)
    python examples/bench/benchmark.py --preset tiny --reps 1            # seconds, for a quick look
    python examples/bench/benchmark.py --dtypes bf16 --batch-sizes 1 --prefill-lens 128 --engines llama31
    python examples/bench/benchmark.py --engines llama31,hf,llama.cpp    # with llama.cpp (pip install -e '.[engines]')

What it does
  * Builds a random Llama 3.1-architecture model of --preset (weights ~ N(0, 0.02) from a fixed seed, bf16)
    and saves it ONCE as an HF folder under --cache-dir; later runs reuse it. Both engines load that folder:
    llama31 with Transformer.from_pretrained (which on a CPU gives the large linear layers faster kernels, as
    users get it: float32 our matrix-vector kernel, bf16 oneDNN's packed layout, llama31/cpu/defaults.py;
    --engines llama31-plain adds llama31 with pack=False, plain F.linear, to show what those kernels gain,
    llama31-packed with pack=True, every layer in oneDNN's packed layout (the float32 default before ours);
    llama31-compile: pack=False with one-sequence decode steps through torch.compile, Llama(compile=True),
    llama31/cpu/compiled.py, compiled during the warm-up; its prompts and batched steps run eagerly on plain weights,
    batches of up to 4 rows through llama31/cpu/gemv.py's kernel),
    HF with LlamaForCausalLM.from_pretrained (its default "sdpa" attention), in the same dtype. INT4 (llama31 and
    llama31-compile) is the bf16 model quantized round-to-nearest with group size 128, bf16 activations; --dtypes
    int4o is the same with the output layer INT4 too (Llama.build(int4_output=True): a tied model's output layer gets
    an INT4 copy of the embedding matrix, which stays bf16 for the lookup), and int4o-w4a8 that with activations
    rounded to int8 (Llama.build(w4a8=True): our AVX512-VNNI kernel, llama31/quant/cpu_int4.py).
    llama.cpp (--engines llama.cpp, through llama-cpp-python's bindings of its C API) runs the same weights
    exported to GGUF once (llama31/checkpoints/gguf.py) as F32 (fp32), BF16 (bf16) and, for the int4 ones, Q4_0
    made by llama.cpp's own quantizer (llama_model_quantize: blocks of 32 weights with one fp16 scale; "llama.cpp
    q4_0" takes part in every dtype's round, as llama31's INT4 does). Its KV cache is F32 for fp32 and F16 (llama.cpp's
    default) otherwise; flash attention as llama.cpp chooses by default. Each op makes its own context (outside
    the clock, as llama31 sizes its cache per call) and runs llama_decode, argmax in numpy: TTFT and generate
    time the same calls end to end, with no sampler chain.
  * Every engine x dtype runs in its own worker process (multiprocessing, spawn), so that each one's memory is
    its own: "RSS" is the worker's RSS after loading and one warm-up run (weights read from a safetensors file
    of the same dtype are mmapped and count only once touched) minus its RSS before loading (imports and
    tokenizer already paid), "peak" the highest RSS during any measurement minus that same baseline (the
    kernel's peak-RSS counter is reset before each measurement), with the measurement that reached it. The
    workers of one dtype are alive together and are driven ALTERNATELY, one measurement at a time, in an order
    that rotates every repetition, so that a noisy neighbour slows both sides alike; figures are medians over
    --reps, ratios are medians of per-repetition ratios (paired). The INT4 worker takes part in every dtype's
    round, so it is compared with HF fp32 and bf16.
  * Measurements (greedy everywhere, prompts of random ids from a fixed seed; the same for both engines):
      decode bB      B rows: prefill a --decode-prompt-token prompt, then time --decode-tokens forward steps
                     of one token per row through the KV cache, argmax in between. tok/s = B * steps / time.
                     llama31: model.setup_cache + model(tokens, start_pos, last_only=True) per step.
                     HF: the same loop by hand, model(ids, cache=DynamicCache, logits_to_keep=1) per step.
                     llama.cpp: llama_decode of one token per sequence (rows are sequences 0 .. B-1).
      prefill L      one forward of L prompt tokens into an empty KV cache, last position's logits only.
      TTFT L         time to the first token through each engine's generate API (a prompt of the first
                     prefill length): llama31's Llama.stream until its first generated token; HF's
                     generate(max_new_tokens=1).
      generate b1    end to end: llama31's Llama.generate(temperature=0) vs HF's generate(do_sample=False),
                     --decode-tokens new tokens after a --decode-prompt-token prompt, prefill included; no
                     stop token can end either one early.
  * The memory bandwidth is measured in the same run, in the very process that decodes: each worker reads
    --read-mib of its own memory (ReadProbe: inductor's matrix-vector kernel over a random matrix, the fastest
    reader torch has here) just before and just after each of its decode measurements, and that decode gets its
    own roofline from the faster of the two: B * read bandwidth / (bytes of weights read per step + bytes of KV
    cache read per step). The fraction reported is the median over repetitions of tok/s over that roofline. A
    VM's share of the bandwidth drifts with its neighbours' load (33 to 65 GB/s read here within minutes), and
    a read in another process can land in another state (64 GB/s in this script's parent while a worker decoded
    at 33-45, in an earlier version that read there). The probe is built before the worker's baseline RSS, so
    no memory figure includes it (nor torch.compile's own import, which it pays). On a preset whose weights fit
    in the caches (tiny) decoding is not bound by memory and the roofline means nothing.
  * Output: a table on stdout, a JSON file (--out-json) and, if matplotlib is installed, a PNG (--plot).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config  # noqa: F401  (its patch, for ReadProbe)

from llama31.config import ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# llama31's INT4 workers: (is the output layer INT4 too?, W4A8: activations rounded to int8, Llama.build(w4a8=True))
INT4_DTYPES = {"int4": (False, False), "int4o": (True, False), "int4o-w4a8": (True, True)}
# llama31: as users get it (Transformer.from_pretrained's default CPU kernels, llama31/cpu/defaults.py);
# llama31-plain: pack=False, F.linear on plain weights (what those kernels gain); llama31-packed: pack=True, every
# layer in oneDNN's packed layout (the float32 default before our kernel took over); llama31-compile: batch-1 decode
# steps compiled (llama31/cpu/compiled.py; a second copy of the weights: run it with few other engines);
# hf: transformers; llama.cpp: GGUF files of the same weights (F32, BF16, Q4_0), through llama-cpp-python.
ENGINES = ("llama31", "llama31-plain", "llama31-packed", "llama31-compile", "hf", "llama.cpp")
# the `pack` option each llama31 engine loads with
PACK_OPTION = {"llama31": None, "llama31-plain": False, "llama31-packed": True, "llama31-compile": False}
DEFAULT_ENGINES = ["llama31", "hf"]

PRESETS = {
    # seconds on a laptop: for the smoke test and quick looks
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192,
                      max_seq_len=2048),
    # the published shapes, with a 4096-token context: the RoPE tables of 128K positions are not what is measured
    **{name: ModelArgs.preset(name).replace(max_seq_len=4096)
       for name in ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b")},
}
SEED = 0


# ====================================================================== the model folder, built once
def model_folder(preset: str, cache_dir: Path) -> Path:
    """The HF folder of the preset's random model under cache_dir, written on the first call, then reused."""
    from llama31.checkpoints import save_hf
    from llama31.model import Transformer

    args = PRESETS[preset]
    folder = cache_dir / f"{preset}-seed{SEED}-ctx{args.max_seq_len}"
    config = folder / "config.json"
    if config.exists() and json.loads(config.read_text()) == json.loads(json.dumps(args.to_hf_config("bfloat16"))):
        return folder
    print(f"building the random {preset} model and saving it to {folder} (once) ...", file=sys.stderr, flush=True)
    shapes = Transformer(args, device="meta").state_dict()  # names and shapes only, no memory
    state = {}
    for i, (name, tensor) in enumerate(shapes.items()):
        if args.tie_word_embeddings and name == "output.weight":
            continue
        g = torch.Generator().manual_seed(SEED * 10_000 + i)
        if tensor.dim() == 1:  # RMSNorm weights
            state[name] = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            state[name] = (torch.randn(tensor.shape, generator=g) * 0.02).to(torch.bfloat16)
    if args.tie_word_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    partial = folder.with_name(folder.name + ".partial")  # a run killed while saving leaves nothing reusable
    save_hf(partial, args, state, dtype=torch.bfloat16)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    partial.rename(folder)
    return folder


GGUF_TYPES = {"fp32": "f32", "bf16": "bf16", "q4_0": "q4_0"}  # llama.cpp's file for each dtype it runs


def gguf_file(folder: Path, dtype: str) -> Path:
    """Where the model folder's GGUF file of a dtype lives: beside the folder."""
    return folder.with_name(f"{folder.name}.{GGUF_TYPES[dtype]}.gguf")


def gguf_files(folder: Path, args: ModelArgs, threads: int) -> None:
    """The GGUF files llama.cpp runs, written once beside the model folder (again when the folder is rebuilt):
    F32 and BF16 by llama31's export, Q4_0 by llama.cpp's own quantizer from the F32 file. Each appears under its
    name only once complete."""
    import llama_cpp

    from llama31.checkpoints.gguf import N_LLAMA3_VOCAB, write_gguf

    built = (folder / "config.json").stat().st_mtime
    for dtype in GGUF_TYPES:
        if gguf_file(folder, dtype).exists() and gguf_file(folder, dtype).stat().st_mtime < built:
            gguf_file(folder, dtype).unlink()  # made from an earlier model of that name
    # the tiny preset's 512 rows stand for the first 512 Llama 3 tokens (a GGUF file names every row's token)
    ids = None if args.vocab_size == N_LLAMA3_VOCAB else list(range(args.vocab_size))
    for dtype in ("fp32", "bf16"):
        if not gguf_file(folder, dtype).exists():
            print(f"exporting {gguf_file(folder, dtype).name} (once) ...", file=sys.stderr, flush=True)
            write_gguf(folder, gguf_file(folder, dtype), outtype=GGUF_TYPES[dtype], vocab_ids=ids)
    q4 = gguf_file(folder, "q4_0")
    if not q4.exists():
        print(f"quantizing {q4.name} with llama.cpp (once) ...", file=sys.stderr, flush=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, threads
        partial = q4.with_name(q4.name + ".partial")
        if llama_cpp.llama_model_quantize(str(gguf_file(folder, "fp32")).encode(), str(partial).encode(),
                                          ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {gguf_file(folder, 'fp32')} to Q4_0")
        partial.rename(q4)


# ====================================================================== memory of this process
def _proc_status_bytes(field: str) -> int | None:
    """A "VmRSS:"-style line of /proc/self/status in bytes (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int:
    """This process's resident set size in bytes (no psutil needed on Linux)."""
    current = _proc_status_bytes("VmRSS")
    if current is not None:
        return current
    import psutil  # other systems

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where Linux does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def take_baseline_rss() -> int:
    """This process's RSS once every library is imported, just before a model is loaded.

    torch imports torch._dynamo (and sympy: ~70 MiB) lazily, the first time a module is built on the "meta"
    device; both engines load that way, so it is paid here rather than charged to either model.
    """
    torch.nn.Embedding(1, 1, device="meta")
    gc.collect()
    reset_peak_rss()
    return rss()


def peak_rss() -> int:
    """The highest RSS since the last reset_peak_rss (elsewhere than Linux: since the process started)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ====================================================================== the engines, inside a worker process
def prompt(batch: int, length: int, vocab: int) -> torch.Tensor:
    """(batch, length) random ids, the same for every engine."""
    g = torch.Generator().manual_seed(1000 * batch + length)
    return torch.randint(0, vocab, (batch, length), generator=g)


def weight_bytes_read(model) -> int:
    """Bytes of weights a llama31 Transformer reads per decode step: every parameter and buffer of every module
    but the embedding, once (the embedding is only indexed; the output layer reads its whole vocab x dim matrix,
    which is the embedding's own when tied and unpacked, its packed copy when packed, its INT4 copy for int4o)."""
    seen, total = set(), 0
    for name, module in model.named_modules():
        if name == "tok_embeddings":
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


class Llama31Engine:
    def __init__(self, folder: Path, dtype: str, pack: bool | None = None, compile: bool = False):
        from llama31.generation import Llama
        from llama31.model import Transformer
        from llama31.text import Tokenizer

        tokenizer = Tokenizer()  # only for Llama's pad id; loaded before the baseline RSS is taken
        self.baseline = take_baseline_rss()
        # pack as from_pretrained takes it: None, as users load it (its default CPU kernels,
        # llama31/cpu/defaults.py); False plain nn.Linear; True oneDNN's packed layout for every layer
        if dtype in INT4_DTYPES:  # as Llama.build(int4_group_size=..., int4_output=...): quantize, then choose kernels
            from llama31.cpu.defaults import choose_kernels
            from llama31.quant import quantize_model

            model = Transformer.from_pretrained(folder, dtype=torch.bfloat16, pack=False)
            quantize_output, w4a8 = INT4_DTYPES[dtype]
            model = quantize_model(model, int4_group_size(model.args), quantize_output=quantize_output,
                                   backend="cpu_w4a8" if w4a8 else None)
            choose_kernels(model, pack)
            gc.collect()
        else:
            model = Transformer.from_pretrained(folder, dtype=DTYPES[dtype], pack=pack)
        model.eval()
        self.model, self.vocab = model, model.args.vocab_size
        self.llama = Llama(model, tokenizer, max_batch_size=64, compile=compile)
        # graphs compiled before this engine's (the worker's ReadProbe) are not its own
        self.graphs_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        self.forward = self.llama.decoder  # the model, or with compile the model with compiled one-token steps

    def weight_bytes(self) -> int:
        return weight_bytes_read(self.model)

    @torch.inference_mode()
    def decode(self, batch: int, prompt_len: int, steps: int) -> dict:
        tokens = prompt(batch, prompt_len, self.vocab)
        self.forward.setup_cache(batch, prompt_len + steps)
        next_token = self.forward(tokens, 0, last_only=True)[:, -1].argmax(-1)  # (bs,)
        generated, times = [next_token], []
        for pos in range(prompt_len, prompt_len + steps):
            start = time.perf_counter()
            next_token = self.forward(next_token[:, None], pos, last_only=True)[:, -1].argmax(-1)
            times.append(time.perf_counter() - start)
            generated.append(next_token)
        self.forward.clear_cache()
        return {"seconds": sum(times), "step_ms": 1e3 * statistics.median(times),
                "tokens": torch.stack(generated, 1)[0].tolist(),
                "graphs_compiled": torch._dynamo.utils.counters["stats"]["unique_graphs"] - self.graphs_before}

    @torch.inference_mode()
    def prefill(self, length: int) -> dict:
        tokens = prompt(1, length, self.vocab)
        self.forward.setup_cache(1, length)
        start = time.perf_counter()
        self.forward(tokens, 0, last_only=True)
        seconds = time.perf_counter() - start
        self.forward.clear_cache()
        return {"seconds": seconds}

    def ttft(self, length: int) -> dict:
        tokens = prompt(1, length, self.vocab).tolist()
        start = time.perf_counter()
        for step in self.llama.stream(tokens, 1, temperature=0, stop_tokens=[]):
            if step.generated[0]:
                break
        return {"seconds": time.perf_counter() - start}

    def generate(self, batch: int, prompt_len: int, steps: int) -> dict:
        tokens = prompt(batch, prompt_len, self.vocab).tolist()
        start = time.perf_counter()
        out, _ = self.llama.generate(tokens, steps, temperature=0, stop_tokens=[])
        return {"seconds": time.perf_counter() - start, "tokens": out[0]}


class HFEngine:
    def __init__(self, folder: Path, dtype: str):
        import transformers
        from transformers import DynamicCache, LlamaForCausalLM

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.DynamicCache = DynamicCache
        self.baseline = take_baseline_rss()
        self.model = LlamaForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype]).eval()  # default: sdpa
        self.vocab = self.model.config.vocab_size

    def weight_bytes(self) -> int:
        """As weight_bytes_read: parameters() yields tied weights once; an untied embedding is not read."""
        tied = self.model.config.tie_word_embeddings
        return sum(p.numel() * p.element_size() for name, p in self.model.named_parameters()
                   if tied or "embed_tokens" not in name)

    @torch.inference_mode()
    def decode(self, batch: int, prompt_len: int, steps: int) -> dict:
        tokens = prompt(batch, prompt_len, self.vocab)
        cache = self.DynamicCache(config=self.model.config)
        next_token = self.model(tokens, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
        generated, times = [next_token], []
        for _ in range(steps):
            start = time.perf_counter()
            logits = self.model(next_token[:, None], cache=cache, use_cache=True, logits_to_keep=1).logits
            next_token = logits[:, -1].argmax(-1)
            times.append(time.perf_counter() - start)
            generated.append(next_token)
        return {"seconds": sum(times), "step_ms": 1e3 * statistics.median(times),
                "tokens": torch.stack(generated, 1)[0].tolist()}

    @torch.inference_mode()
    def prefill(self, length: int) -> dict:
        tokens = prompt(1, length, self.vocab)
        cache = self.DynamicCache(config=self.model.config)
        start = time.perf_counter()
        self.model(tokens, cache=cache, use_cache=True, logits_to_keep=1)
        return {"seconds": time.perf_counter() - start}

    def _generate(self, tokens: torch.Tensor, steps: int) -> torch.Tensor:
        # eos_token_id=None: no stop token can end generation early (llama31 runs with stop_tokens=[])
        return self.model.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                   max_new_tokens=steps, eos_token_id=None, pad_token_id=0)

    def ttft(self, length: int) -> dict:
        tokens = prompt(1, length, self.vocab)
        start = time.perf_counter()
        self._generate(tokens, 1)
        return {"seconds": time.perf_counter() - start}

    def generate(self, batch: int, prompt_len: int, steps: int) -> dict:
        tokens = prompt(batch, prompt_len, self.vocab)
        start = time.perf_counter()
        out = self._generate(tokens, steps)
        return {"seconds": time.perf_counter() - start, "tokens": out[0, prompt_len:].tolist()}


class LlamaCppEngine:
    """llama.cpp on a GGUF file, through llama-cpp-python's bindings of its C API (llama_decode on a llama_batch)."""

    def __init__(self, gguf: Path, dtype: str, threads: int):
        import llama_cpp

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp logs through it: errors only
        self.lib, self.threads = llama_cpp, threads
        self.kv_type = llama_cpp.GGML_TYPE_F32 if dtype == "fp32" else llama_cpp.GGML_TYPE_F16
        llama_cpp.llama_backend_init()
        self.baseline = take_baseline_rss()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.gguf = gguf

    def weight_bytes(self) -> int:
        """As weight_bytes_read, from the file's tensors: all but token_embd, which a step only indexes (unless
        the file has no output.weight: then it is the output layer too)."""
        from gguf import GGUFReader

        tensors = {t.name: int(t.n_bytes) for t in GGUFReader(self.gguf).tensors}
        return sum(tensors.values()) - (tensors["token_embd.weight"] if "output.weight" in tensors else 0)

    def _context(self, n_seq: int, positions: int):
        params = self.lib.llama_context_default_params()
        params.n_seq_max, params.n_ctx = n_seq, n_seq * -(-positions // 256) * 256
        params.n_batch = max(params.n_batch, n_seq * positions)  # a whole prompt in one llama_decode
        params.n_threads = params.n_threads_batch = self.threads
        params.type_k = params.type_v = self.kv_type
        ctx = self.lib.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {n_seq} x {positions} positions")
        return ctx

    def _step(self, ctx, rows: list[list[int]], start: int) -> list[int]:
        """llama_decode of rows[s] into sequence s from position start; the argmax after each row's last token."""
        lib, n = self.lib, sum(len(r) for r in rows)
        batch = lib.llama_batch_init(n, 0, 1)
        try:
            i = 0
            for seq, row in enumerate(rows):
                for j, token in enumerate(row):
                    batch.token[i], batch.pos[i], batch.logits[i] = token, start + j, j == len(row) - 1
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
                    i += 1
            batch.n_tokens = n
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(len(rows), self.vocab))
            return logits.argmax(-1).tolist()
        finally:
            lib.llama_batch_free(batch)

    def _greedy(self, ctx, tokens: list[list[int]], steps: int, times: list[float] | None = None) -> list[int]:
        """Prefill, then `steps` one-token steps of every row (each timed into `times` if given); row 0's tokens."""
        next_tokens = self._step(ctx, tokens, 0)
        generated = [next_tokens[0]]
        for pos in range(len(tokens[0]), len(tokens[0]) + steps):
            start = time.perf_counter()
            next_tokens = self._step(ctx, [[t] for t in next_tokens], pos)
            if times is not None:
                times.append(time.perf_counter() - start)
            generated.append(next_tokens[0])
        return generated

    def decode(self, batch: int, prompt_len: int, steps: int) -> dict:
        ctx = self._context(batch, prompt_len + steps)
        try:
            times = []
            generated = self._greedy(ctx, prompt(batch, prompt_len, self.vocab).tolist(), steps, times)
        finally:
            self.lib.llama_free(ctx)
        return {"seconds": sum(times), "step_ms": 1e3 * statistics.median(times), "tokens": generated}

    def prefill(self, length: int) -> dict:
        ctx = self._context(1, length)
        try:
            start = time.perf_counter()
            self._step(ctx, prompt(1, length, self.vocab).tolist(), 0)
            return {"seconds": time.perf_counter() - start}
        finally:
            self.lib.llama_free(ctx)

    def ttft(self, length: int) -> dict:
        return self.prefill(length)  # the first token is the argmax after the prompt

    def generate(self, batch: int, prompt_len: int, steps: int) -> dict:
        ctx = self._context(batch, prompt_len + steps)
        try:
            start = time.perf_counter()
            generated = self._greedy(ctx, prompt(batch, prompt_len, self.vocab).tolist(), steps - 1)
            return {"seconds": time.perf_counter() - start, "tokens": generated}
        finally:
            self.lib.llama_free(ctx)


def int4_group_size(args: ModelArgs) -> int:
    """128 (the common default) unless the model's widths need a smaller group (the tiny preset)."""
    widths = (args.dim, args.hidden_dim, args.n_heads * args.head_dim)
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


def worker(conn, engine: str, dtype: str, folder: str, threads: int, read_mib: int) -> None:
    """A worker process: load one engine x dtype, then run the measurements the parent sends, one at a time.

    Op "read" is this process's own read bandwidth (GB/s, ReadProbe), built here before the engine takes its
    baseline RSS: the roofline of a decode comes from reads in the very process that decodes."""
    torch.set_num_threads(threads)
    try:
        probe = ReadProbe(read_mib)  # before the engine takes its baseline RSS: charged to no engine
        if engine == "hf":
            runner = HFEngine(Path(folder), dtype)
        elif engine == "llama.cpp":
            runner = LlamaCppEngine(gguf_file(Path(folder), dtype), dtype, threads)
        else:
            runner = Llama31Engine(Path(folder), dtype, pack=PACK_OPTION[engine], compile=engine == "llama31-compile")
        gc.collect()
        conn.send({"baseline_rss": runner.baseline, "loaded_rss": rss(), "load_peak_rss": peak_rss(),
                   "weight_bytes": runner.weight_bytes()})
        while True:
            op, kwargs = conn.recv()
            if op == "quit":
                return
            if op == "rss":
                conn.send({"rss": rss()})
                continue
            if op == "read":
                conn.send({"read_GBps": probe.gbps(), "reader": probe.reader})
                continue
            reset_peak_rss()
            result = getattr(runner, op)(**kwargs)
            result["peak_rss"] = peak_rss()
            conn.send(result)
    except Exception as e:  # report it to the parent instead of dying silently
        import traceback

        conn.send({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"})


class Worker:
    def __init__(self, engine: str, dtype: str, folder: Path, threads: int, read_mib: int):
        self.engine, self.dtype, self.name = engine, dtype, f"{engine} {dtype}"
        ctx = mp.get_context("spawn")  # a fresh interpreter: no memory or threads inherited from the parent
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=worker, args=(child, engine, dtype, str(folder), threads, read_mib),
                                   daemon=True)
        self.process.start()
        self.info = self._receive()

    def _receive(self) -> dict:
        try:
            reply = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"worker {self.name} died (exit code {self.process.exitcode}; -9 usually means it "
                               "ran out of memory: try fewer --dtypes or a smaller --preset)") from None
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}")
        return reply

    def run(self, op: str, **kwargs) -> dict:
        self.conn.send((op, kwargs))
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(("quit", {}))
            self.process.join(30)


# ====================================================================== bandwidth
class ReadProbe:
    """How fast this process streams memory into its cores (GB/s): the best of `repeats` passes of inductor's
    C++ matrix-vector kernel (llama31/cpu/compiled.py's options: frozen weight, max-autotune) over a matrix of `mib`
    MiB of random float32 (random: the host could serve identical pages from one copy in its cache).

    The fastest reader torch has on this 2-core EPYC: when the VM's memory gives 50-65 GB/s, it streams 10-20%
    more than a reduction (amax, sum), oneDNN's packed product or any eager row or column reduction (a sweep in
    one process); at ~35 GB/s they are level. Drawn from amax and sum over 1 GiB, the roofline fell below what a
    decode step reaches: compiled fp32 decoding ran at 107% of it. Frozen, the compiled kernel reads its own
    copy of the matrix, so the original's memory is released once compiled: the probe holds `mib` MiB. Without
    a C++ compiler it falls back to amax over the matrix (`reader` says which)."""

    def __init__(self, mib: int):
        rows = mib * 2**20 // 4 // 8192
        self.bytes = rows * 8192 * 4
        self.layer = torch.nn.Linear(8192, rows, bias=False, device="meta").eval()
        self.layer.weight = torch.nn.Parameter(torch.rand(rows, 8192, generator=torch.Generator().manual_seed(1)),
                                               requires_grad=False)
        self.x = torch.rand(1, 8192)
        try:
            from llama31.cpu.compiled import INDUCTOR_OPTIONS

            compiled = torch.compile(self.layer)
            with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.inference_mode():
                compiled(self.x)  # compiles (and autotunes) once

            def read():
                with torch._inductor.config.patch(INDUCTOR_OPTIONS), torch.inference_mode():
                    compiled(self.x)

            self.read, self.reader = read, "inductor matrix-vector product"
            # the frozen graph holds its own copy: free the original's memory (shape and strides stay, so no guard
            # fails and nothing recompiles; nothing reads it again)
            self.layer.weight.untyped_storage().resize_(0)
        except Exception as e:  # noqa: BLE001  (no C++ compiler, or inductor unavailable: still a plain read)
            weight = self.layer.weight
            self.read, self.reader = weight.amax, f"amax (inductor failed: {type(e).__name__})"

    def gbps(self, repeats: int = 2) -> float:
        self.read()  # warm-up
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            self.read()
            best = max(best, self.bytes / (time.perf_counter() - start) / 1e9)
        return best


# ====================================================================== the benchmark
def kv_bytes_per_step(args: ModelArgs, dtype: str, batch: int, context: float) -> float:
    """Bytes of K and V read by one decode step at `context` cached positions."""
    element = 4 if dtype == "fp32" else 2  # INT4 keeps a bf16 cache
    return batch * args.n_layers * 2 * args.n_kv_heads * args.head_dim * context * element


def warm_up(w: Worker, opts) -> None:
    """Not recorded: first calls pay one-time kernel and allocator set-up (and llama31-compile compiles at
    batch 1). Weights read from a safetensors file of the same dtype stay file-backed (mmap) and count in RSS
    only once touched: the steady state is after the warm-up, not right after loading."""
    for batch in sorted(set(opts.batch_sizes)):
        w.run("decode", batch=batch, prompt_len=opts.decode_prompt, steps=2)
    w.run("prefill", length=min(opts.prefill_lens))
    w.info["steady_rss"] = w.run("rss")["rss"]


def run_benchmark(opts) -> dict:
    args = PRESETS[opts.preset]
    folder = model_folder(opts.preset, Path(opts.cache_dir).expanduser())
    torch.set_num_threads(opts.threads)

    configs = [(e, d) for d in opts.dtypes if d in DTYPES for e in opts.engines]
    # the 4-bit workers, loaded once, take part in every dtype's round: llama31's INT4 (INT4_DTYPES), llama.cpp's
    # Q4_0 (with either)
    int4 = [(e, d) for d in opts.dtypes if d in INT4_DTYPES for e in ("llama31", "llama31-compile")
            if e in opts.engines]
    if "llama.cpp" in opts.engines and any(d in INT4_DTYPES for d in opts.dtypes):
        int4.append(("llama.cpp", "q4_0"))
    if int4 and not any(d in DTYPES for d in opts.dtypes):
        configs_rounds = [[]]
    else:
        configs_rounds = [[c for c in configs if c[1] == d] for d in opts.dtypes if d in DTYPES]
    if "llama.cpp" in opts.engines:
        gguf_files(folder, args, opts.threads)

    ops = [(f"decode_b{b}", "decode", dict(batch=b, prompt_len=opts.decode_prompt, steps=opts.decode_tokens))
           for b in opts.batch_sizes]
    ops += [(f"prefill_{n}", "prefill", dict(length=n)) for n in opts.prefill_lens]
    ops += [(f"ttft_{opts.prefill_lens[0]}", "ttft", dict(length=opts.prefill_lens[0])),
            ("generate_b1", "generate", dict(batch=1, prompt_len=opts.decode_prompt, steps=opts.decode_tokens))]

    results: dict[str, dict] = {}  # config name -> {"memory": ..., "runs": {op: [per-rep raw results]}}
    int4_workers = [Worker(e, d, folder, opts.threads, opts.read_mib) for e, d in int4]
    try:
        for round_configs in configs_rounds:
            workers = []
            try:
                # each worker warms up as soon as it is loaded, before the next one loads: llama31-compile's
                # compile needs about 3x its weights for a while (1B fp32: 16 GB), only once its own
                for e, d in round_configs:
                    workers.append(Worker(e, d, folder, opts.threads, opts.read_mib))
                    warm_up(workers[-1], opts)
                for w in int4_workers:
                    if "steady_rss" not in w.info:
                        warm_up(w, opts)
                    workers.append(w)
                for w in workers:
                    results.setdefault(w.name, {"memory": w.info, "runs": {}, "rounds": []})
                    results[w.name]["rounds"].append(round_configs[0][1] if round_configs else "int4")
                for rep in range(opts.reps):
                    for key, op, kwargs in ops:
                        order = workers[rep % len(workers):] + workers[:rep % len(workers)]  # rotate who goes first
                        for w in order:
                            # the bandwidth of this VM drifts by up to 2x with its neighbours' load: each decode
                            # figure gets its own roofline, from reads just before and just after it, in its worker
                            before = w.run("read") if op == "decode" else None
                            r = w.run(op, **kwargs)
                            if before is not None:
                                after = w.run("read")
                                r["read_GBps"] = max(before["read_GBps"], after["read_GBps"])
                                r["reader"] = after["reader"]
                            r["round"] = round_configs[0][1] if round_configs else "int4"
                            r["rep"] = rep
                            results[w.name]["runs"].setdefault(key, []).append(r)
                        print(f"  rep {rep + 1}/{opts.reps} {key}: " + ", ".join(
                            f"{w.name} {results[w.name]['runs'][key][-1]['seconds']:.3f}s" for w in workers),
                              file=sys.stderr, flush=True)
            finally:
                for w in workers:
                    if w not in int4_workers:
                        w.close()
    finally:
        for w in int4_workers:
            w.close()

    report = summarise(opts, args, results, ops)
    report["model_folder"] = str(folder)
    return report


def tokens_per_second(key: str, r: dict, opts) -> float:
    kind = key.split("_")[0]
    if kind in ("decode", "generate"):
        batch = int(key.split("_b")[1])
        return batch * opts.decode_tokens / r["seconds"]
    if kind == "prefill":
        return int(key.split("_")[1]) / r["seconds"]
    return r["seconds"]  # TTFT stays in seconds


def summarise(opts, args: ModelArgs, results: dict, ops) -> dict:
    summary: dict = {"configs": {}, "ratios": {}, "greedy_agreement": {}}
    for name, res in results.items():
        dtype = name.split()[1]
        mem = res["memory"]
        peak_rss, peak_op = max((r["peak_rss"], key) for key, runs in res["runs"].items() for r in runs)
        entry = {"weight_bytes_read_per_step": mem["weight_bytes"],
                 "rss_after_load_MiB": (mem["loaded_rss"] - mem["baseline_rss"]) / 2**20,
                 "rss_steady_MiB": (mem["steady_rss"] - mem["baseline_rss"]) / 2**20,
                 "rss_peak_load_MiB": (mem["load_peak_rss"] - mem["baseline_rss"]) / 2**20,
                 "rss_peak_run_MiB": (peak_rss - mem["baseline_rss"]) / 2**20, "rss_peak_during": peak_op,
                 "ops": {}}
        if name.startswith("llama31-compile"):  # one graph (one copy of the weights) for every batch-1 step
            entry["graphs_compiled"] = max(r["graphs_compiled"] for key, runs in res["runs"].items()
                                           if key.startswith("decode") for r in runs)
        for key, *_ in ops:
            values = [tokens_per_second(key, r, opts) for r in res["runs"][key]]
            op = {"median": statistics.median(values), "values": values,
                  "unit": "s" if key.startswith("ttft") else "tok/s"}
            if key.startswith("decode"):
                batch = int(key.split("_b")[1])
                step_bytes = mem["weight_bytes"] + kv_bytes_per_step(args, dtype, batch,
                                                                     opts.decode_prompt + opts.decode_tokens / 2)
                rooflines = [batch * r["read_GBps"] * 1e9 / step_bytes for r in res["runs"][key]]
                op["roofline_tok_s"] = statistics.median(rooflines)
                op["read_GBps"] = statistics.median(r["read_GBps"] for r in res["runs"][key])
                op["read_GBps_values"] = [r["read_GBps"] for r in res["runs"][key]]
                # per repetition, against the bandwidth measured around that very run; then the median
                op["fraction_of_roofline"] = statistics.median(v / roof for v, roof in zip(values, rooflines))
                op["step_ms"] = statistics.median(r["step_ms"] for r in res["runs"][key])
            entry["ops"][key] = op
        summary["configs"][name] = entry

    def paired(a: str, b: str, key: str) -> float | None:
        """Median over repetitions of a/b (both measured in the same round, one right after the other)."""
        if a not in results or b not in results:
            return None
        by_rep = {(r["round"], r["rep"]): tokens_per_second(key, r, opts) for r in results[b]["runs"][key]}
        ratios = [tokens_per_second(key, r, opts) / by_rep[(r["round"], r["rep"])]
                  for r in results[a]["runs"][key] if (r["round"], r["rep"]) in by_rep]
        return statistics.median(ratios) if ratios else None

    pairs = [(f"{e} {d}", f"hf {d}") for d in ("fp32", "bf16") for e in ("llama31", "llama31-plain", "llama31-compile")]
    pairs += [(f"llama31 {d}", f"llama31-{e} {d}") for d in ("fp32", "bf16") for e in ("plain", "packed")]
    pairs += [(f"llama31-compile {d}", f"llama31 {d}") for d in ("fp32", "bf16")]
    pairs += [(f"llama31 {q}", f"hf {d}") for q in INT4_DTYPES for d in ("fp32", "bf16")]
    pairs += [("llama31 int4o", "llama31 int4"), ("llama31 int4o-w4a8", "llama31 int4o")]
    pairs += [(f"llama.cpp {d}", f"{e} {d}") for d in ("fp32", "bf16") for e in ("llama31", "llama31-compile", "hf")]
    pairs += [("llama.cpp q4_0", f"{e} {q}") for q in INT4_DTYPES for e in ("llama31", "llama31-compile")]
    pairs += [(f"llama31-compile {q}", f"llama31 {q}") for q in INT4_DTYPES]
    for a, b in pairs:
        ratios = {key: paired(a, b, key) for key, *_ in ops}
        if any(v is not None for v in ratios.values()):
            summary["ratios"][f"{a} / {b}"] = ratios
    for d in ("fp32", "bf16"):
        for engine in ("llama31", "llama31-compile", "llama.cpp"):
            ours, theirs = results.get(f"{engine} {d}"), results.get(f"hf {d}")
            if ours and theirs:
                for key in [k for k, *_ in ops if k.startswith("decode")] + ["generate_b1"]:
                    a, b = ours["runs"][key][0]["tokens"], theirs["runs"][key][0]["tokens"]
                    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    summary["greedy_agreement"][f"{engine} {d} {key}"] = \
                        f"{same}/{len(a)} tokens equal before the first difference"
    # the reads in the workers, around their decodes: what the rooflines are drawn from
    reads = [r for res in results.values() for key, runs in res["runs"].items() if key.startswith("decode")
             for r in runs]
    summary["bandwidth"] = {"read_GBps": statistics.median(r["read_GBps"] for r in reads),
                            "read_GBps_min": min(r["read_GBps"] for r in reads),
                            "read_GBps_max": max(r["read_GBps"] for r in reads),
                            "buffer_MiB": opts.read_mib, "readers": sorted({r["reader"] for r in reads})}
    summary["machine"] = {"threads": opts.threads, "torch": torch.__version__, "python": platform.python_version(),
                          "cpu": _cpu_name(), "cores_visible": os.cpu_count()}
    try:
        import transformers

        summary["machine"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    summary["model"] = {"preset": opts.preset, "parameters": _n_params(args), **{
        k: getattr(args, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "vocab_size")}}
    summary["settings"] = {k: getattr(opts, k) for k in ("reps", "decode_tokens", "decode_prompt", "prefill_lens",
                                                         "batch_sizes", "dtypes", "engines")}
    return summary


def _n_params(args: ModelArgs) -> int:
    attn = args.dim * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads)
    ffn = 3 * args.dim * args.hidden_dim
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    return args.n_layers * (attn + ffn + 2 * args.dim) + embeddings + args.dim


def _size(parameters: int) -> str:
    return f"{parameters / 1e9:.3f} B" if parameters >= 1e9 else f"{parameters / 1e6:.2f} M"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ====================================================================== output
def format_table(report: dict) -> str:
    """Two tables (speed; roofline and memory), the paired ratios and the greedy-token agreement."""
    configs = report["configs"]
    keys = list(next(iter(configs.values()))["ops"])
    m, bw = report["model"], report["bandwidth"]
    lines = [f"{m['preset']}: {_size(m['parameters'])} parameters, {report['machine']['threads']} thread(s), "
             f"{report['settings']['reps']} rep(s) (medians); memory bandwidth {bw['read_GBps']:.1f} GB/s read "
             f"(median; {bw['read_GBps_min']:.1f} to {bw['read_GBps_max']:.1f}), in each worker just before and "
             f"after its decodes ({', '.join(bw['readers'])} over {bw['buffer_MiB']} MiB): the rooflines"]

    def table(heads: list[str], rows: dict[str, list[str]]) -> None:
        widths = [max(len(h), *(len(r[i]) for r in rows.values())) + 2 for i, h in enumerate(heads)]
        first = max(len(name) for name in rows)
        lines.append("")
        lines.append(f"{'':{first}}" + "".join(f"{h:>{w}}" for h, w in zip(heads, widths)))
        lines.extend(f"{name:{first}}" + "".join(f"{c:>{w}}" for c, w in zip(cells, widths))
                     for name, cells in rows.items())

    def label(key: str) -> str:
        kind, arg = key.split("_")
        return {"decode": f"decode {arg}", "prefill": f"prefill {arg}", "ttft": f"TTFT {arg} (s)",
                "generate": f"generate {arg}"}[kind]

    table([label(k) for k in keys], {name: [f"{c['ops'][k]['median']:.3f}" if k.startswith("ttft")
                                           else f"{c['ops'][k]['median']:.2f}" for k in keys]
                                     for name, c in configs.items()})
    lines[-len(configs) - 1] += "   (tok/s unless marked)"
    roof = [k for k in keys if k.startswith("decode")]
    heads = [h for k in roof for h in (f"{k[7:]} GB/s", f"{k[7:]} roofline", f"{k[7:]} %roof")]
    heads += ["ms/step " + k[7:] for k in roof] + ["weights MB read/step", "RSS MiB", "peak MiB", "peak during"]
    rows = {}
    for name, c in configs.items():
        cells = [x for k in roof for x in (f"{c['ops'][k]['read_GBps']:.1f}", f"{c['ops'][k]['roofline_tok_s']:.2f}",
                                           f"{100 * c['ops'][k]['fraction_of_roofline']:.0f}%")]
        cells += [f"{c['ops'][k]['step_ms']:.1f}" for k in roof]
        mb = c["weight_bytes_read_per_step"] / 1e6
        cells += [f"{mb:.0f}" if mb >= 10 else f"{mb:.2f}", f"{c['rss_steady_MiB']:.0f}",
                  f"{c['rss_peak_run_MiB']:.0f}", c["rss_peak_during"]]
        rows[name] = cells
    table(heads, rows)
    if report["ratios"]:
        lines.append("")
        lines.append("paired ratios A/B, the median over reps of the ratio of two back-to-back measurements "
                     "(tok/s: > 1 means A is faster; TTFT: < 1 means A is faster)")
        table([label(k) for k in keys], {pair.replace(" / ", "/"): ["-" if v is None else f"{v:.2f}"
                                                                    for v in ratios.values()]
                                         for pair, ratios in report["ratios"].items()})
    lines.append("")
    for what, agreement in report["greedy_agreement"].items():
        lines.append(f"greedy tokens vs hf's, {what}: {agreement}")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> bool:
    """Bars of tok/s per configuration, with each decode roofline drawn in. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    configs = report["configs"]
    keys = [k for k in next(iter(configs.values()))["ops"] if not k.startswith("ttft")]
    groups = [[k for k in keys if not k.startswith("prefill")], [k for k in keys if k.startswith("prefill")]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [len(g) or 1 for g in groups]})
    bar = 0.8 / len(configs)
    for ax, group, title in zip(axes, groups, ("decoding (KV cache) and generate, end to end", "prefill")):
        for i, (name, c) in enumerate(configs.items()):
            xs = [j + i * bar for j in range(len(group))]
            bars = ax.bar(xs, [c["ops"][k]["median"] for k in group], bar, label=name)
            for x, k in zip(xs, group):
                if "roofline_tok_s" in c["ops"][k]:
                    ax.hlines(c["ops"][k]["roofline_tok_s"], x - bar / 2, x + bar / 2, colors=bars[0].get_facecolor(),
                              linestyles="dashed")
        ax.set_xticks([j + bar * (len(configs) - 1) / 2 for j in range(len(group))],
                      [k.replace("_", " ") for k in group])
        ax.set_ylabel("tokens / s")
        ax.set_title(title)
    axes[0].set_yscale("log")  # rooflines can be far above the bars
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(configs), fontsize=9,
               title="dashed lines: each decode roofline (bandwidth / bytes read per step)")
    m = report["model"]
    fig.suptitle(f"llama31 vs HF transformers: {m['preset']} ({_size(m['parameters'])} parameters), "
                 f"{report['machine']['threads']} thread(s), {report['bandwidth']['read_GBps']:.1f} GB/s read")
    fig.tight_layout(rect=(0, 0.12, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=110)
    return True


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "llama31-benchmark"
    parser.add_argument("--preset", default="llama3.2-1b", choices=sorted(PRESETS),
                        help="model shape (default llama3.2-1b: 1.24 B parameters; tiny: seconds)")
    parser.add_argument("--dtypes", type=names, default=["fp32", "bf16", "int4"],
                        help="comma-separated, of fp32, bf16, int4, int4o, int4o-w4a8 (int4: llama31's INT4 and "
                             "llama.cpp's Q4_0; int4o: llama31's INT4 with the output layer INT4 too, and Q4_0; "
                             "int4o-w4a8: int4o with int8 activations (W4A8), and Q4_0; default fp32, "
                             "bf16, int4)")
    parser.add_argument("--engines", type=names, default=DEFAULT_ENGINES,
                        help="comma-separated, from: llama31 (as from_pretrained loads it: its default CPU kernels), "
                             "llama31-plain (pack=False: F.linear), llama31-packed (pack=True: oneDNN's packed "
                             "layout), llama31-compile (batch-1 decode steps through torch.compile: "
                             "llama31/cpu/compiled.py), hf, llama.cpp (GGUF files of the same weights, through "
                             "llama-cpp-python) (default: llama31,hf)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help=f"torch threads in every engine (default {torch.get_num_threads()})")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--decode-prompt", type=int, default=32, help="prompt length before decoding (default 32)")
    parser.add_argument("--prefill-lens", type=ints, default=[128, 1024], help="prompt lengths (default 128,1024); "
                                                                               "TTFT uses the first")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 4], help="decode batch sizes (default 1,4)")
    parser.add_argument("--read-mib", type=int, default=512,
                        help="MiB each worker reads around its decodes for their rooflines (ReadProbe; default 512: "
                             "16x this CPU's L3; not in any RSS figure, but each worker holds it; 1024 reads 2-3%% "
                             "faster)")
    parser.add_argument("--cache-dir", default=str(default_cache), help=f"where the random model is saved once "
                                                                        f"(default {default_cache})")
    parser.add_argument("--out-json", help="results file (default: <cache-dir>/results-<preset>.json)")
    parser.add_argument("--plot", help="PNG path (default: the JSON path with .png; '' for none); needs matplotlib")
    opts = parser.parse_args(argv)
    for d in opts.dtypes:
        if d not in (*DTYPES, *INT4_DTYPES):
            parser.error(f"--dtypes: unknown dtype {d!r}; choose from fp32, bf16, {', '.join(INT4_DTYPES)}")
    for e in opts.engines:
        if e not in ENGINES:
            parser.error(f"--engines: unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if "llama.cpp" in opts.engines and not all(importlib.util.find_spec(m) for m in ("llama_cpp", "gguf")):
        parser.error("--engines llama.cpp needs llama-cpp-python and gguf: pip install -e '.[engines]'")
    if not opts.engines or not opts.dtypes or not opts.prefill_lens or not opts.batch_sizes:
        parser.error("--engines, --dtypes, --prefill-lens and --batch-sizes need at least one value each")
    if min(opts.threads, opts.reps, opts.decode_tokens, opts.decode_prompt, *opts.prefill_lens,
           *opts.batch_sizes, opts.read_mib) < 1:
        parser.error("--threads, --reps, --decode-tokens, --decode-prompt, --prefill-lens, --batch-sizes and "
                     "--read-mib must be positive")
    longest = max(max(opts.prefill_lens), opts.decode_prompt + opts.decode_tokens)
    if longest > PRESETS[opts.preset].max_seq_len:
        parser.error(f"{longest} positions exceed the {opts.preset} preset's context of "
                     f"{PRESETS[opts.preset].max_seq_len}")
    opts.out_json = opts.out_json or str(Path(opts.cache_dir).expanduser() / f"results-{opts.preset}.json")
    if opts.plot is None:
        opts.plot = str(Path(opts.out_json).with_suffix(".png"))
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    report = run_benchmark(opts)
    print(format_table(report))
    out = Path(opts.out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"results: {out}")
    if opts.plot:
        if plot(report, Path(opts.plot)):
            print(f"plot: {opts.plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
