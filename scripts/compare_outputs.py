"""Check that a change left the tool's outputs bit-identical: run six commands in an older commit
and in this working tree, on this machine, and compare what they wrote.

    python -m scripts.compare_outputs --against 8b843aa

The commands (all on the embedded digits model, offline, about a minute each side):

1. the README's first command (one image edited along ``thick``);
2. a folder edit with ``--save_tensors`` (the bundled example and three test digits);
3. a digits boundary search (its boundary normals, coefficients and intercepts);
4. ``--unconditional`` with a fixed seed;
5. a two-attribute ``--edit ... --grid`` edit (thick and slant, auto ranges, 3 x 3);
6. an edit with an attribute held (``--condition_attr slant``).

Compared: every PNG and GIF byte for byte, every tensor of the older ``tensors.pt`` with ``torch.equal``
(entries the newer one adds are listed, not counted as differences), the
arrays of each boundary file with ``np.array_equal``. Summaries hold timings and paths, so only
their ``distances``, ``seeds`` and ``source_distances`` fields are compared. Each side gets its own
empty latent cache. Exit status 0 when everything matches, 1 otherwise (each difference printed).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "readme": ["--edit_image_boundary", "--edit_attr", "thick", "--img_path", "imgs/digit_example.png"],
    "folder": ["--edit_image_boundary", "--edit_attr", "thick", "--img_path", "{images}", "--save_tensors", "--gif"],
    "search": ["--boundary_search", "--edit_attr", "thick", "--t_0", "200", "--n_inv_step", "20",
               "--n_train_img", "48", "--n_test_img", "16", "--data_dir", "{data}/images/train",
               "--attr_file", "{data}/list_attr_digits.txt", "--boundary_dir", "{exp}/boundary"],
    "unconditional": ["--unconditional", "--edit_attr", "thick", "--seed", "7"],
    "grid": ["--edit_image_boundary", "--edit", "thick=auto", "--edit", "slant=auto", "--edit_img_number", "3", "--grid",
             "--img_path", "imgs/digit_example.png", "--save_tensors"],
    "held": ["--edit_image_boundary", "--edit_attr", "thick", "--condition_attr", "slant", "--img_path",
             "imgs/digit_example.png", "--save_tensors"],
}
#: Every command names the digits model: the default config changed to the faces model after 70c0d5c.
CONFIG = ["--config", "digits.yml"]
SUMMARY_FIELDS = ("distances", "seeds", "source_distances")


def make_inputs(work: Path) -> dict[str, Path]:
    """The digits set (written by data_download.sh) and a folder of four images to edit."""
    subprocess.run(["bash", str(REPO / "data_download.sh"), "digits", str(work)], check=True,
                   stdout=subprocess.DEVNULL)
    data = work / "data" / "digits"
    images = work / "images"
    images.mkdir()
    shutil.copy(REPO / "imgs" / "digit_example.png", images)
    for path in sorted((data / "images" / "test").glob("*.png"))[:3]:
        shutil.copy(path, images)
    return {"data": data, "images": images}


def run_all(tree: Path, out: Path, inputs: dict[str, Path]) -> Path:
    """Run every command with ``tree`` as the working folder, results into ``out``; returns ``out``."""
    for name, command in COMMANDS.items():
        exp = out / name
        fields = {**{k: str(v) for k, v in inputs.items()}, "exp": str(exp)}
        argv = [a.format(**fields) for a in command]
        done = subprocess.run([sys.executable, "main.py", *argv, *CONFIG, "--exp", str(exp), "--cache_dir", str(out / "cache"),
                               "--verbose", "warning"], cwd=tree, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name} failed in {tree}: {done.stderr.strip().splitlines()[-1:]}")
    return out


def differences(old: Path, new: Path) -> list[str]:
    """What differs between two result folders (empty when they match)."""
    found = []
    names = lambda root: {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "cache" not in p.parts}
    old_files, new_files = names(old), names(new)
    for rel in sorted(old_files ^ new_files):
        found.append(f"{rel}: only in {'the older commit' if rel in old_files else 'this tree'}")
    for rel in sorted(old_files & new_files):
        a, b = old / rel, new / rel
        if rel.suffix in (".png", ".gif"):
            same = a.read_bytes() == b.read_bytes()
        elif rel.suffix == ".pt":
            ta, tb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            same = ta.keys() <= tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
            if same and tb.keys() - ta.keys():
                print(f"{rel}: adds {', '.join(sorted(tb.keys() - ta.keys()))}")
        elif rel.suffix == ".npz":
            with np.load(a, allow_pickle=False) as na, np.load(b, allow_pickle=False) as nb:
                same = all(np.array_equal(na[k], nb[k]) for k in ("normal", "coef", "intercept"))
                if not same:  # how far apart: a change of solver moves the last bits
                    gap = max(float(np.abs(na[k].astype(np.float64) - nb[k].astype(np.float64)).max())
                              for k in ("normal", "coef", "intercept"))
                    found.append(f"{rel}: differs, largest difference {gap:.1e} (normal, coef, intercept)")
                    continue
        elif rel.name == "summary.json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            same = all(ja.get(k) == jb.get(k) for k in SUMMARY_FIELDS)
        else:
            continue
        if not same:
            found.append(f"{rel}: differs")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the older commit (any git revision)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the results in this folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="compare-outputs-"))
    old_tree = work / "old"
    try:
        subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), args.against], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        inputs = make_inputs(work)
        results_new = run_all(REPO, work / "new-results", inputs)
        results_old = run_all(old_tree, work / "old-results", inputs)
        found = differences(results_old, results_new)
        checked = sum(1 for p in results_new.rglob("*") if p.is_file() and "cache" not in p.parts)
        for line in found:
            print(line)
        print(f"{checked} files compared against {args.against}: "
              + ("all identical" if not found else f"{len(found)} differ"))
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("old"))
        return 1 if found else 0
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
