"""The README stays short, the docs index lists every page, and no link or anchor is broken.

Other pages land in ``docs/`` over time: add each to ``docs/index.md``. Code cites
``docs/architecture.md``, never a design document outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT_BYTES = 12 * 1024

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return LINK.findall(text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as dashes."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    return {slug(heading) for heading in HEADING.findall(text)}


def test_the_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size} bytes (limit {README_LIMIT_BYTES}): move the detail to a page in docs/"
    )


def test_the_readme_starts_with_the_two_commands_and_shows_the_dashboard() -> None:
    text = README.read_text(encoding="utf-8")
    first_screen = "\n".join(text.splitlines()[:12])
    assert "./scripts/serve" in first_screen
    assert "./scripts/test" in first_screen
    assert "(docs/dashboard.png)" in text
    assert "(docs/index.md)" in text


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken: list[str] = []
    for target in links(page):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        if not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading with that anchor)")
    assert broken == [], f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_docs_index_lists_every_page() -> None:
    listed = {target.partition("#")[0] for target in links(DOCS / "index.md")}
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "index.md" and p.name not in listed]
    assert missing == [], f"add these pages to docs/index.md: {missing}"


def test_code_cites_the_architecture_page_not_an_outside_design_document() -> None:
    citation = re.compile("DESIGN" + r"(\.md)?\s*§")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("app", "probes", "tests", "bench", "scripts")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file() and path.suffix in {".py", ".js", ".sh", ""} and "__pycache__" not in path.parts
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        if citation.search(line)
    ]
    assert found == [], f"cite docs/architecture.md (a section by its title) instead: {found}"
