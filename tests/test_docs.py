"""The documentation: every link and image path in README.md and docs/*.md resolves (to a file in the repository, a
heading of a Markdown file, or a URL, which is not fetched), and the README stays short enough to read."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# The README is read in five minutes (issue #32: about 300 lines and 25 KB), with room for the measured tables
# that sections such as Deploy add.
README_MAX_LINES, README_MAX_BYTES = 320, 26_000
TEST_COMMAND = "python3 -m pytest tests -q"  # what .ci/run runs, and what the README tells a newcomer to run

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.M)
_HTML = re.compile(r"<(?:img|a)\s[^>]*?(?:src|href)=\"([^\"]+)\"", re.I)
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The Markdown without fenced code blocks and code spans, where brackets and parentheses are not links."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def link_targets(text: str) -> list[str]:
    """Every link and image target of a Markdown text: inline, reference definitions, and HTML img/a."""
    body = prose(text)
    return [m.group(1) for pattern in (_INLINE, _REFERENCE, _HTML) for m in pattern.finditer(body)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text without Markdown marks, lower case, punctuation dropped, spaces to
    hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file's headings, with GitHub's -1, -2, ... for repeated ones."""
    seen: dict[str, int] = {}
    result = set()
    for match in _HEADING.finditer(_FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def problem(document: Path, target: str) -> str | None:
    """Why ``target``, a link in ``document``, does not resolve; None when it does."""
    if re.match(r"^(https?|mailto):", target):
        return None if re.match(r"^(https?://[^\s/]+\.[^\s]+|mailto:\S+@\S+)$", target) else "not a valid URL"
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
        return "a URL scheme other than http, https or mailto"
    path_part, _, anchor = target.partition("#")
    resolved = (document.parent / path_part).resolve() if path_part else document
    if not resolved.is_relative_to(ROOT):
        return "outside the repository"
    if not resolved.exists():
        return f"no such file: {resolved.relative_to(ROOT)}"
    if anchor:
        if resolved.suffix != ".md" or not resolved.is_file():
            return "an anchor into something that is not a Markdown file"
        if anchor not in anchors(resolved):
            return f"no heading '#{anchor}' in {resolved.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_link_and_image_resolves(document: Path) -> None:
    targets = link_targets(document.read_text(encoding="utf-8"))
    assert targets, f"{document.name}: no links found (the parser is broken?)"
    broken = [f"{target}: {why}" for target in targets if (why := problem(document, target))]
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)


def test_readme_is_short() -> None:
    data = README.read_bytes()
    lines = data.decode("utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES}): move details to docs/"
    assert len(data) <= README_MAX_BYTES, f"README.md has {len(data):,} bytes (at most {README_MAX_BYTES:,})"


def test_readme_gives_the_test_command_ci_runs() -> None:
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    install_and_test = README.read_text(encoding="utf-8").split("## Install and test", 1)[1].split("\n## ", 1)[0]
    assert "pip install -r requirements.txt" in install_and_test and TEST_COMMAND in install_and_test


def test_each_document_says_what_it_answers() -> None:
    for document in DOCUMENTS[1:]:
        text = document.read_text(encoding="utf-8")
        assert text.startswith("# "), f"{document.name}: starts with its title"
        first_paragraph = text.split("\n\n", 2)[1]
        assert first_paragraph.startswith("What this answers:"), f"{document.name}: says first what it answers"


def test_the_checker_finds_broken_links(tmp_path: Path) -> None:
    """The link checker itself: links in code are ignored, broken files and anchors are caught, URLs accepted."""
    text = ("# Title\n\n## A `code` heading (with punctuation)!\n\n[ok](#title) [ok](#a-code-heading-with-punctuation) "
            "![img](README.md) [web](https://example.com/x) `[not](a-link.md)`\n\n```\n[nor](this.md)\n```\n"
            "[bad](missing.md) [bad](#nowhere) [ref]: no-file.png\n")
    document = ROOT / "docs" / "_example.md"  # resolved beside the real documents, never written
    targets = link_targets(text)
    assert targets == ["#title", "#a-code-heading-with-punctuation", "README.md", "https://example.com/x",
                       "missing.md", "#nowhere"]
    assert problem(README, "docs/benchmarks.md#peak-memory") is None
    assert problem(README, "docs/benchmarks.md#no-such-heading") is not None
    assert problem(document, "../README.md") is None
    assert problem(document, "missing.md") is not None
    assert problem(document, "../../outside.md") is not None
    assert slug("A `code` heading (with punctuation)!") == "a-code-heading-with-punctuation"
    assert slug("The default: the bank from fp32 features (`--fp32_bank`)") == \
        "the-default-the-bank-from-fp32-features---fp32_bank"
