"""Several attributes from one inversion pass (issue 23) and the fit's and attribute file's
hostile cases of issue 26 (items 1, 11, 12 and the minor cases): the core against sklearn's own
linear SVM, the atlas against the written normals, the boundary set written whole or not at all."""
from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from sklearn.svm import SVC

import main as cli
import runners.engine.search as search_module
import utils.core.boundary as core_boundary
from scripts import boundary_tools
from tests.helpers import REPO, assert_one_error_line, write_labelled_set, write_tiny_model
from utils.core.atlas import cosine_matrix, holds, phi_matrix
from utils.core.boundary import MIN_CLASS_COUNT, attribute_rows, fit_attributes, fit_boundary
from utils.core.gram import NotConverged, array_reader, solve_dual
from utils.errors import UserError
from utils.io.atlas import atlas_from_dir, load_atlas, suggested_holds
from utils.io.datasets import read_attr_file
from utils.io.files import StagedFiles


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _labelled(seed: int, n: int, d: int, n_attr: int):
    """Latents (n, d) float32 and labels (n, A) in {-1, 0, 1}: attribute a shifts the latents along
    its own direction, and about a quarter of each column is unlabelled."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 1], size=(n, n_attr))
    labels[rng.random((n, n_attr)) < 0.25] = 0
    directions = rng.normal(size=(n_attr, d))
    x = rng.normal(size=(n, d)) + 0.4 * labels @ directions / math.sqrt(d) * 3
    return x.astype(np.float32), labels


# --------------------------------------------------------------------------- the core

@pytest.mark.parametrize("balance", ["none", "weight", "equal"])
def test_each_attribute_equals_its_own_fit_on_the_same_rows(balance):
    x, labels = _labelled(0, 90, 40, 4)
    xt, lt = _labelled(1, 30, 40, 4)
    fits = fit_attributes(array_reader(x), labels, array_reader(xt), lt, C=0.5, balance=balance, seed=7)
    for a, fit in enumerate(fits):
        rows = attribute_rows(labels[:, a], balance, seed=7)
        np.testing.assert_array_equal(fit.train_rows, rows)
        y = (labels[rows, a] > 0).astype(int)
        # The oracle: sklearn's own linear SVM on those rows alone (float64 latents).
        svc = SVC(kernel="linear", C=0.5, class_weight="balanced" if balance == "weight" else None)
        svc.fit(x[rows].astype(np.float64), y)
        assert _cos(fit.boundary.coef, svc.coef_[0]) >= 1 - 1e-9
        assert abs(fit.boundary.intercept - svc.intercept_[0]) <= 1e-6 * max(1.0, abs(svc.intercept_[0]))
        test_rows = lt[:, a] != 0
        assert fit.boundary.test_acc == svc.score(xt[test_rows].astype(np.float64), (lt[test_rows, a] > 0).astype(int))
        if balance != "weight":  # ... and this code's single-attribute fit on the same rows
            single = fit_boundary(x[rows], y, C=0.5)
            assert _cos(fit.boundary.coef, single.coef) >= 1 - 1e-9
            assert abs(fit.boundary.intercept - single.intercept) <= 1e-6


def test_equal_balance_takes_as_many_of_each_class():
    labels = np.array([1] * 5 + [-1] * 12 + [0] * 3)
    rows = attribute_rows(labels, "equal", seed=3)
    assert (labels[rows] > 0).sum() == 5 and (labels[rows] < 0).sum() == 5
    np.testing.assert_array_equal(rows, attribute_rows(labels, "equal", seed=3))  # seeded


def test_cosines_phi_and_holds_by_hand():
    normals = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, -2.0]])
    np.testing.assert_allclose(cosine_matrix(normals), [[1, 0.6, 0], [0.6, 1, -0.8], [0, -0.8, 1]], atol=1e-15)
    # phi of a = (1, 1, -1, -1) and b = (1, -1, -1, -1): (n11 n00 - n10 n01) / sqrt(n1. n0. n.1 n.0)
    # = (1 * 2 - 1 * 0) / sqrt(2 * 2 * 1 * 3) = 1 / sqrt(3); c is unlabelled on row 0 and constant.
    labels = np.array([[1, 1, 0], [1, -1, 1], [-1, -1, 1], [-1, -1, 1]])
    phi = phi_matrix(labels)
    assert phi[0, 1] == pytest.approx(1 / math.sqrt(3)) and phi[1, 0] == phi[0, 1]
    assert math.isnan(phi[0, 2]) and math.isnan(phi[2, 2])
    cos = {"z": cosine_matrix(normals), "h": np.eye(3)}
    assert holds(cos, ["a", "b", "c"], 0.5) == {"a": ["b"], "b": ["c", "a"], "c": ["b"]}
    assert holds(cos, ["a", "b", "c"], 0.7) == {"a": [], "b": ["c"], "c": ["b"]}


def test_a_fit_that_does_not_converge_stops_at_its_bound():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 16))
    y = rng.integers(0, 2, 40)  # random labels in 16 dimensions: not separable
    with pytest.raises(NotConverged, match="1000 iterations"):
        solve_dual(x @ x.T, y, C=1e6, max_iter=1000)


SOLVE_FOR_EVER = """\
import sys, time, numpy as np
import main
from utils.core.gram import solve_dual
main._install_signal_handlers()
rng = np.random.default_rng(0)
x = rng.normal(size=(60, 16))
y = rng.integers(0, 2, 60)
print("solving", flush=True)
try:
    solve_dual(x @ x.T, y, C=1e9)  # libsvm takes tiny steps at this C: seconds to its bound, for ever without
except main.Interrupted:
    print("interrupted", flush=True)
    sys.exit(143)
sys.exit(0)
"""


def test_sigterm_is_honoured_while_libsvm_runs(tmp_path):
    script = tmp_path / "solve.py"
    script.write_text(SOLVE_FOR_EVER)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "solving"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)  # before the fix: libsvm ran on in the main thread, for ever
    finally:
        proc.kill()
    assert proc.returncode == 143 and "interrupted" in out, (proc.returncode, out, err)


# --------------------------------------------------------------------------- boundary files as a set

def test_staged_files_publish_all_or_none_and_keep_replaced_files(tmp_path, monkeypatch):
    for name in ("a", "b", "c"):
        (tmp_path / name).write_text(f"old {name}")
    staged = StagedFiles()
    for name in ("a", "b", "c"):
        staged.stage(tmp_path / name, lambda tmp, name=name: tmp.write_text(f"new {name}"))
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr("utils.io.files.os.replace", failing_replace)
    with pytest.raises(OSError):
        staged.publish(overwrite=True)
    monkeypatch.setattr("utils.io.files.os.replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary or kept file left
    assert [(tmp_path / n).read_text() for n in "abc"] == ["old a", "old b", "old c"]

    staged = StagedFiles()
    staged.stage(tmp_path / "a", lambda tmp: tmp.write_text("new a"))
    assert staged.publish(overwrite=True) == [tmp_path / "a"]
    assert (tmp_path / "a").read_text() == "new a"
    staged.rollback()  # the run failed after publishing: the old file comes back
    assert (tmp_path / "a").read_text() == "old a" and len(list(tmp_path.iterdir())) == 3


# --------------------------------------------------------------------------- through the command line

N_IMAGES = 48


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """A tiny DDPM and 48 labelled images with four columns: bright_left (every image, the images'
    real attribute), noise_a and noise_b (random, some unlabelled), rare (3 positives: skipped)."""
    root = tmp_path_factory.mktemp("multi")
    cfg, weights, config = write_tiny_model(root, "ddpm", name="tiny_multi", seed=2)
    img_dir, _ = write_labelled_set(root, n=N_IMAGES)
    rng = np.random.default_rng(5)
    rows = []
    for i in range(N_IMAGES):
        noise_a, noise_b = rng.choice([-1, 1]), (-1, 1, 0, -1, 1)[i % 5]
        rows.append(f"{i:06d}.jpg {1 if i % 2 == 0 else -1} {noise_a} {noise_b} {1 if i < 3 else -1}")
    attr = root / "attrs4.txt"
    attr.write_text(f"{N_IMAGES}\nBright_Left noise_a noise_b rare\n" + "\n".join(rows) + "\n")
    common = ["--config", str(cfg), "--model_path", str(weights), "--cache_dir", str(root / "cache"),
              "--data_dir", str(img_dir), "--attr_file", str(attr), "--n_train_img", "36", "--n_test_img", "12",
              "--bs_train", "8"]
    return {"root": root, "common": common, "attr": attr, "images": img_dir}


def _search(multi, exp: Path, bd_dir: Path, *extra: str) -> tuple[int, str]:
    import io
    from contextlib import redirect_stderr

    err = io.StringIO()
    with redirect_stderr(err):
        code = cli.main(["--boundary_search", *multi["common"], "--exp", str(exp), "--boundary_dir", str(bd_dir),
                         *extra])
    return code, err.getvalue()


def _normals(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.npz")):
        with np.load(path) as f:
            out[path.name] = (f["normal"].astype(np.float64), float(f["intercept"]))
    return out


def test_all_writes_every_fitted_attribute_and_an_atlas_of_its_normals(multi, tmp_path):
    code, err = _search(multi, tmp_path / "run", tmp_path / "bd", "--edit_attr", "all")
    assert code == 0, err
    fitted = ["bright_left", "noise_a", "noise_b"]
    assert sorted(p.name for p in (tmp_path / "bd").iterdir()) == sorted(
        f"tiny_multi_{a}_t300_{s}.npz" for a in fitted for s in ("h", "z"))
    run = tmp_path / "run" / "boundary_search"
    atlas = json.loads((run / "atlas.json").read_text())
    assert (run / "atlas.png").stat().st_size > 0
    assert atlas["attributes"] == ["Bright_Left", "noise_a", "noise_b"]
    assert atlas["skipped"]["rare"]["train"]["pos"] + atlas["skipped"]["rare"]["test"]["pos"] == 3
    assert "rare" in err and str(MIN_CLASS_COUNT) in err  # the log names the skipped attribute
    files = _normals(tmp_path / "bd")
    for space in ("z", "h"):
        normals = [files[f"tiny_multi_{a}_t300_{space}.npz"][0] for a in fitted]
        want = [[_cos(u, v) for v in normals] for u in normals]  # from the written files, by hand
        np.testing.assert_allclose(atlas["cosines"][space], want, rtol=0, atol=1e-12)
    # phi over the 48 images: noise_b is (-1, 1, 0, -1, 1) by row mod 5, bright_left +1 on even rows.
    names = ["Bright_Left", "noise_a", "noise_b"]
    rows = [line.split() for line in multi["attr"].read_text().splitlines()[2:]]
    a, b = (np.array([int(r[1 + names.index(n)]) for r in rows]) for n in ("Bright_Left", "noise_b"))
    both = b != 0
    assert atlas["phi"][0][2] == pytest.approx(np.corrcoef(a[both], b[both])[0, 1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_train"] == 36 and summary["n_test"] == 12
    assert summary["attributes"]["noise_b"]["z"]["n_train"] < 36  # only the rows labelled for it
    # The same atlas from the files alone (phi and skipped need the labels).
    rebuilt = atlas_from_dir(tmp_path / "bd")
    assert rebuilt["attributes"] == atlas["attributes"] and rebuilt["cosines"] == atlas["cosines"]
    assert rebuilt["per_attribute"] == atlas["per_attribute"]
    assert boundary_tools.main(["atlas", str(tmp_path / "bd"), "--out", str(tmp_path / "tool")]) == 0
    assert load_atlas(tmp_path / "tool")["cosines"] == atlas["cosines"]
    assert suggested_holds(run, "BRIGHT_LEFT") == atlas["per_attribute"]["Bright_Left"]["holds"]
    with pytest.raises(UserError, match="no attribute 'smiling'"):
        suggested_holds(atlas, "smiling")


def test_an_attribute_labelled_on_every_image_equals_its_single_search(multi, tmp_path):
    """bright_left labels all 40 images, so its single search inverts the same set with the same
    split: the multi-attribute run's boundaries must equal it."""
    assert _search(multi, tmp_path / "one", tmp_path / "bd1", "--edit_attr", "bright_left")[0] == 0
    assert _search(multi, tmp_path / "two", tmp_path / "bd2", "--edit_attr", "Bright_Left,noise_a")[0] == 0
    single, multiple = _normals(tmp_path / "bd1"), _normals(tmp_path / "bd2")
    assert len(single) == 2
    for name, (normal, intercept) in single.items():
        other_normal, other_intercept = multiple[name]
        assert _cos(normal, other_normal) >= 1 - 1e-9
        assert abs(intercept - other_intercept) <= 1e-6
    assert (tmp_path / "one" / "boundary_search" / "report.png").is_file()
    assert not (tmp_path / "one" / "boundary_search" / "atlas.json").exists()


@pytest.mark.parametrize("attributes", ["bright_left", "all"])
def test_a_failure_after_the_files_are_saved_keeps_the_earlier_set_byte_for_byte(multi, tmp_path, monkeypatch,
                                                                                  capsys, attributes):
    """Issue 26 item 1: before, --ni replaced the old files and the failed run's undo then deleted
    the new ones, losing both."""
    bd_dir = tmp_path / "bd"
    assert _search(multi, tmp_path / "first", bd_dir, "--edit_attr", attributes)[0] == 0
    before = {p.name: p.read_bytes() for p in bd_dir.iterdir()}
    real = search_module.write_json

    def fail_on_summary(path, obj):
        if Path(path).name == "summary.json":
            raise OSError(28, "No space left on device")
        return real(path, obj)
    monkeypatch.setattr(search_module, "write_json", fail_on_summary)
    for extra in (["--ni", "--svm_c", "0.5"], ["--svm_c", "0.5"]):
        code = cli.main(["--boundary_search", *multi["common"], "--exp", str(tmp_path / "second"), "--boundary_dir",
                         str(bd_dir), "--edit_attr", attributes, *extra])
        assert_one_error_line(code, capsys.readouterr().err, "No space left")
        assert {p.name: p.read_bytes() for p in bd_dir.iterdir()} == before  # nothing new, nothing hidden left
        assert not (tmp_path / "second").exists() or not any((tmp_path / "second").iterdir())


def test_too_few_images_of_a_class_for_every_attribute_stops_before_inverting(multi, tmp_path, capsys):
    code = cli.main(["--boundary_search", *multi["common"][:6], "--data_dir", str(multi["images"]), "--attr_file",
                     str(multi["attr"]), "--n_train_img", "12", "--n_test_img", "4", "--exp", str(tmp_path / "r"),
                     "--boundary_dir", str(tmp_path / "bd"), "--edit_attr", "rare,noise_a", "--cache_dir",
                     str(tmp_path / "cache")])
    assert_one_error_line(code, capsys.readouterr().err, "no attribute has", str(MIN_CLASS_COUNT))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bd").exists()  # nothing inverted or written


@pytest.mark.parametrize("edit_attr, words", [("noise_a,NOISE_A", ["more than once"]), ("noise_a,", ["empty"]),
                                              ("noise_a,smiling", ["'smiling'", "noise_b"])])
def test_bad_attribute_lists_are_one_line(multi, tmp_path, capsys, edit_attr, words):
    code = cli.main(["--boundary_search", *multi["common"], "--exp", str(tmp_path / "r"), "--boundary_dir",
                     str(tmp_path / "bd"), "--edit_attr", edit_attr])
    assert_one_error_line(code, capsys.readouterr().err, *words)


# --------------------------------------------------------------------------- --svm_c

@pytest.mark.parametrize("value", ["1e-30", "1e30", "1e-7", "2e6"])
def test_extreme_svm_c_is_refused_before_any_work(tmp_path, value):
    """Before: 1e-30 ended with a histogram error from the report, 1e30 never ended."""
    proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--boundary_search", "--edit_attr", "thick",
                           "--svm_c", value, "--exp", str(tmp_path / "r"), "--boundary_dir", str(tmp_path / "bd"),
                           "--cache_dir", str(tmp_path / "c")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr, "--svm_c", "1e-06, 1e+06")
    assert list(tmp_path.iterdir()) == []


def test_a_c_too_small_for_the_latents_names_svm_c_and_writes_nothing(multi, tmp_path, capsys):
    """'rare' has 3 positives among 48: at C 1e-6 every row is a bounded support vector and the
    intercept (-1) puts all of them on the negative side."""
    code, err = _search(multi, tmp_path / "r", tmp_path / "bd", "--edit_attr", "rare", "--svm_c", "1e-6")
    assert_one_error_line(code, err, "--svm_c 1e-06", "raise --svm_c", "one side")
    assert not (tmp_path / "bd").exists() or list((tmp_path / "bd").iterdir()) == []


def test_a_fit_stopped_at_its_iteration_bound_names_svm_c_and_writes_nothing(multi, tmp_path, monkeypatch):
    monkeypatch.setattr(core_boundary, "solve_dual", functools.partial(solve_dual, max_iter=1))
    code, err = _search(multi, tmp_path / "r", tmp_path / "bd", "--edit_attr", "all")
    assert_one_error_line(code, err, "--svm_c", "lower --svm_c", "iterations")
    assert not (tmp_path / "bd").exists() or list((tmp_path / "bd").iterdir()) == []


# --------------------------------------------------------------------------- the attribute file

def _attr(tmp_path, text: str) -> Path:
    path = tmp_path / "attrs.txt"
    path.write_text(text)
    return path


def test_an_image_labelled_twice_differently_is_refused_naming_both_lines(tmp_path):
    path = _attr(tmp_path, "3\nA B\nx.jpg 1 1\ny.jpg 1 -1\nx.jpg 1 -1\n")
    with pytest.raises(UserError) as info:
        read_attr_file(path)
    assert "x.jpg" in str(info.value) and "lines 3 and 5" in str(info.value)
    same = _attr(tmp_path, "2\nA B\nx.jpg 1 1\nx.jpg 1 1\n")  # the same row twice changes nothing
    assert read_attr_file(same)[1]["x.jpg"].tolist() == [1, 1]


@pytest.mark.parametrize("text, words", [
    ("5\nA B\nx.jpg 1 1\ny.jpg 1 -1\n", ["line 1 says 5 images", "2 rows", "cut short"]),
    ("many\nA\nx.jpg 1\n", ["line 1", "number of images"]),
    ("1\nA B a\nx.jpg 1 1 1\n", ["'a' twice", "columns 1 and 3"]),
    ("1\nA\nx.jpg " + "1" * 70000 + "\n", ["line 3", "longer than"]),
])
def test_malformed_attribute_files_are_one_line(tmp_path, text, words):
    with pytest.raises(UserError) as info:
        read_attr_file(_attr(tmp_path, text))
    for word in words:
        assert word in str(info.value), str(info.value)


def test_a_large_attribute_file_is_read_in_a_few_times_its_size(tmp_path):
    """Before: read whole, split into lines and kept as Python objects (5.5 times its size in
    Python's own allocations here, about 30 times in resident memory)."""
    names = [f"attr_{j}" for j in range(40)]
    rng = np.random.default_rng(0)
    values = rng.choice([" 1", "-1"], size=(50_000, 40))
    text = "".join(f"{i:06d}.jpg " + " ".join(row) + "\n" for i, row in enumerate(values))
    path = _attr(tmp_path, f"50000\n{' '.join(names)}\n{text}")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        _, rows = read_attr_file(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(rows) == 50_000 and rows["000007.jpg"].tolist() == [int(v) for v in values[7]]
    assert peak < 2.5 * size, f"peak {peak / size:.1f} x the file's {size} bytes"
