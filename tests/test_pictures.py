"""Every picture of README.md and docs/ is remade by a command (scripts/make_pictures.py), so none
goes stale: the pages and the list agree, and every listed picture is in the repository."""
from __future__ import annotations

import re

import scripts.make_pictures as pictures
from scripts.make_pictures import PICTURES
from tests.helpers import REPO

#: A Markdown image or link target ending in .png or .gif: ``](path)``.
PICTURE_LINK = re.compile(r"\]\(([^)\s]+\.(?:png|gif))\)")


def shown_pictures() -> dict[str, list[str]]:
    """Each picture shown by README.md or a page of docs/ (as a repository path): the pages showing it."""
    shown: dict[str, list[str]] = {}
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in PICTURE_LINK.findall(page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve().relative_to(REPO).as_posix()
            shown.setdefault(path, []).append(page.name)
    return shown


def test_every_shown_picture_is_made_by_a_listed_command():
    listed = {p.path for p in PICTURES}
    unlisted = {path: pages for path, pages in shown_pictures().items() if path not in listed}
    assert not unlisted, f"pictures shown but made by no command in scripts/make_pictures.py: {unlisted}"


def test_every_listed_picture_is_shown_and_present():
    shown = shown_pictures()
    assert [p.path for p in PICTURES if p.path not in shown] == []
    assert [p.path for p in PICTURES if not (REPO / p.path).is_file()] == []


def test_the_link_pattern_finds_pictures_and_skips_other_links():
    text = "![a](docs/a.png) [b](docs/b.md) ![c](c.gif) [d](https://x.org/d.png)"
    assert PICTURE_LINK.findall(text) == ["docs/a.png", "c.gif", "https://x.org/d.png"]


def test_a_picture_command_gets_its_environment_and_its_output_is_copied_into_place(tmp_path, monkeypatch):
    """``Picture.env`` reaches the command, formatted with the run folder (how the browser test is
    told where to write the app's screenshot), and the file it names is copied to the picture's path."""
    monkeypatch.setattr(pictures, "REPO", tmp_path)
    picture = pictures.Picture("docs/shot.png", ("-c", "import os, pathlib; p = pathlib.Path(os.environ['SHOT']); "
                                                 "p.parent.mkdir(parents=True); p.write_bytes(b'png')"),
                               "shot.png", env=(("SHOT", "{run}/shot.png"),))
    (tmp_path / "docs").mkdir()
    pictures.make(picture, tmp_path / "work")
    assert (tmp_path / "docs" / "shot.png").read_bytes() == b"png"
