"""The README's code cannot drift: every ```python block runs, in order, in one namespace.

The blocks run in a subprocess (so their logging settings, threads and connections stay
out of this process) with a temporary directory as the working directory, against a
SQLite file there. A traceback points at the README line that failed. Blocks that are
not meant to run use another fence (bash, console, text, sql, cron, ...).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```(\S*)[ \t]*$")
#: Fences that are shown, not run. A new kind must be added here on purpose.
NOT_RUN = {"bash", "console", "text", "sql", "cron", "ini", "typescript", "ts", "json"}

RUNNER = """
import sys
source, blocks = sys.argv[1], eval(sys.stdin.read())
namespace = {"__name__": "__readme__"}
for line, code in blocks:
    # Pad with newlines so that tracebacks show the README's own line numbers.
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
        assert end < len(lines), f"README.md:{i + 1}: unclosed code block"
        found.append((match.group(1), start, "\n".join(lines[start:end]) + "\n"))
        i = end + 1
    return found


def test_fences_are_known() -> None:
    kinds = {lang for lang, _, _ in blocks(README.read_text(encoding="utf-8"))}
    assert "python" in kinds
    unknown = kinds - NOT_RUN - {"python"}
    assert not unknown, f"README code blocks with fences neither run nor listed as shown-only: {unknown}"


@pytest.mark.sqlite
def test_readme_python_blocks_run(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    code = [(line, source) for lang, line, source in blocks(text) if lang == "python"]
    assert len(code) >= 8, "the README lost its examples"
    result = subprocess.run([sys.executable, "-c", RUNNER, str(README)], input=repr(code), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"a README block failed:\n{result.stderr}"
    out = result.stdout
    # What the blocks print is what the README says they print.
    assert "1 RUN_STARTED\n2 TEXT_MESSAGE_CONTENT\n" in out
    assert "pruned 0 runs, 0 streams, 0 events older than" in out
    for name in ("UnsupportedTableError", "QueryError", "RecordError", "NotFoundError"):
        assert f"{name} - " in out
    assert (tmp_path / "agent.db").exists()


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first = blocks(text)[0]
    assert first[0] == "bash"
    assert "pip install . && python examples/quickstart.py" in first[2]
    assert "bash scripts/test.sh" in first[2]
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash scripts/test.sh" in ci


#: Pages of docs/ whose python blocks run like the README's (each in its own namespace and directory).
DOCS = ["runs.md"]


@pytest.mark.sqlite
@pytest.mark.parametrize("page", DOCS)
def test_docs_python_blocks_run(page: str, tmp_path: Path) -> None:
    path = README.parent / "docs" / page
    found = blocks(path.read_text(encoding="utf-8"))
    assert not {lang for lang, _, _ in found} - NOT_RUN - {"python"}, f"{page}: unknown fences"
    code = [(line, source) for lang, line, source in found if lang == "python"]
    assert code, f"{page} has no python block"
    result = subprocess.run([sys.executable, "-c", RUNNER, str(path)], input=repr(code), cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"a block of docs/{page} failed:\n{result.stderr}"
    if page == "runs.md":  # what the page says its blocks print
        assert "['RUN_STARTED', 'TEXT_MESSAGE_START', 'TEXT_MESSAGE_CONTENT', 'TEXT_MESSAGE_CONTENT', " \
               "'TEXT_MESSAGE_END', 'RUN_FINISHED']" in result.stdout
        assert "runs: run 'run-1' already exists (completed); nothing was written." in result.stdout
