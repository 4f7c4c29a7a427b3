"""The README is a front door and the docs stay true to the tree: the README is small, keeps the two
set-up commands CI runs, and links every page under docs/; every relative link and heading anchor in
the README and the docs leads somewhere; every repository path they name in backticks exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 8192  # bytes: a front door, not a manual
SET_UP_COMMANDS = (
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[embedded]' && orders-local",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]' && python -m pytest",
)
# Folders of the repository whose paths the docs name; other backticked text with a slash (URLs,
# Redis keys, folders outside the checkout) is not a repository path.
TREE_ROOTS = (
    "orders/",
    "write_service/",
    "read_service/",
    "sync_worker/",
    "orders_bench/",
    "tests/",
    "scripts/",
    "protos/",
    "deploy/",
    "clients/",
    "docs/",
    "benchmark-runs/",
    ".ci/",
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"`([\w./-]+/[\w./-]*)(?::\w+)?`")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def without_code_blocks(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", without_code_blocks(page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def test_readme_is_a_front_door() -> None:
    """Small enough to read at once, with both set-up commands exactly as CI runs them."""
    text = README.read_text()

    assert len(text.encode()) <= README_LIMIT
    for command in SET_UP_COMMANDS:
        assert f"\n{command}\n" in text


def test_readme_links_every_doc() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in LINK.findall(README.read_text())}

    assert [page_id(doc) for doc in DOCS if doc.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_and_anchors_resolve(page: Path) -> None:
    broken = []
    for target in LINK.findall(without_code_blocks(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)

    assert broken == []


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_named_repository_paths_exist(page: Path) -> None:
    named = {path for path in CODE_PATH.findall(page.read_text()) if path.startswith(TREE_ROOTS)}

    assert sorted(path for path in named if not (ROOT / path).exists()) == []
