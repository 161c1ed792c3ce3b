"""llama.cpp as an engine: `python -m reference.engines.llamacpp (--ckpt-dir DIR | --gguf FILE) --golden G --out CAND`.

llama.cpp is called through llama-cpp-python's bindings of its C API, the calls llama.cpp's own examples make:
llama_decode on a llama_batch of (token, position, sequence id), then llama_get_logits. The prompts of one
batch group are decoded together as sequences 0, 1, ... of one context (the test of llama.cpp's per-sequence
masks and positions: it has no padding), and their greedy continuations step together, one token per
sequence per llama_decode. A prompt longer than common.CHUNK is prefilled in chunks, then continued.

--ckpt-dir: the checkpoint is first exported to GGUF (llama31.checkpoints.gguf, in a temporary folder), a
tiny checkpoint's 512-id vocabulary with the real Llama 3.1 token strings of its vocab_map.json. --gguf: a file
exported already (`python -m llama31.convert DIR OUT.gguf --to gguf`), or made by any other converter.

--dtype float32 (the fp32 tier) runs llama.cpp in float32 end to end: an F32 file, an F32 KV cache (type_k =
type_v = F32) and flash attention off. Either half-precision step alone moves tiny models' logits by ~2.5e-4,
past the tier's 1e-4: llama.cpp's default F16 cache rounds every key and value to 11 significant bits, and its
CPU flash-attention kernel works in F16. bfloat16 / float16: a BF16 / F16 file with llama.cpp's default F16
cache (the bf16 tier).

Reported besides the required fields: lse and the last position's logits, and debug.rope_inv_freq, the RoPE
frequencies the file gives llama.cpp (theta^(-2i/d) divided by its rope_freqs tensor), so that a file without
the llama3 scaling is named as such. No layer summaries: llama.cpp's hidden states stay inside its graph.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from functools import partial
from pathlib import Path

import numpy as np
import torch

from reference.engines.common import (
    DTYPES,
    EngineOutputs,
    batches,
    chunked_prompt_then_greedy,
    read_golden,
    run_prompts,
    write_candidate,
)
from reference.logits import topk_summary

OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
INSTALL = "pip install -e '.[engines]'"


def import_llama_cpp():
    """The llama_cpp module (llama-cpp-python), quiet but for errors; ImportError with the install command."""
    try:
        import llama_cpp
    except ImportError as e:
        raise ImportError(f"llama.cpp runs through llama-cpp-python, which is not installed ({e}); {INSTALL}, or "
                          "pip install llama-cpp-python gguf (it builds llama.cpp: minutes)") from None
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log goes through it
    return llama_cpp


class LlamaCpp:
    """One GGUF model and one llama.cpp context of `n_seq` sequences of up to `n_ctx_seq` positions each.

    kv_cache: "f32" or "f16", the type of the cached keys and values. forward() is llama_decode: every token it
    is given is appended to its sequence's cache, and the logits of every one of them are returned.
    """

    def __init__(self, gguf_path, *, n_seq: int = 1, n_ctx_seq: int = 1024, threads: int | None = None,
                 kv_cache: str = "f32", flash_attn: bool = False, n_batch: int = 512):
        self.lib = lib = import_llama_cpp()
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self.model:
            raise ValueError(f"{gguf_path}: llama.cpp could not load this GGUF file (its reason is printed "
                             "above)")
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        params = lib.llama_context_default_params()
        params.n_seq_max, params.n_ctx = n_seq, n_seq * n_ctx_seq
        params.n_batch = params.n_ubatch = self.n_batch = n_batch
        params.type_k = params.type_v = {"f32": lib.GGML_TYPE_F32, "f16": lib.GGML_TYPE_F16}[kv_cache]
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else \
            lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if threads:
            params.n_threads = params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, params)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"{gguf_path}: llama.cpp could not create a context ({n_seq} x {n_ctx_seq} positions)")

    def clear(self) -> None:
        """Empty the KV cache of every sequence."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def forward(self, tokens: list[int], positions: list[int], seqs: list[int]) -> np.ndarray:
        """llama_decode of tokens at positions in sequences seqs (n_batch at a time) -> (len(tokens), vocab)
        float32 logits."""
        lib, out = self.lib, []
        for start in range(0, len(tokens), self.n_batch):
            part = range(start, min(start + self.n_batch, len(tokens)))
            batch = lib.llama_batch_init(len(part), 0, 1)
            try:
                for i, j in enumerate(part):
                    batch.token[i], batch.pos[i], batch.logits[i] = tokens[j], positions[j], 1
                    batch.n_seq_id[i], batch.seq_id[i][0] = 1, seqs[j]
                batch.n_tokens = len(part)
                status = lib.llama_decode(self.ctx, batch)
                if status != 0:
                    raise RuntimeError(f"llama_decode returned {status} (a full KV cache returns 1)")
                logits = lib.llama_get_logits(self.ctx)
                out.append(np.ctypeslib.as_array(logits, shape=(len(part), self.n_vocab)).copy())
            finally:
                lib.llama_batch_free(batch)
        return np.concatenate(out)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def prefill(engine: LlamaCpp, rows: list[list[int]]) -> list[np.ndarray]:
    """Every row into its own sequence of an emptied cache, decoded together; per row (len, vocab) logits."""
    engine.clear()
    tokens = [t for r in rows for t in r]
    positions = [p for r in rows for p in range(len(r))]
    seqs = [s for s, r in enumerate(rows) for _ in r]
    logits = engine.forward(tokens, positions, seqs)
    ends = np.cumsum([len(r) for r in rows])
    return np.split(logits, ends[:-1])


def prompt_topk(engine: LlamaCpp, rows, k):
    return [(*topk_summary(torch.from_numpy(z), k), z[-1]) for z in prefill(engine, rows)]


def greedy(engine: LlamaCpp, rows, max_new, stop_ids, k):
    """Greedy continuations of all rows together: each step decodes the last token of every unfinished row."""
    last = [z[-1] for z in prefill(engine, rows)]
    generated, chosen_from = [[] for _ in rows], [[] for _ in rows]
    active = list(range(len(rows)))
    while active:
        for r in active:
            generated[r].append(int(last[r].argmax()))
            chosen_from[r].append(last[r])
        active = [r for r in active if generated[r][-1] not in stop_ids and len(generated[r]) < max_new]
        if active:
            logits = engine.forward([generated[r][-1] for r in active],
                                    [len(rows[r]) + len(generated[r]) - 1 for r in active], active)
            for r, z in zip(active, logits):
                last[r] = z
    return [(g, *topk_summary(torch.from_numpy(np.stack(c)), k)) for g, c in zip(generated, chosen_from)]


def long_prompt(engine: LlamaCpp, ids, k, max_new, stop_ids):
    engine.clear()
    forward = lambda tokens, start: torch.from_numpy(  # noqa: E731
        engine.forward(tokens, list(range(start, start + len(tokens))), [0] * len(tokens)))
    return chunked_prompt_then_greedy(forward, ids, k, max_new, stop_ids)


def rope_inv_freq(gguf_path) -> np.ndarray | None:
    """The RoPE frequencies a GGUF file gives llama.cpp: theta^(-2i/d) / rope_freqs[i] (float64, (d/2,)); None
    for a file without the llama architecture's RoPE keys."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    fields = reader.fields
    if "llama.rope.freq_base" not in fields or "llama.rope.dimension_count" not in fields:
        return None
    theta = float(fields["llama.rope.freq_base"].contents())
    d = int(fields["llama.rope.dimension_count"].contents())
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    factors = next((np.asarray(t.data, dtype=np.float64) for t in reader.tensors if t.name == "rope_freqs.weight"),
                   None)
    return inv_freq if factors is None else inv_freq / factors


def run(gguf_path, golden: dict, *, dtype: str = "float32", threads: int | None = None) -> EngineOutputs:
    """Run the GGUF file on the golden's prompts (its JSON: prompts, settings) in llama.cpp."""
    prompts, settings = golden["prompts"], golden["settings"]
    n_seq = max(len(g) for g in batches(prompts))
    longest = max(len(p["ids"]) for p in prompts) + settings["max_new_tokens"]
    n_ctx_seq = -(-longest // 256) * 256  # rounded up to whole 256s
    engine = LlamaCpp(gguf_path, n_seq=n_seq, n_ctx_seq=n_ctx_seq, threads=threads,
                      kv_cache="f32" if dtype == "float32" else "f16", flash_attn=False)
    try:
        out = run_prompts(golden, prompt_topk=partial(prompt_topk, engine), greedy=partial(greedy, engine),
                          long_prompt=partial(long_prompt, engine))
    finally:
        engine.close()
    out.rope_inv_freq = rope_inv_freq(gguf_path)
    return out


def producer(dtype: str, gguf_path) -> dict:
    import llama_cpp

    return {"engine": "llama.cpp", "version": f"llama-cpp-python {llama_cpp.__version__}", "dtype": dtype,
            "device": "cpu", "gguf": Path(gguf_path).name, "kv_cache": "f32" if dtype == "float32" else "f16",
            "flash_attn": False}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m reference.engines.llamacpp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt-dir", help="the checkpoint folder the golden was made from (exported to GGUF)")
    source.add_argument("--gguf", help="a GGUF file of that checkpoint, to run as it is")
    p.add_argument("--golden", required=True, help="the golden JSON file whose prompts to run")
    p.add_argument("--out", required=True, help="the candidate JSON file to write (arrays go to .safetensors "
                                                "beside it)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="float32: F32 file and KV cache (default); bfloat16/float16: that file, F16 KV cache")
    p.add_argument("--threads", type=int, help="llama.cpp threads (default: llama.cpp's choice)")
    args = p.parse_args(argv)
    try:
        import_llama_cpp()  # before any export: the missing package is the first thing to say
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    golden = read_golden(args.golden)
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = args.gguf
        if gguf_path is None:
            from llama31.checkpoints.gguf import write_gguf

            gguf_path = write_gguf(args.ckpt_dir, Path(tmp) / "model.gguf", outtype=OUTTYPES[args.dtype])
        outputs = run(gguf_path, golden, dtype=args.dtype, threads=args.threads)
        write_candidate(args.out, golden, outputs, producer(args.dtype, gguf_path))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
