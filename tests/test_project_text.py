"""The project's text describes the software, not how it was made: no working sessions, no issue
numbers, no helpers in the README, docs, recipes, code or bench scripts (docs/research-log.md is history,
dated by commits, and is held to the same words)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `session` alone: a Python name such as subprocess's start_new_session is not prose about the project.
SESSION = re.compile(r"(?<![\w])sessions?(?![\w])", re.IGNORECASE)
ISSUE = re.compile(r"\bissues?\s*#?\s*\d+", re.IGNORECASE)
# `helper` is a fair word for a function in code; in prose it would name who did the work.
HELPER = re.compile(r"\bhelpers?\b", re.IGNORECASE)


def _texts() -> dict[Path, str]:
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "recipes").rglob("*.yaml"),
             *(ROOT / "mendctl").rglob("*.py"), *(ROOT / "backends").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    return {f: f.read_text(encoding="utf-8") for f in files}


def _hits(pattern: re.Pattern, texts: dict[Path, str]) -> list[str]:
    return [f"{f.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for f, text in texts.items() for m in pattern.finditer(text)]


def test_no_text_speaks_of_sessions_or_issue_numbers():
    texts = _texts()
    assert len(texts) > 50
    assert not _hits(SESSION, texts)
    assert not _hits(ISSUE, texts)


def test_no_prose_speaks_of_helpers():
    prose = {f: t for f, t in _texts().items() if f.suffix in (".md", ".yaml")}
    assert not _hits(HELPER, prose)


def test_the_patterns_catch_what_they_are_for():
    assert SESSION.search("as the ninth Session left it") and not SESSION.search("start_new_session=True")
    assert ISSUE.search("(issue 9)") and ISSUE.search("issue #12") and not ISSUE.search("a known issue with BOS")
    assert HELPER.search("the helpers' test runs")
