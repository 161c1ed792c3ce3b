"""Build the training corpus of the demo model: the King James Version of the Bible, tokenized, split by chapter.

    apt-get install bible-kjv              # Debian / Ubuntu: the `bible` program and the KJV text
    python examples/kjv_corpus.py          # writes out/kjv/{train,heldout}.npy, corpus.json, kjv.txt

The text. The King James Version (1611) is in the public domain in most of the world. In the United Kingdom it
is not: the Crown's perpetual rights in it are exercised through letters patent (the King's Printer's patent,
held by Cambridge University Press), a royal prerogative outside ordinary copyright that has no force outside the
UK. Debian ships the text in the `bible-kjv` package, whose copyright file says "The copyright for the King James
Version text of the Bible is expired". Anyone redistributing the text (or this corpus) in the UK should check
the patent holder's terms.

What `bible -f "Gen1:1-Rev22:21"` prints is one verse per line, each with a reference prefix: "Ge1:1 In the
beginning God created the heaven and the earth." The cleaning chosen for a language model:

  * each chapter becomes one document: a heading with the book's full name and the chapter number ("Genesis 1"),
    a blank line, then one verse per line. The heading gives a prompt a natural way to ask for a book;
  * the verse references ("Ge1:1") are dropped: a model would spend capacity learning to count verses, and a
    reader of its output does not want them;
  * nothing else is changed: spelling and punctuation are as printed (runs of spaces are collapsed).

Tokens. Every chapter is encoded with the project's tokenizer (the Llama 3 tokenizer) as
<|begin_of_text|> text <|end_of_text|>, the way pre-training data is framed, so that a prompt that starts with
<|begin_of_text|> (as llama31.generation's prompts do) sees what the model was trained on, and the model learns
where a chapter ends.

Split. The chapters are numbered 1..1189 in canonical order; every chapter whose number is a multiple of
--heldout-every (default 20: chapters 20, 40, ..., 59 chapters) goes to the held-out split and is never seen in
training. Splitting by chapter, not by random windows, keeps held-out text from sharing a window with training
text.

Output (in --out, default out/kjv/):
  train.npy, heldout.npy   uint32 token ids, the chapters of each split concatenated in canonical order
  corpus.json              counts, the split rule, the held-out chapters, sha256 of the text and of the ids
  kjv.txt                  the cleaned text (all chapters, for reading; the ids are its encoding per chapter)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# The abbreviations `bible` prints, in canonical order, and the books' names as the KJV titles them for short.
BOOKS = {
    "Ge": "Genesis", "Exo": "Exodus", "Lev": "Leviticus", "Num": "Numbers", "Deu": "Deuteronomy",
    "Josh": "Joshua", "Jdgs": "Judges", "Ruth": "Ruth", "1Sm": "1 Samuel", "2Sm": "2 Samuel", "1Ki": "1 Kings",
    "2Ki": "2 Kings", "1Chr": "1 Chronicles", "2Chr": "2 Chronicles", "Ezra": "Ezra", "Neh": "Nehemiah",
    "Est": "Esther", "Job": "Job", "Psa": "Psalms", "Prv": "Proverbs", "Eccl": "Ecclesiastes",
    "SSol": "Song of Solomon", "Isa": "Isaiah", "Jer": "Jeremiah", "Lam": "Lamentations", "Eze": "Ezekiel",
    "Dan": "Daniel", "Hos": "Hosea", "Joel": "Joel", "Amos": "Amos", "Obad": "Obadiah", "Jonah": "Jonah",
    "Mic": "Micah", "Nahum": "Nahum", "Hab": "Habakkuk", "Zep": "Zephaniah", "Hag": "Haggai", "Zec": "Zechariah",
    "Mal": "Malachi", "Mat": "Matthew", "Mark": "Mark", "Luke": "Luke", "John": "John", "Acts": "Acts",
    "Rom": "Romans", "1Cor": "1 Corinthians", "2Cor": "2 Corinthians", "Gal": "Galatians", "Eph": "Ephesians",
    "Phi": "Philippians", "Col": "Colossians", "1Th": "1 Thessalonians", "2Th": "2 Thessalonians",
    "1Tim": "1 Timothy", "2Tim": "2 Timothy", "Titus": "Titus", "Phmn": "Philemon", "Heb": "Hebrews",
    "Jas": "James", "1Pet": "1 Peter", "2Pet": "2 Peter", "1Jn": "1 John", "2Jn": "2 John", "3Jn": "3 John",
    "Jude": "Jude", "Rev": "Revelation",
}
VERSE_SPEC = "Gen1:1-Rev22:21"
REFERENCE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$")  # "1Cor13:4 Charity suffereth long, ..."
N_CHAPTERS = 1189
N_VERSES = 31102


@dataclass
class Chapter:
    number: int  # 1..1189 in canonical order
    book: str  # full name, e.g. "Song of Solomon"
    chapter: int  # within the book
    verses: list[str]

    def text(self) -> str:
        return f"{self.book} {self.chapter}\n\n" + "\n".join(self.verses) + "\n"


def read_bible() -> str:
    """The whole KJV as `bible` prints it (one line per verse); SystemExit telling how to install it if absent."""
    if shutil.which("bible") is None:
        raise SystemExit("error: the `bible` program is not installed. On Debian or Ubuntu: "
                         "sudo apt-get install bible-kjv")
    # COLUMNS=0 and a pipe: no line wrapping, one verse per line (a wrapped verse would still be rejoined below).
    result = subprocess.run([shutil.which("bible"), "-f", VERSE_SPEC], capture_output=True, text=True, check=True,
                            env={**os.environ, "COLUMNS": "0"})
    return result.stdout


def parse_chapters(raw: str) -> list[Chapter]:
    """`bible` output -> the chapters in order, verse references removed. ValueError if a line is not a verse
    (or the continuation of one) or the counts differ from the KJV's 1189 chapters and 31102 verses."""
    chapters: list[Chapter] = []
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        match = REFERENCE.match(line)
        if match is None:  # a wrapped verse: its continuation line
            if not chapters or not chapters[-1].verses:
                raise ValueError(f"`bible` output line {line_no} is not a verse: {line[:80]!r}")
            chapters[-1].verses[-1] += " " + line.strip()
            continue
        abbreviation, chapter, verse, text = match.groups()
        if abbreviation not in BOOKS:
            raise ValueError(f"`bible` output line {line_no}: unknown book {abbreviation!r}")
        book, chapter = BOOKS[abbreviation], int(chapter)
        if not chapters or (chapters[-1].book, chapters[-1].chapter) != (book, chapter):
            chapters.append(Chapter(len(chapters) + 1, book, chapter, []))
        chapters[-1].verses.append(" ".join(text.split()))
    n_verses = sum(len(c.verses) for c in chapters)
    if (len(chapters), n_verses) != (N_CHAPTERS, N_VERSES):
        raise ValueError(f"expected {N_CHAPTERS} chapters and {N_VERSES} verses from `bible`, got {len(chapters)} "
                         f"and {n_verses}; is this the bible-kjv package's text?")
    return chapters


def is_heldout(chapter: Chapter, every: int) -> bool:
    return chapter.number % every == 0


def build(out: Path, heldout_every: int = 20) -> dict:
    """Read, clean, tokenize and split the KJV into `out`; returns the summary written to corpus.json."""
    from llama31.text import Tokenizer

    raw = read_bible()
    chapters = parse_chapters(raw)
    tokenizer = Tokenizer()
    ids: dict[str, list[int]] = {"train": [], "heldout": []}
    for chapter in chapters:
        split = "heldout" if is_heldout(chapter, heldout_every) else "train"
        ids[split] += tokenizer.encode(chapter.text(), bos=True, eos=True)

    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(c.text() for c in chapters)
    (out / "kjv.txt").write_text(text)
    arrays = {split: np.asarray(values, dtype=np.uint32) for split, values in ids.items()}
    for split, array in arrays.items():
        np.save(out / f"{split}.npy", array)

    everything = np.concatenate(list(arrays.values()))
    distinct, counts = np.unique(everything, return_counts=True)
    p = counts / counts.sum()
    train_ids = set(np.unique(arrays["train"]).tolist())
    summary = {
        "source": f'Debian package bible-kjv, `bible -f "{VERSE_SPEC}"` (King James Version, 1611)',
        "cleaning": "one document per chapter: '<Book> <chapter>', a blank line, one verse per line without its "
                    "reference; encoded as <|begin_of_text|> text <|end_of_text|>",
        "tokenizer": "Llama 3 tokenizer.model (llama31.text.Tokenizer)",
        "split_rule": f"chapters numbered 1..{N_CHAPTERS} in canonical order; chapter numbers divisible by "
                      f"{heldout_every} are held out",
        "heldout_every": heldout_every,
        "heldout_chapters": [f"{c.book} {c.chapter}" for c in chapters if is_heldout(c, heldout_every)],
        "n_chapters": {"train": sum(not is_heldout(c, heldout_every) for c in chapters),
                       "heldout": sum(is_heldout(c, heldout_every) for c in chapters)},
        "n_verses": N_VERSES,
        "n_tokens": {split: int(array.size) for split, array in arrays.items()},
        "n_distinct_ids": int(distinct.size),
        "n_distinct_ids_train": len(train_ids),
        "n_ids_only_in_heldout": int(sum(i not in train_ids for i in distinct.tolist())),
        "unigram_entropy_nats": float(-(p * np.log(p)).sum()),  # of the whole corpus, for orientation
        "text_bytes": len(text.encode()),
        "sha256_bible_output": hashlib.sha256(raw.encode()).hexdigest(),
        "sha256_text": hashlib.sha256(text.encode()).hexdigest(),
        "sha256_ids": {split: hashlib.sha256(array.tobytes()).hexdigest() for split, array in arrays.items()},
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("out/kjv"), help="output folder (default out/kjv)")
    parser.add_argument("--heldout-every", type=int, default=20,
                        help="hold out every chapter whose number is a multiple of this (default 20)")
    args = parser.parse_args(argv)
    summary = build(args.out, args.heldout_every)
    n = summary["n_tokens"]
    print(f"{summary['n_chapters']['train']} + {summary['n_chapters']['heldout']} chapters, {n['train']:,} train + "
          f"{n['heldout']:,} held-out tokens, {summary['n_distinct_ids']:,} distinct ids "
          f"({summary['n_ids_only_in_heldout']} only in held-out chapters), unigram entropy "
          f"{summary['unigram_entropy_nats']:.3f} nats/token -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
