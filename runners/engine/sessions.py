"""What a long-running front end (the web app, ``python main.py --serve``) needs of the engine besides
its edits: a private working folder that goes with the process.

    folder = server_folder("boundarydiffusion-app")   # <tmp>/.partial-boundarydiffusion-app-<pid>-...
    ...
    shutil.rmtree(folder)                               # on a clean stop

A folder left by a server killed with SIGKILL (or a power cut) is removed by the next start, once
its process is gone: the same rule as the run folders (``utils.io.files``), so only folders this
tool made, with their marker, are ever removed.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from utils.io.files import new_partial_folder, remove_stale_partials


def server_folder(name: str, parent: Path | None = None) -> Path:
    """A fresh hidden folder ``<parent>/.partial-<name>-<pid>-<start>-<random>`` (``parent``: the
    system's temporary folder), after removing those of processes that are gone."""
    parent = Path(parent or tempfile.gettempdir())
    remove_stale_partials(parent)
    return new_partial_folder(parent, name)
