"""Measure boundary edits on a data set's held-out images, through the editing engine.

    python -m scripts.evaluate_edits                         # the digits (configs/digits.yml)
    python -m scripts.evaluate_edits --attribute thick --ablations --quality \\
        --json docs/digits_eval.json --table docs/digits_eval.md --grid docs/digits_thick_edits.png
    python -m scripts.evaluate_edits --joint                 # thick and slant together (issue 22)
    python -m scripts.evaluate_edits --config faces.yml --quality --entanglement --ablations   # the faces

The evaluation is chosen by the config's ``data.dataset`` (``--config``, default digits.yml): each
data set has its module in ``scripts/evaluation/`` (``EVALUATIONS``), which parses its own flags
(``--help`` lists them) and measures its own attributes; every edit goes through ``runners.engine``
(``scripts/evaluation/common.py``). What the digits evaluation measures: ``scripts/evaluation/digits.py``;
the faces: ``scripts/evaluation/faces.py``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from runners.engine import UserError, load_config

#: data.dataset -> the module of its evaluation (it provides ``main(argv) -> int``).
EVALUATIONS = {
    "digits": "scripts.evaluation.digits",
    "faces": "scripts.evaluation.faces",  # the synthetic faces (configs/faces.yml)
}


def evaluation_of(config_name: str):
    """The evaluation module of the config's data set; UserError naming those there are."""
    dataset = load_config(config_name).data.dataset
    name = EVALUATIONS.get(str(dataset).lower())
    if name is None:
        raise UserError(f"no evaluation for data set {dataset!r} (config {config_name}); evaluations exist for: "
                        f"{', '.join(EVALUATIONS)}")
    return importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the evaluation of ``--config``'s data set; a UserError or OSError is one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config", default="digits.yml")
    config_name = first.parse_known_args(argv)[0].config
    try:
        return evaluation_of(config_name).main(argv)
    except (UserError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
