"""The README's and the docs' code cannot drift: every ```python block of a page runs, in order,
in one namespace.

Each page (README.md and every docs/*.md) runs in its own subprocess (so its logging
settings, threads and connections stay out of this process) with a temporary directory as
the working directory, against a SQLite file there. A traceback points at the page's line
that failed. Blocks that are not meant to run use another fence (bash, console, text, sql,
cron, ...).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import better_agent_peewee as root
from better_agent_peewee import errors, followers, schema

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Every page whose python blocks run: the README, then the docs.
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\S*)[ \t]*$")
#: Fences that are shown, not run. A new kind must be added here on purpose.
NOT_RUN = {"bash", "console", "text", "sql", "cron", "ini", "typescript", "ts", "json"}
#: What a page's blocks print, as the page says they do.
PRINTS: Dict[str, List[str]] = {
    "README.md": ["1 RUN_STARTED\n2 TEXT_MESSAGE_CONTENT\n"]
    + [f"{name} - " for name in ("UnsupportedTableError", "QueryError", "RecordError", "NotFoundError")],
    "operations.md": ["pruned 0 runs, 0 streams, 0 events older than",
                      "would prune 1 threads, 1 messages idle since ",
                      "streams - the streams domain is not configured in this storage "
                      "(storage.streams.resume"],
    "runs.md": ["['RUN_STARTED', 'TEXT_MESSAGE_START', 'TEXT_MESSAGE_CONTENT', 'TEXT_MESSAGE_CONTENT', "
                "'TEXT_MESSAGE_END', 'RUN_FINISHED']",
                "runs: run 'run-1' already exists (completed); nothing was written.",
                "{'step': 2, 'total': 4}\n",
                "['RUN_STARTED', 'RUN_ERROR']\nruns: cannot abort run 'run-6': it does not exist\n"],
}

RUNNER = """
import sys
source, blocks = sys.argv[1], eval(sys.stdin.read())
namespace = {"__name__": "__readme__"}
for line, code in blocks:
    # Pad with newlines so that tracebacks show the page's own line numbers.
    exec(compile("\\n" * line + code, source, "exec"), namespace)
db = namespace.get("db")
if db is not None:
    db.close()
"""


def blocks(text: str) -> List[Tuple[str, int, str]]:
    """(language, line index of the first code line, code) of every fenced block."""
    found: List[Tuple[str, int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i + 1
        end = start
        while end < len(lines) and lines[end].rstrip() != "```":
            end += 1
        assert end < len(lines), f"line {i + 1}: unclosed code block"
        found.append((match.group(1), start, "\n".join(lines[start:end]) + "\n"))
        i = end + 1
    return found


def _python(page: Path) -> List[Tuple[int, str]]:
    return [(line, source) for lang, line, source in blocks(page.read_text(encoding="utf-8"))
            if lang == "python"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_fences_are_known(page: Path) -> None:
    kinds = {lang for lang, _, _ in blocks(page.read_text(encoding="utf-8"))}
    unknown = kinds - NOT_RUN - {"python"}
    assert not unknown, \
        f"{page.name}: code blocks with fences neither run nor listed as shown-only: {unknown}"


@pytest.mark.sqlite
@pytest.mark.parametrize("page", [p for p in PAGES if _python(p)], ids=lambda page: page.name)
def test_python_blocks_run(page: Path, tmp_path: Path) -> None:
    code = _python(page)
    result = subprocess.run([sys.executable, "-c", RUNNER, str(page)], input=repr(code), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"a {page.name} block failed:\n{result.stderr}"
    for expected in PRINTS.get(page.name, []):  # what the blocks print is what the page says
        assert expected in result.stdout, f"{page.name}: {expected!r} not printed:\n{result.stdout}"


def test_the_readme_and_the_docs_keep_their_examples() -> None:
    assert len(_python(README)) >= 2, "the README lost its examples"
    for name in ("contract.md", "usage.md", "operations.md"):
        assert _python(ROOT / "docs" / name), f"docs/{name} lost its examples"


def test_the_readme_is_a_front_page() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first = blocks(text)[0]
    assert first[0] == "bash"
    assert "pip install . && python examples/quickstart.py" in first[2]
    assert "bash scripts/test.sh" in first[2]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in ci


def test_the_docs_import_the_package_from_its_root_only() -> None:
    """Every page's code imports from ``better_agent_peewee`` itself, never from a module of it:
    the root exports what the docs use, and a module can move without breaking a page."""
    found = [f"{page.name}:{line + n + 1}: {text.strip()}" for page in PAGES for line, source in _python(page)
             for n, text in enumerate(source.splitlines())
             if re.match(r"\s*(from|import)\s+better_agent_peewee\.", text)]
    assert not found, f"pages importing from inside the package: {found}"


def test_the_root_exports_its_names_and_deprecates_two() -> None:
    assert set(root.__all__) <= set(dir(root)) and len(root.__all__) == len(set(root.__all__))
    assert {"Follower", "HEARTBEAT", "event_stream", "peewee_storage"} <= set(root.__all__)
    assert root.Follower is followers.Follower
    for name, home in (("SchemaError", errors), ("drop_performance_indexes", schema)):
        assert name not in root.__all__
        with pytest.warns(DeprecationWarning, match=name):
            value = getattr(root, name)
        assert value is getattr(home, name)
    with pytest.raises(AttributeError, match="no_such_name"):
        root.no_such_name  # noqa: B018
