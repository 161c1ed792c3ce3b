"""docs/: make_figures.py draws every figure, and architecture.md links only to files the repository holds."""

import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
ARCHITECTURE = DOCS / "architecture.md"
FIGURES = ("rope_scaling.png", "gqa.png", "kv_cache.png", "int4_layout.png", "decode_roofline.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Markdown links and images: [text](target) and ![alt](target); the text may run over several lines.
LINK = re.compile(r"\]\(([^()\s]+)\)")


@pytest.fixture(scope="module")
def drawn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("figures")
    result = subprocess.run([sys.executable, str(DOCS / "make_figures.py"), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"docs/make_figures.py failed:\n{result.stdout}\n{result.stderr}"
    return out


@pytest.mark.parametrize("name", FIGURES)
def test_make_figures_writes_a_readable_png(drawn, name):
    path = drawn / name
    assert path.is_file(), f"docs/make_figures.py did not write {name}"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), f"{name} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, f"{name}: shape {image.shape}"
    # the figures are committed: small enough for a repository (they come out around 50-90 KiB)
    assert len(data) < 150 * 1024, f"{name} is {len(data) / 1024:.0f} KiB"


def test_make_figures_writes_only_the_listed_figures(drawn):
    assert sorted(p.name for p in drawn.iterdir()) == sorted(FIGURES)


def _targets(markdown: Path) -> list[str]:
    return LINK.findall(markdown.read_text())


def test_architecture_links_point_into_the_repository():
    local = [t for t in _targets(ARCHITECTURE) if not t.startswith(("http://", "https://", "#"))]
    assert local, "architecture.md links to no file of the repository"
    missing = []
    for target in local:
        path = (DOCS / target.split("#")[0]).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            missing.append(target)
    assert not missing, f"docs/architecture.md links to files that do not exist in the repository: {missing}"


def test_architecture_shows_every_figure_from_the_committed_folder():
    images = re.findall(r"!\[[^\]]*\]\(([^()\s]+)\)", ARCHITECTURE.read_text())
    assert sorted(images) == sorted(f"figures/{name}" for name in FIGURES)
    for image in images:
        assert (DOCS / image).read_bytes().startswith(PNG_SIGNATURE), f"docs/{image} is missing or not a PNG"


def test_architecture_shape_walk_runs_and_prints_what_the_page_shows(capsys):
    """The page's first code block builds 8B on the "meta" device and prints the shapes it then quotes."""
    page = (DOCS / "architecture.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", page, re.DOTALL) if 'device="meta"' in block)
    exec(compile(code, "docs/architecture.md", "exec"), {})
    printed = capsys.readouterr().out
    for line in ("tok_embeddings (1, 7, 4096)", "layers.0.attention (1, 7, 4096)",
                 "layers.0.feed_forward.w1 (1, 7, 14336)", "output (1, 7, 128256)"):
        assert line in printed and line in code  # printed, and shown on the page
