"""The prompts of a golden: specs (text, chat dialogs, a long-context probe) -> token ids.

A prompt spec is a dict (reference/prompts.json holds the defaults):

    {"name": "chat-tool", "kind": "chat", "messages": [...]}     a dialog in the Llama 3.1 chat format,
                                                                 ending with the header that prompts a reply
    {"name": "...", "kind": "completion", "text": "..."}         <|begin_of_text|> + text
    {"name": "...", "kind": "long", "tokens": 384}               a needle-in-a-haystack text of about that many
                                                                 tokens (default: well past the model's
                                                                 original_max_position_embeddings)
    {"name": "...", "kind": "ids", "ids": [...]}                 raw model token ids
    optional "batch": "label"                                    prompts with the same label run as one batch

Text is encoded with llama31's tokenizer and chat format. The golden stores the resulting ids, so an engine
never needs a tokenizer: it feeds the ids.

The tiny shipped checkpoints do not have the 128256-row vocabulary (its embedding alone would be 16 MB per
checkpoint at width 32). They keep 512 of the Llama 3.1 ids instead: every id their prompts use, the special
tokens 128000..128010, and the lowest remaining ids as filler. ``vocab_map.json`` in the checkpoint folder
lists them: model id i stands for Llama 3.1 id llama31_ids[i]. So the prompts are real Llama 3.1 text, and a
tiny model's continuation decodes to real (if random) Llama 3.1 tokens. Real checkpoints have no map.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama31.config import ModelArgs
from llama31.text import ChatFormat, Tokenizer

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.json")
KINDS = ("completion", "chat", "long", "ids")
VOCAB_MAP_FILE = "vocab_map.json"

# The Llama 3.1 stop tokens of greedy continuations: end_of_text, eom, eot (Meta's Llama 3.1 prompt-format
# documentation).
LLAMA31_STOP_IDS = (128001, 128008, 128009)
# The special tokens a dialog can contain (begin_of_text .. python_tag): a tiny vocabulary always keeps them.
LLAMA31_SPECIAL_IDS = tuple(range(128000, 128011))


def load_prompt_specs(path=None) -> list[dict]:
    """The prompt specs in a JSON file ({"prompts": [...]} or a bare list); default: reference/prompts.json."""
    path = Path(path or DEFAULT_PROMPTS)
    data = json.loads(path.read_text(encoding="utf-8"))
    specs = data["prompts"] if isinstance(data, dict) else data
    seen = set()
    for i, spec in enumerate(specs):
        where = f"{path}: prompts[{i}]"
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"{where}: each prompt is a dict with a 'name' and a 'kind'")
        if spec["name"] in seen:
            raise ValueError(f"{where}: duplicate prompt name {spec['name']!r}")
        seen.add(spec["name"])
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind {kind!r} is not one of {KINDS}")
        needed = {"completion": "text", "chat": "messages", "ids": "ids"}.get(kind)
        if needed and needed not in spec:
            raise ValueError(f"{where}: a {kind!r} prompt needs {needed!r}")
    if not specs:
        raise ValueError(f"{path}: no prompts")
    return specs


class VocabMap:
    """Model token ids <-> Llama 3.1 token ids: the identity, or the list read from a checkpoint's vocab_map.json."""

    def __init__(self, llama31_ids: list[int] | None, vocab_size: int):
        self.llama31_ids = llama31_ids
        self.vocab_size = vocab_size
        if llama31_ids is not None:
            if len(llama31_ids) != vocab_size or len(set(llama31_ids)) != vocab_size:
                raise ValueError(f"vocab map: expected {vocab_size} distinct Llama 3.1 ids (the model's vocab_size), "
                                 f"got {len(llama31_ids)} ({len(set(llama31_ids))} distinct)")
            self._model_id = {t: i for i, t in enumerate(llama31_ids)}

    @classmethod
    def from_checkpoint(cls, ckpt_dir, vocab_size: int) -> "VocabMap":
        file = Path(ckpt_dir) / VOCAB_MAP_FILE
        if not file.is_file():
            return cls(None, vocab_size)
        return cls(json.loads(file.read_text())["llama31_ids"], vocab_size)

    @property
    def is_identity(self) -> bool:
        return self.llama31_ids is None

    def to_model(self, ids: list[int], where: str) -> list[int]:
        """Llama 3.1 ids -> model ids; an error naming the prompt if an id has no place in the model's vocabulary."""
        if self.llama31_ids is None:
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise ValueError(f"{where}: token ids {bad[:5]} exceed the model's vocab_size {self.vocab_size}; "
                                 f"a reduced vocabulary needs a {VOCAB_MAP_FILE} in the checkpoint folder")
            return list(ids)
        missing = sorted({t for t in ids if t not in self._model_id})
        if missing:
            raise ValueError(f"{where}: Llama 3.1 ids {missing[:10]} ({len(missing)} in all) are not in this "
                             f"checkpoint's {VOCAB_MAP_FILE}; rebuild the tiny checkpoint for these prompts "
                             "(python -m reference.make_tiny --prompts FILE)")
        return [self._model_id[t] for t in ids]

    def to_llama31(self, ids: list[int]) -> list[int]:
        return list(ids) if self.llama31_ids is None else [self.llama31_ids[i] for i in ids]

    def stop_ids(self) -> list[int]:
        """The model ids of end_of_text, eom and eot (those the vocabulary has)."""
        if self.llama31_ids is None:
            return [t for t in LLAMA31_STOP_IDS if t < self.vocab_size]
        return [self._model_id[t] for t in LLAMA31_STOP_IDS if t in self._model_id]


def default_long_tokens(args: ModelArgs, max_new_tokens: int) -> int:
    """Length of the long-context probe: twice the original context (L), at least 384 tokens, within max_seq_len.

    For 3.1 (L = 8192) that is 16384 tokens; for the tiny checkpoints (L = 32 or 64), 384: 6 to 12 times L,
    so that every position past L exercises the llama3 frequency scaling.
    """
    L = args.rope_scaling.original_max_position_embeddings if args.rope_scaling else 0
    return min(max(2 * L, 384), args.max_seq_len - max_new_tokens)


_COLOURS = ("red", "green", "blue", "yellow", "white", "black", "orange", "purple")
_ANIMALS = ("fox", "horse", "rabbit", "owl", "wolf", "bear", "goat", "heron")
_PLACES = ("river", "market", "forest", "harbour", "bridge", "village", "mill", "tower")
_NEEDLE = 'The secret code word is "{word}". Remember it, you will be asked for it at the end.\n\n'
_QUESTION = '\nQuestion: what is the secret code word? Answer: The secret code word is "'


def long_context_text(tokenizer: Tokenizer, n_tokens: int, word: str = "marmalade") -> str:
    """A needle (a code word) followed by numbered filler sentences and a question that asks for the needle:
    about n_tokens tokens with <|begin_of_text|>. No randomness: the sentences come from their numbers."""
    count = lambda s: len(tokenizer.encode(s, bos=False, eos=False))  # noqa: E731
    budget = n_tokens - 1 - count(_NEEDLE.format(word=word)) - count(_QUESTION)
    sentences = []
    i = 0
    while True:
        i += 1
        sentence = (f"Note {i}: the {_COLOURS[i % 8]} {_ANIMALS[(3 * i) % 8]} walked {(7 * i) % 10 + 2} miles "
                    f"to the {_PLACES[(5 * i) % 8]}.\n")
        cost = count(sentence)  # sentences end in ".\n" and start with a letter: token counts add up
        if cost > budget:
            break
        sentences.append(sentence)
        budget -= cost
    return _NEEDLE.format(word=word) + "".join(sentences) + _QUESTION


def encode_prompts(specs: list[dict], tokenizer: Tokenizer, vocab: VocabMap, *, long_tokens: int) -> list[dict]:
    """Prompt specs -> the golden's prompt records: name, kind, batch, text or messages, llama31_ids, ids."""
    formatter = ChatFormat(tokenizer)
    records = []
    for spec in specs:
        kind, name = spec["kind"], spec["name"]
        record = {"name": name, "kind": kind}
        if spec.get("batch") is not None:
            record["batch"] = spec["batch"]
        if kind == "ids":
            ids = [int(t) for t in spec["ids"]]
            record["ids"] = ids
            records.append(record)
            continue
        if kind == "chat":
            record["messages"] = spec["messages"]
            llama31_ids = formatter.encode_dialog_prompt(spec["messages"])
        else:
            if kind == "long":
                record["tokens"] = spec.get("tokens") or long_tokens
                text = long_context_text(tokenizer, record["tokens"])
            else:
                text = spec["text"]
            record["text"] = text
            llama31_ids = tokenizer.encode(text, bos=True, eos=False)
        record["llama31_ids"] = llama31_ids
        record["ids"] = vocab.to_model(llama31_ids, f"prompt {name!r}")
        records.append(record)
    return records
