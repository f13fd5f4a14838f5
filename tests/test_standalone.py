"""The repository stands on its own: no tracked file reads or cites the developers' reference
folder that sits beside the clone on their machines. The facts the project needs from it live in
``docs/`` and ``tests/data/``."""
from __future__ import annotations

import re
import subprocess

from tests.helpers import REPO

# Spelled in pieces so that this file does not match itself. The plain word "shared" is fine
# ("pieces shared by every network"); a path to the sibling folder is not.
_SIBLING = "sha" + "red"
FORBIDDEN = re.compile(
    r"\.\./" + _SIBLING + r"\b"                                   # the relative path, with / or \
    + r"|\.\.\\" + _SIBLING + r"\b"
    + r"|parents?\s*(\[\s*\d+\s*\])?\s*/\s*['\"]" + _SIBLING + r"['\"]"  # pathlib: parents[2] / "<name>"
    + r"|\b" + _SIBLING + r"/(reference|spec)\b"                  # its subfolders, reference/ and spec/
)
SKIPPED_DIRS = {".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".hypothesis"}


def _repository_files() -> list[str]:
    """The tracked (and untracked, not ignored) files; outside a git checkout, every file of the tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                                cwd=REPO, capture_output=True, check=True).stdout
        return [name for name in listed.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                if p.is_file() and not SKIPPED_DIRS & set(p.relative_to(REPO).parts)]


def test_pattern_catches_the_ways_of_reaching_the_sibling_folder():
    for text in ('open("../' + _SIBLING + '/spec/algorithm.md")', 'REPO.parent / "' + _SIBLING + '" / "reference"',
                 'Path(__file__).parents[2] / "' + _SIBLING + '"', "see " + _SIBLING + "/spec/algorithm.md"):
        assert FORBIDDEN.search(text), text
    for text in ('"""Pieces ' + _SIBLING + ' by every network family."""', "a " + _SIBLING + " CPU", "docs/algorithm.md"):
        assert not FORBIDDEN.search(text), text


def test_no_file_reads_or_cites_the_folder_beside_the_repository():
    files = _repository_files()
    assert "tests/data/state_dict_ddpm_256.tsv" in files and "docs/algorithm.md" in files
    hits = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue  # deleted in the work tree but still tracked
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # images, checkpoints, arrays
        for number, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "files that reach outside the repository:\n" + "\n".join(hits)
