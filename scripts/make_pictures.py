"""Remake the pictures of README.md and docs/ from the commands that make them, so none goes stale.

    .venv/bin/python -m scripts.make_pictures              # every picture but the slow ones
    .venv/bin/python -m scripts.make_pictures --slow       # also those of the evaluations (an hour or more)
    .venv/bin/python -m scripts.make_pictures docs/faces_demo_grid.png ...   # only these
    .venv/bin/python -m scripts.make_pictures --list       # what makes each picture

Every picture that README.md or a page of docs/ shows is listed in ``PICTURES`` with the command
that writes it and the file it writes (``tests/test_pictures.py`` checks that the list and the
pages agree). Each command runs from the repository root with this interpreter, into a fresh
temporary run folder (``{run}``), with an empty latent cache; the picture is then copied into
place. The pages print each picture's command beside it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Picture:
    """One picture: ``command`` (arguments of this interpreter; ``{run}`` is the run folder) writes
    ``output`` (relative to the run folder); ``slow`` pictures come from evaluations and are remade
    with ``--slow`` only; ``env`` adds variables to the command's environment (``{run}`` as in the
    command)."""
    path: str
    command: tuple[str, ...]
    output: str
    slow: bool = False
    env: tuple[tuple[str, str], ...] = ()


DIGITS = ("--config", "digits.yml")
FACES = ("--config", "faces.yml")
PICTURES = [
    # the faces model (the default)
    Picture("docs/faces_demo_grid.png",
            ("main.py", "--edit_image_boundary", "--edit_attr", "Smiling", "--img_path", "imgs/face_example.png",
             "--exp", "{run}"), "edit/grid.png"),
    Picture("docs/faces_two_attribute_grid.png",
            ("main.py", "--edit_image_boundary", "--edit", "Smiling=auto", "--edit", "Eyeglasses=auto",
             "--edit_img_number", "4", "--grid", "--img_path", "imgs/face_example.png", "--exp", "{run}"),
            "edit/grid.png"),
    Picture("docs/faces_region.png",
            ("-m", "scripts.evaluation.faces_region", "--n_loco", "3", "--picture", "{run}/region.png"), "region.png", slow=True),
    Picture("docs/faces_parts/region_pairs_10.png",
            ("-m", "scripts.evaluation.faces_region", "--n_loco", "0", "--target", "10", "--boundary_dir",
             "boundary/faces_parts", "--picture", "{run}/region.png"), "region.png", slow=True),
    Picture("docs/faces_eval_grid.png",
            ("-m", "scripts.evaluate_edits", "--config", "faces.yml", "--n_test", "200", "--per_side", "10", "--k", "3",
             "--grid", "{run}/grid.png"), "grid.png", slow=True),
    Picture("docs/faces_aligned/region_grid_10.png",
            ("-m", "scripts.evaluate_edits", "--config", "faces.yml", "--n_test", "200", "--per_side", "10", "--k", "3",
             "--region_parts", "--grid_faces", "1", "--grid", "{run}/grid.png"), "grid.png", slow=True),
    Picture("docs/faces_aligned/discovery_sheet.png",
            ("main.py", "--discover", "--n_discover_img", "64", "--sheet_images", "2", "--boundary_dir", "{run}/found",
             "--exp", "{run}"), "discover/contact_sheet.png", slow=True),
    Picture("docs/faces_data.png",
            ("-m", "scripts.evaluation.faces_pictures", "data", "--out", "{run}/data.png"), "data.png"),
    Picture("docs/faces_samples.png",
            ("-m", "scripts.evaluation.faces_pictures", "samples", "--out", "{run}/samples.png"), "samples.png"),
    Picture("docs/faces_atlas.png",
            ("-m", "scripts.boundary_tools", "atlas", "boundary", "--config_name", "faces", "--out", "{run}"),
            "atlas.png"),
    # the digits model
    Picture("docs/demo_grid.png",
            ("main.py", *DIGITS, "--edit_image_boundary", "--edit_attr", "thick", "--img_path",
             "imgs/digit_example.png", "--exp", "{run}"), "edit/grid.png"),
    Picture("docs/digits_edit_grid.png",
            ("main.py", *DIGITS, "--edit_image_boundary", "--edit_attr", "thick", "--img_path",
             "imgs/digit_example.png", "--exp", "{run}", "--gif"), "edit/grid.png"),
    Picture("docs/digits_edit.gif",
            ("main.py", *DIGITS, "--edit_image_boundary", "--edit_attr", "thick", "--img_path",
             "imgs/digit_example.png", "--exp", "{run}", "--gif"), "edit/edits.gif"),
    Picture("docs/digits_two_attribute_grid.png",
            ("main.py", *DIGITS, "--edit_image_boundary", "--edit", "thick=auto", "--edit", "slant=auto",
             "--edit_img_number", "4", "--grid", "--img_path", "imgs/digit_example.png", "--exp", "{run}"),
            "edit/grid.png"),
    Picture("docs/digits_thick_slant_held.png",
            ("main.py", *DIGITS, "--edit_image_boundary", "--edit_attr", "thick", "--condition_attr", "slant",
             "--img_path", "imgs/digit_example.png", "--exp", "{run}"), "edit/grid.png"),
    Picture("docs/digits_atlas.png",
            ("-m", "scripts.boundary_tools", "atlas", "boundary", "--config_name", "digits", "--t_0", "200", "--out",
             "{run}"), "atlas.png"),
    Picture("docs/digits_boundary_report.png",
            ("main.py", *DIGITS, "--boundary_search", "--edit_attr", "thick", "--t_0", "200", "--n_inv_step", "20",
             "--n_train_img", "64", "--n_test_img", "32", "--exp", "{run}", "--boundary_dir", "{run}/boundary"),
            "boundary_search/report.png"),
    Picture("docs/digits_radius.png",
            ("main.py", *DIGITS, "--radius", "--data_dir", "data/digits/images/test", "--n_test_img", "32",
             "--bs_test", "32", "--radius_step", "10", "--exp", "{run}"), "radius/radius.png"),
    Picture("docs/digits_samples.png",
            ("-m", "scripts.evaluate_edits", "--attribute", "thick", "--n_test", "10", "--k", "3", "--quality",
             "--samples_png", "{run}/samples.png"), "samples.png", slow=True),
    Picture("docs/digits_thick_edits.png",
            ("-m", "scripts.evaluate_edits", "--attribute", "thick", "--n_test", "0", "--grid", "{run}/edits.png"),
            "edits.png", slow=True),
    Picture("docs/digits_three_vs_eight_edits.png",
            ("-m", "scripts.evaluate_edits", "--attribute", "three_vs_eight", "--flip", "3", "8", "--n_test", "0",
             "--start_distance", "-6", "--end_distance", "6", "--grid", "{run}/edits.png"), "edits.png", slow=True),
    # the web app: its browser test writes the screenshot where BOUNDARYDIFFUSION_SCREENSHOT says
    Picture("docs/app_screenshot.png",
            ("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_app_browser.py"), "app_screenshot.png",
            slow=True, env=(("BOUNDARYDIFFUSION_SCREENSHOT", "{run}/app_screenshot.png"),)),
]


def make(picture: Picture, work: Path) -> float:
    """Run the picture's command into a run folder under ``work`` and copy its output into place;
    returns the seconds it took. SystemExit naming the picture when the command fails."""
    run = work / Path(picture.path).stem
    argv = [sys.executable, *(a.format(run=run) for a in picture.command)]
    if argv[1] == "main.py":
        argv += ["--cache_dir", str(work / "cache"), "--verbose", "warning"]
    env = {**os.environ, **{name: value.format(run=run) for name, value in picture.env}}
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{picture.path}: {' '.join(argv[1:])} failed: {(done.stderr or done.stdout).strip()[-400:]}")
    shutil.copyfile(run / picture.output, REPO / picture.path)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("only", nargs="*", help="pictures to remake (paths as listed; default: all)")
    parser.add_argument("--slow", action="store_true", help="also the pictures of the evaluations and the app")
    parser.add_argument("--list", action="store_true", help="print each picture's command and stop")
    args = parser.parse_args(argv)
    chosen = [p for p in PICTURES if (p.path in args.only if args.only else (args.slow or not p.slow))]
    unknown = set(args.only) - {p.path for p in PICTURES}
    if unknown:
        parser.error(f"not a listed picture: {', '.join(sorted(unknown))}")
    if args.list:
        for p in chosen:
            print(f"{p.path}: python {' '.join(p.command)}  ->  {p.output}{' (slow)' if p.slow else ''}")
        return 0
    with tempfile.TemporaryDirectory(prefix="pictures-") as work:
        for picture in chosen:
            print(f"{picture.path}: {make(picture, Path(work)):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
