"""GGUF, llama.cpp's file format: export a Llama 3.x checkpoint so that llama.cpp loads and runs it.

    python -m llama31.convert SRC OUT.gguf --to gguf [--outtype f32|bf16|f16]

A GGUF file is a header of typed key-value metadata, a table of tensors (name, shape, type, offset) and the
aligned tensor data (the format's documentation: docs/gguf.md in the ggml repository). It is written here with
the `gguf` package, the format's own Python library, kept in the llama.cpp repository. What llama.cpp's
"llama" architecture reads, and where each piece comes from:

  metadata     llama.block_count, embedding_length, feed_forward_length, context_length, vocab_size,
               attention.head_count, head_count_kv, key_length = value_length (head_dim),
               attention.layer_norm_rms_epsilon, rope.freq_base (theta), rope.dimension_count; general.file_type
  tensors      Meta's names -> llama.cpp's (GGUF_NAMES). A (out, in) weight keeps its bytes; GGUF lists its
               dimensions fastest-varying first, (in, out), which the gguf package does for us.
  q/k rows     llama.cpp's llama architecture rotates adjacent pairs (x[2i], x[2i+1]) of each head, as Meta's
               reference code does (ggml's "normal" RoPE mode; its "neox" mode rotates halves, as HF does). So
               wq and wk go in Meta's row order, which is how open_checkpoint yields them from either format
               (it undoes HF's permutation on reading); llama.cpp's own converter permutes HF's rows back too.
  llama3 RoPE  llama.cpp has no metadata key for the "llama3" frequency scaling: it divides each rotation
               frequency w_i by a factor read from the tensor rope_freqs.weight (head_dim/2 float32 values),
               factor_i = w_i / w'_i: 1 for the high frequencies, s for the low ones, blended in between
               (llama31.model.rope). A file without that tensor runs unscaled: right up to the original
               context, silently wrong past it.
  vocabulary   byte-level BPE (tokenizer model "gpt2") with the Llama 3 pre-tokenizer ("llama-bpe"): the token
               strings, their types, the merges, the special ids, add_bos and a chat template, so that
               llama.cpp's own tokenizer and chat formatting work on the file (llama3_vocabulary).

Only float weights are written (F32, BF16, F16; norms and rope_freqs always F32, as llama.cpp expects). For a
4-bit GGUF, export the float model and quantize it with llama.cpp's own quantizer (llama-quantize).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from llama31.checkpoints.atomic import atomic_file
from llama31.checkpoints.load import check_config_fits_tensors, load_weights, open_checkpoint
from llama31.config import ModelArgs
from llama31.errors import InputError, check_object

ARCHITECTURE = "llama"
OUTTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# A reduced vocabulary (reference/'s tiny checkpoints): {"llama31_ids": [...]}, model id i is Llama 3.1 id
# llama31_ids[i]. Its rows are written with those tokens' strings.
VOCAB_MAP_FILE = "vocab_map.json"
N_LLAMA3_VOCAB = 128_256

_LAYER_NAMES = {  # Meta module path inside block i -> llama.cpp's tensor name inside blk.i
    "attention.wq": "attn_q",
    "attention.wk": "attn_k",
    "attention.wv": "attn_v",
    "attention.wo": "attn_output",
    "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up",
    "feed_forward.w2": "ffn_down",
    "attention_norm": "attn_norm",
    "ffn_norm": "ffn_norm",
}
_TOP_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output"}
ROPE_FREQS = "rope_freqs.weight"
_META_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.weight$")

# The Llama 3.1 chat format (Meta's prompt-format documentation; llama31.text.ChatFormat) as a Jinja template,
# the language llama.cpp's chat templates are written in: content stripped, a tool call after <|python_tag|>
# ends with <|eom_id|>, and the assistant header when a reply is wanted. llama.cpp also recognises it by its
# header tokens and then formats dialogs with its built-in Llama 3 format, which is the same.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) }}"
    "{%- if message['tool_call'] is defined and message['tool_call'] is not none %}"
    "{{- '<|python_tag|>' + (message['tool_call'] | trim) + '<|eom_id|>' }}"
    "{%- else %}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def gguf_name(meta_name: str) -> str:
    """'layers.3.attention.wq.weight' -> 'blk.3.attn_q.weight'; KeyError if it is not a Llama weight."""
    m = _META_LAYER.match(meta_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"
    module, _, leaf = meta_name.rpartition(".")
    if module in _TOP_NAMES and leaf == "weight":
        return f"{_TOP_NAMES[module]}.weight"
    raise KeyError(f"no GGUF name for parameter {meta_name!r}")


def rope_freq_factors(args: ModelArgs) -> torch.Tensor | None:
    """llama.cpp's rope_freqs: w_i / w'_i per frequency, (head_dim/2,) float32; None without llama3 scaling."""
    if args.rope_scaling is None:
        return None
    from llama31.model.rope import llama3_inv_freq

    unscaled = llama3_inv_freq(args.head_dim, args.rope_theta, None)  # w_i, float64
    scaled = llama3_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)  # w'_i
    return (unscaled / scaled).float()


def write_gguf(src, dst, *, outtype: str | None = None, vocab_ids: list[int] | None = None) -> Path:
    """Write the Meta or HF checkpoint folder src as the GGUF file dst; returns dst.

    outtype: "f32", "bf16" or "f16" for the matrices (None: as stored: bf16 for bf16 weights, f16 for f16,
    else f32). vocab_ids: the Llama 3.1 token id of each embedding row, for a model with a reduced vocabulary
    (None: read from src/vocab_map.json if there is one, else the model must have Llama 3's 128256 rows).
    The tokenizer is src's tokenizer.model (or original/tokenizer.model), else the packaged copy.

    The source is checked as strictly as loading checks it, then held in memory as stored (an 8B bf16 model:
    16 GB); dst is written under a temporary name beside it and renamed only when complete.
    """
    gguf = _gguf_package()
    dst = Path(dst)
    if outtype is not None and outtype not in OUTTYPES:
        raise InputError("write_gguf", "outtype", f"must be one of {sorted(OUTTYPES)} (or None), got {outtype!r}")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; choose a new file name (the export never overwrites a file)")
    ckpt = open_checkpoint(src)
    if ckpt.quantization:
        raise InputError(ckpt.path, None, "is an INT4 checkpoint; GGUF export writes float weights only. Export "
                         "the float model it was quantized from, then quantize the GGUF with llama.cpp's own "
                         "quantizer (llama-quantize model.gguf model-q4_0.gguf Q4_0)")
    args = ckpt.args
    map_file = Path(src) / VOCAB_MAP_FILE
    if vocab_ids is None and map_file.is_file():
        vocab_ids = check_object(json.loads(map_file.read_text(encoding="utf-8")), None, map_file).get("llama31_ids")
        if vocab_ids is None:
            raise InputError(map_file, "llama31_ids", "is missing: the Llama 3.1 token id of each embedding row")
    from llama31.text.tokenizer import Tokenizer

    vocab = llama3_vocabulary(Tokenizer(checkpoint_dir=src).path, args.vocab_size, vocab_ids,
                              source=map_file)

    from llama31.model.transformer import Transformer  # only to know every parameter's name and shape

    check_config_fits_tensors(ckpt)
    model = Transformer(args, device="meta")
    load_weights(model, ckpt, dtype=None, device="cpu")  # the checks of loading; dtypes as stored
    state = {name: t for name, t in model.state_dict().items()
             if not (args.tie_word_embeddings and name == "output.weight")}  # tied: llama.cpp reuses token_embd
    if outtype is None:
        stored = state["tok_embeddings.weight"].dtype
        outtype = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(stored, "f32")
    # name -> (tensor as stored, dtype to write): the matrices in outtype, the norms in float32
    tensors = {gguf_name(name): (t, torch.float32 if t.dim() == 1 else OUTTYPES[outtype]) for name, t in state.items()}
    factors = rope_freq_factors(args)
    if factors is not None:
        tensors[ROPE_FREQS] = (factors, torch.float32)

    with atomic_file(dst) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCHITECTURE)
        try:
            _add_metadata(writer, gguf, args, outtype, name=Path(src).name)
            _add_vocabulary(writer, vocab)
            # the tensor table first (names, shapes, types), then the data, converted one tensor at a time
            for name, (t, dtype) in tensors.items():
                raw = _ggml_type(gguf, dtype)
                writer.add_tensor_info(name, tuple(t.shape), _NUMPY_DTYPES[dtype], t.numel() * dtype.itemsize,
                                       raw_dtype=raw)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t, dtype in tensors.values():
                writer.write_tensor_data(_numpy(t.to(dtype)))
        finally:
            writer.close()
    return dst


def _add_metadata(writer, gguf, args: ModelArgs, outtype: str, name: str) -> None:
    writer.add_name(name)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_key_length(args.head_dim)
    writer.add_value_length(args.head_dim)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)  # every channel of a head is rotated
    writer.add_vocab_size(args.vocab_size)
    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                  "f16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_types[outtype])


def _numpy(t: torch.Tensor):
    # numpy has no bfloat16: its bits go as int16, and the tensor table says BF16 (raw_dtype)
    return t.contiguous().view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.contiguous().numpy()


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16}


def _ggml_type(gguf, dtype: torch.dtype):
    return {torch.float32: gguf.GGMLQuantizationType.F32, torch.bfloat16: gguf.GGMLQuantizationType.BF16,
            torch.float16: gguf.GGMLQuantizationType.F16}[dtype]


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise InputError("convert", "to", "'gguf' needs the gguf package, llama.cpp's GGUF library: pip install "
                         "gguf (or pip install -e '.[engines]')") from None
    return gguf


# ================================================================================== the vocabulary
@dataclass(frozen=True)
class Vocabulary:
    """What llama.cpp's BPE tokenizer reads: tokens[i] is the string of model id i (GPT-2's byte-to-unicode
    spelling of its bytes, or a special token's name), types[i] 1 (normal) or 3 (control), merges "left right"
    in priority order; special ids are model ids (None when a reduced vocabulary lacks the token)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    bos: int | None
    eos: int | None
    eot: int | None
    eom: int | None


def _add_vocabulary(writer, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("llama-bpe")  # the Llama 3 split regex; whole-word tokens before merges
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for add, token in ((writer.add_bos_token_id, vocab.bos), (writer.add_eos_token_id, vocab.eos),
                       (writer.add_eot_token_id, vocab.eot), (writer.add_eom_token_id, vocab.eom)):
        if token is not None:
            add(token)
    writer.add_add_bos_token(True)  # a prompt starts with <|begin_of_text|>
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def llama3_vocabulary(tokenizer_file, vocab_size: int, vocab_ids: list[int] | None = None, *,
                      source="vocab_ids") -> Vocabulary:
    """The Llama 3 vocabulary of tokenizer_file (tokenizer.model), whole or reduced to vocab_ids.

    vocab_ids[i] is the Llama 3.1 id of model id i (None: all 128256, in order); source names where they came
    from, for errors.
    """
    from llama31.text.tokenizer import N_BASE_TOKENS, SPECIAL_TOKEN_NAMES

    if vocab_ids is None:
        if vocab_size != N_LLAMA3_VOCAB:
            raise InputError("config", "vocab_size", f"is {vocab_size}, not Llama 3's {N_LLAMA3_VOCAB}, and no "
                             f"{VOCAB_MAP_FILE} says which Llama 3.1 token each embedding row stands for; add one "
                             "({\"llama31_ids\": [...]}) or pass vocab_ids")
        vocab_ids = list(range(N_LLAMA3_VOCAB))
    bad = [t for t in vocab_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < N_LLAMA3_VOCAB]
    if len(vocab_ids) != vocab_size or len(set(vocab_ids)) != len(vocab_ids) or bad:
        raise InputError(source, "llama31_ids", f"must be {vocab_size} distinct Llama 3.1 ids (0 .. "
                         f"{N_LLAMA3_VOCAB - 1}), one per embedding row; got {len(vocab_ids)} "
                         f"({len(set(vocab_ids))} distinct{f', e.g. {bad[:3]} out of range' if bad else ''})")
    base = _base_vocabulary(str(tokenizer_file))
    kept = {base.tokens[t] for t in vocab_ids if t < N_BASE_TOKENS} if len(vocab_ids) < N_LLAMA3_VOCAB else None
    tokens = [base.tokens[t] if t < N_BASE_TOKENS else SPECIAL_TOKEN_NAMES[t - N_BASE_TOKENS] for t in vocab_ids]
    model_id = {t: i for i, t in enumerate(vocab_ids)}
    special = {name: model_id.get(N_BASE_TOKENS + SPECIAL_TOKEN_NAMES.index(token)) for name, token in (
        ("bos", "<|begin_of_text|>"), ("eos", "<|end_of_text|>"), ("eot", "<|eot_id|>"), ("eom", "<|eom_id|>"))}
    # a reduced vocabulary keeps the merges whose two parts and result it has: the others could only build
    # tokens it lacks
    merges = base.merges if kept is None else [
        m for m in base.merges if (parts := m.split(" ")) and parts[0] in kept and parts[1] in kept
        and parts[0] + parts[1] in kept]
    return Vocabulary(tokens=tokens, types=[1 if t < N_BASE_TOKENS else 3 for t in vocab_ids], merges=merges,
                      **special)


@dataclass(frozen=True)
class _Base:
    tokens: list[str]  # the 128000 ranked tokens, in rank order
    merges: list[str]


@lru_cache(maxsize=2)
def _base_vocabulary(tokenizer_file: str) -> _Base:
    """Token strings and merges of the 128000 ranked tokens (a few seconds: computed once per file).

    tiktoken merges, at every step, the adjacent pair whose concatenation has the lowest rank. llama.cpp merges
    the adjacent pair that comes first in its merge list. The two agree when the list holds every split
    (left, right) of every token whose both parts are tokens, ordered by the rank of the token they make:
    that is the list HF's tokenizer.json for Llama 3 carries (280147 merges), and what this builds.
    """
    from llama31.text.tokenizer import load_mergeable_ranks

    ranks = load_mergeable_ranks(Path(tokenizer_file))
    spell = _byte_to_unicode()
    text = {b: "".join(spell[x] for x in b) for b in ranks}
    by_rank = sorted(ranks, key=ranks.__getitem__)
    merges = []
    for token in by_rank:
        splits = [(ranks[token[:k]], k) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += [f"{text[token[:k]]} {text[token[k:]]}" for _, k in sorted(splits)]
    return _Base(tokens=[text[b] for b in by_rank], merges=merges)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of bytes, which byte-level BPE vocabularies use: the 188 printable
    Latin-1 bytes stand for themselves, the other 68 (controls, space, ...) for U+0100 onwards (space: 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}
