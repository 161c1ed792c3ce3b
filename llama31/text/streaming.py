"""Streaming detokenization: text for each new token id, never half a character.

A byte-level BPE token can hold part of a multi-byte UTF-8 character (an emoji is often split over two or
three tokens), so decoding each id on its own would print U+FFFD in the middle of correct output. The
StreamDecoder keeps the unfinished bytes until the character is complete.
"""

from __future__ import annotations

import codecs

from llama31.text.tokenizer import Tokenizer


class StreamDecoder:
    """Decodes one token id at a time; the concatenated output equals ``tokenizer.decode`` of all ids.

    >>> stream = StreamDecoder(tokenizer)
    >>> for token_id in generated: print(stream.push(token_id), end="")
    >>> print(stream.finish())

    Bytes that can never form a character (invalid UTF-8) become U+FFFD as soon as they are known to be
    invalid, exactly as in ``Tokenizer.decode``; bytes of a character still incomplete when the stream ends
    become U+FFFD in ``finish()``.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by ``token_id`` (possibly ""); raises InputError (a ValueError) for an id that is not
        an integer in the vocabulary, naming it."""
        token_id = self._tokenizer.check_id(token_id, "token_id", "StreamDecoder.push")
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id]))

    def finish(self) -> str:
        """Flush what is left (U+FFFD for an unfinished character) and start a new, empty stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
