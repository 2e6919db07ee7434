"""The documentation: a README a user can read (short, no journal), and links that lead somewhere."""

import re
from pathlib import Path

import pytest

from backend.core.config import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DOCS = sorted((PROJECT_ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 300
TREES = ("backend", "tests", "benchmarks", "frontend", "db")  # folders whose paths the pages name in code

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
# A work journal's references mean nothing to a reader: "issue 22", "issue #22", "round 3".
JOURNAL = re.compile(r"\b(issues?|round)\s*#?\d+", re.I)


def prose(page: Path) -> str:
    """The page without code blocks and code spans, where brackets are code, not links."""
    return CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def relative_links(page: Path) -> list[str]:
    text = prose(page)
    found = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in found if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: ...


def test_the_readme_is_short_enough_to_read() -> None:
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail under docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(PROJECT_ROOT).as_posix())
def test_no_journal_references(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    found = [f"line {text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}" for m in JOURNAL.finditer(text)]
    assert found == [], f"{page.name} names work items instead of saying what is true: {found}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(PROJECT_ROOT).as_posix())
def test_every_relative_link_leads_to_a_file_and_heading(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target}: no such heading")
    assert broken == [], f"{page.name}: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(PROJECT_ROOT).as_posix())
def test_every_path_named_in_code_exists(page: Path) -> None:
    """`backend/search/own_image.py` and the like, named in prose: a module that moved leaves no stale name."""
    spans = CODE_SPAN.findall(FENCE.sub("", page.read_text(encoding="utf-8")))
    paths = {m for span in spans for m in re.findall(rf"\b(?:{'|'.join(TREES)})/[\w./-]*", span)}
    missing = sorted(p for p in paths if not (PROJECT_ROOT / p.rstrip("/.")).exists())
    assert missing == [], f"{page.name} names paths that do not exist: {missing}"


def test_the_link_check_sees_links() -> None:
    """The check above is only as good as its parsing: it must find the README's links and pictures."""
    links = relative_links(README)
    assert "docs/search-page.png" in links and "docs/architecture.md" in links and "#read-further" in links
    assert "read-further" in anchors(README)
