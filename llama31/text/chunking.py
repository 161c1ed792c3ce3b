"""Cutting long text into pieces tiktoken can encode, without changing the token ids.

tiktoken's Rust core fails on some very long inputs: a run of ~1M whitespace characters exceeds the
backtracking stack of its regex engine ("Max stack size exceeded"), and older releases slow down badly on
long runs without whitespace. Meta's reference therefore encodes text in chunks of at most 400K characters
and cuts any run of more than 25K consecutive whitespace (or non-whitespace) characters. We keep both limits
but choose *where* to cut so that, on ordinary text, the ids equal those of encoding the whole string
(tests compare against HF tokenizers, which encodes long text whole):

* A cut is exact when it falls on a boundary of the pre-tokenizer's pieces, because tiktoken splits text with
  the regex (SPLIT_PATTERN in tokenizer.py, Meta's llama-models tokenizer) and runs BPE inside each piece
  independently:

      (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*
      |\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+

  Two kinds of position are piece boundaries whatever surrounds them (``_is_piece_boundary``):
    - a letter followed by a non-letter: every alternative that holds a letter ends where the run of
      letters ends;
    - a non-whitespace character followed by whitespace other than \\r or \\n: only ``[\\r\\n]*`` lets a
      non-whitespace piece take trailing whitespace.
  The regex has no look-behind, so the piece after the cut starts exactly as it would in the whole text.
* When no boundary is near (a run of one repeated character, a very long whitespace run) the cut is made
  inside a piece, at a multiple of 24,576 = 3 * 2**13 characters from the run's start. BPE of a run of one
  repeated character is periodic from the left with a period dividing that number (3 for digits, which the
  regex groups in threes; 8 for "a" and "!", 32 for "\\n", 128 for spaces in this vocabulary), so those runs
  still tokenize as they would whole. Other pathological runs, such as 100K random letters without a
  break, or a letter run glued to a leading space, may tokenize differently near the cuts than an unbounded
  encoder would (Meta's reference cuts every run at exactly 25K characters and has the same limitation).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Iterator

# Meta's limits are 400_000 and 25_000; ours are multiples of 3 * 2**13 just below them, so that hard cuts
# stay aligned with the period of repeated-character runs (module docstring).
MAX_RUN_CHARS = 24_576  # 3 * 2**13
MAX_CHUNK_CHARS = 16 * MAX_RUN_CHARS  # 393_216

# The Unicode White_Space property, which is what \s means in tiktoken's regex. Python's str.isspace()
# differs (it also accepts U+001C..U+001F, which the regex treats as punctuation).
_WHITESPACE_SET = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                            + "".join(map(chr, range(0x2000, 0x200B))))
_WHITESPACE_CLASS = "[" + re.escape("".join(sorted(_WHITESPACE_SET))) + "]"
_RUNS = re.compile(f"{_WHITESPACE_CLASS}+|[^{_WHITESPACE_CLASS[1:]}+")  # maximal whitespace / non-whitespace runs


def split_for_tiktoken(text: str) -> list[str]:
    """Cut ``text`` into consecutive pieces that tiktoken encodes safely; "".join(pieces) == text.

    Each piece has at most MAX_CHUNK_CHARS characters and no run of more than MAX_RUN_CHARS whitespace
    or non-whitespace characters. Encoding the pieces one by one and concatenating the ids gives the ids
    of the whole text for ordinary text and for long runs of one repeated character (module docstring).
    """
    if len(text) <= MAX_RUN_CHARS:  # too short to exceed either limit: the common case, kept cheap
        return [text]
    return [piece for chunk in _split_long_text(text) for piece in _split_long_runs(chunk)]


def _split_long_text(text: str) -> Iterator[str]:
    """Slices of at most MAX_CHUNK_CHARS, each ending on a piece boundary when one is in its back half."""
    start = 0
    while len(text) - start > MAX_CHUNK_CHARS:
        end = _last_piece_boundary(text, start + MAX_CHUNK_CHARS // 2, start + MAX_CHUNK_CHARS)
        yield text[start:end]
        start = end
    yield text[start:]


def _split_long_runs(text: str) -> Iterator[str]:
    """Slices of ``text`` none of which holds more than MAX_RUN_CHARS of one whitespace/non-whitespace run."""
    start = 0
    for run in _RUNS.finditer(text):
        run_start, run_end = run.span()
        is_whitespace = text[run_start] in _WHITESPACE_SET
        position = run_start
        while run_end - position > MAX_RUN_CHARS:
            if is_whitespace:  # a whitespace run has no inner piece boundary worth looking for
                cut = position + MAX_RUN_CHARS
            else:
                cut = _last_piece_boundary(text, position + MAX_RUN_CHARS // 2, position + MAX_RUN_CHARS)
            yield text[start:cut]
            start = position = cut
    yield text[start:]


def _last_piece_boundary(text: str, low: int, high: int) -> int:
    """The largest i in (low, high] with _is_piece_boundary(text, i); ``high`` (a hard cut) if there is none.

    Requires 1 <= low < high < len(text).
    """
    for i in range(high, low, -1):
        if _is_piece_boundary(text, i):
            return i
    return high


def _is_piece_boundary(text: str, i: int) -> bool:
    """True if every split of ``text`` by the Llama 3 regex has a piece ending at text[i - 1] (proof above)."""
    before, after = text[i - 1], text[i]
    if before.isalpha():  # isalpha() is \p{L}: Lu, Ll, Lt, Lm, Lo
        # A code point Python's Unicode tables do not know yet (category Cn) may be a letter to the regex
        # (newer tables), so it is never taken as the end of a letter run.
        return not after.isalpha() and unicodedata.category(after) != "Cn"
    return before not in _WHITESPACE_SET and after in _WHITESPACE_SET and after not in "\r\n"
