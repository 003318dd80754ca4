"""The documentation points at files that exist.

* Every relative link in README.md and docs/*.md (markdown ``[text](path)`` and ``<img src="...">``)
  names an existing file or folder; a ``#anchor`` into a markdown file must match one of its headings
  (GitHub's heading ids).
* Every docs page cited as text anywhere in rpc_py/, csrc/, benchmarks/, tests/ and notebooks/ exists.

The suite also runs from a copy of tests/ in a scratch folder next to a copy of README.md, docs/ and a
few other folders, without rpc_py/ (``ci/test_wheel.sh``). The repository root is taken as tests/..;
a category whose folder is absent there is skipped. In a git checkout every link is checked; elsewhere
(that copy, an unpacked sdist) a link is checked only when it points into a folder below the root that
is there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FULL_CHECKOUT = (ROOT / ".git").exists()

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
MD_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
IMG_SRC = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.I)
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
DOCS_CITATION = re.compile(r"(?<![\w/.-])docs/([A-Za-z0-9_-]+\.md)\b")
TEXT_SUFFIXES = {".py", ".c", ".h", ".cu", ".cuh", ".sh", ".md", ".ipynb", ".toml", ".txt", ".cfg", ".json"}


def _doc_files() -> list[Path]:
    files = [ROOT / "README.md"] if (ROOT / "README.md").is_file() else []
    if (ROOT / "docs").is_dir():
        files += sorted((ROOT / "docs").glob("*.md"))
    return files


def _prose(text: str) -> str:
    """The text without fenced code blocks, inline code and HTML comments (links there are not links)."""
    text = FENCE.sub("", text)
    text = HTML_COMMENT.sub("", text)
    return INLINE_CODE.sub("", text)


def _slug(heading: str) -> str:
    """GitHub's id for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(text):
        base = _slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _links(path: Path) -> list[str]:
    text = _prose(path.read_text(encoding="utf-8"))
    return MD_LINK.findall(text) + IMG_SRC.findall(text)


def _is_external(target: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target)) or target.startswith("//")


def test_doc_links_point_at_existing_files():
    files = _doc_files()
    if not files:
        pytest.skip("no README.md or docs/ next to tests/")
    broken, checked = [], 0
    for doc in files:
        for target in _links(doc):
            if _is_external(target):
                continue
            where, _, anchor = target.partition("#")
            dest = (doc.parent / where).resolve() if where else doc
            if not FULL_CHECKOUT and (dest.parent == ROOT or not dest.parent.is_dir()):
                continue  # a partial copy (ci/test_wheel.sh, an sdist): top-level files and folders not copied
            checked += 1
            name = f"{doc.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{name} (no such file)")
            elif anchor and dest.suffix == ".md" and dest.is_file() and anchor not in _anchors(dest):
                broken.append(f"{name} (no heading with that id in {dest.name})")
    assert not broken, "broken links in the documentation:\n  " + "\n  ".join(broken)
    assert checked > 0


def test_readme_keeps_the_setup_commands_and_the_test_command():
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("no README.md next to tests/")
    text = readme.read_text(encoding="utf-8")
    setup = (
        "# 1. the main job, on the loop-trace model shipped inside the package (no download)\n"
        'pip install torch==2.13.0 && pip install -e ".[hf]" && python -m rpc_py\n'
        "# 2. install everything and pass the tests, exactly as CI does\n"
        "bash .ci/run\n"
    )
    assert setup in text
    assert "The test command itself is `python -m pytest -q tests`" in text
    assert len(text.splitlines()) < 250, "README.md should stay under 250 lines: move detail to docs/"


def test_cited_docs_pages_exist():
    if not (ROOT / "docs").is_dir():
        pytest.skip("no docs/ next to tests/")
    folders = [ROOT / name for name in ("rpc_py", "csrc", "benchmarks", "tests", "notebooks")]
    missing, scanned = [], 0
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix not in TEXT_SUFFIXES or "__pycache__" in path.parts:
                continue
            if path.stat().st_size > 4 << 20:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            scanned += 1
            for page in set(DOCS_CITATION.findall(text)):
                if not (ROOT / "docs" / page).is_file():
                    missing.append(f"{path.relative_to(ROOT)} cites docs/{page}")
    assert not missing, "docs pages cited but absent:\n  " + "\n  ".join(sorted(missing))
    assert scanned > 0
