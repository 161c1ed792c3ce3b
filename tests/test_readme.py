"""README.md's reading guide ("Read the model") gives each file's length: the counts must be the files' own."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def reading_guide_rows() -> list[tuple[list[str], list[int]]]:
    """(linked paths, line counts) of each row of the table under '## Read the model'."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Read the model", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and "](" in cells[0]:
            paths = re.findall(r"\]\(([^)]+)\)", cells[0])
            counts = [int(n) for n in re.findall(r"\d+", cells[1])]
            rows.append((paths, counts))
    return rows


def test_the_reading_guide_gives_each_file_its_line_count():
    rows = reading_guide_rows()
    assert len(rows) >= 10  # the table was found and read
    for paths, counts in rows:
        actual = [len((REPO / p).read_text().splitlines()) for p in paths]
        assert counts == actual, f"README.md's reading guide gives {paths} {counts} lines; they have {actual}"
