"""Compare the class balancing of ``--balance`` on a finished ``--edit_attr all`` search: for each
attribute and space, the test accuracy and the balanced test accuracy (mean of the two classes'
recalls) of the fit with no balancing, with sklearn's ``class_weight='balanced'`` and with equal
counts per class (a seeded subset of the larger class), from the same cached latents.

    python main.py --boundary_search --edit_attr all --t_0 200 --n_inv_step 10 --n_train_img 300 \\
        --n_test_img 150 --exp runs/all --boundary_dir runs/all/bd
    python -m scripts.compare_balance runs/all/boundary_search
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from models.loading import load_model
    from runners.editor import Editor, ImageReader
    from utils.config import load_config
    from utils.core.boundary import BALANCES, fit_attributes
    from utils.io.datasets import attribute_table
    from utils.io.files import read_json
    from utils.io.latent_cache import entry_rows
    from models.checkpoints import default_cache_dir

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="the boundary_search folder of an --edit_attr all run")
    args = parser.parse_args(argv)
    summary = read_json(args.run / "summary.json", "summary")
    a = summary["arguments"]
    config = load_config(a["config"] + ".yml" if not a["config"].endswith(".yml") else a["config"])
    model = load_model(config, a["model_path"], a["cache_dir"])
    cache = Path(a["cache_dir"] or default_cache_dir()) / "latents"
    editor = Editor(model, a["t_0"], a["n_inv_step"], cache, a["precision"], show_progress=False)
    reader = ImageReader.for_config(config, align_face=False)
    table = attribute_table(a["data_dir"] or config.data.data_dir, a["attr_file"] or config.data.attr_file,
                            list(summary["attributes"]))
    where = {str(p): i for i, p in enumerate(table.paths)}
    train = [where[p] for p in summary["train_images"]]
    test = [where[p] for p in summary["test_images"]]
    keys = [editor.cache.key(reader.read(table.paths[i])) for i in train + test]
    results = {}
    for space in ("z", "h"):
        read = entry_rows(editor.cache, keys, space, editor.shapes[space])
        dim = int(np.prod(editor.shapes[space]))
        n = len(train)
        for balance in BALANCES:
            fits = fit_attributes((read, n, dim), table.labels[train], (lambda s, e: read(n + s, n + e), len(test), dim),
                                  table.labels[test], C=a["svm_c"], balance=balance, seed=a["seed"])
            for k, (name, fit) in enumerate(zip(table.names, fits)):
                y = table.labels[test][fit.test_rows, k] > 0
                predicted = fit.test_distances > 0
                recalls = [float(np.mean(predicted[y == c] == c)) for c in (True, False)]
                results[(name, space, balance)] = (fit.boundary.test_acc, float(np.mean(recalls)))
    print(f"{'attribute':>16} {'space':>5}  " + "  ".join(f"{b + ' acc / bal.':>18}" for b in BALANCES))
    for name in table.names:
        for space in ("z", "h"):
            print(f"{name:>16} {space:>5}  " + "  ".join(
                f"{results[(name, space, b)][0]:>8.3f} / {results[(name, space, b)][1]:.3f}" for b in BALANCES))
    for b in BALANCES:
        mean = np.mean([v[1] for k, v in results.items() if k[2] == b])
        print(f"mean balanced test accuracy, {b}: {mean:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
