"""The original's pickled boundaries: converted without running their code."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import yaml
from sklearn.svm import SVC

from scripts.boundary_tools import main as tools_main
from tests.helpers import tiny_config
from utils.errors import UserError
from utils.io.sav_import import read_sav


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _svc(dim: int, seed: int = 0) -> SVC:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(1, 1, (20, dim)), rng.normal(-1, 1, (20, dim))])
    return SVC(kernel="linear").fit(x, np.array([1] * 20 + [0] * 20))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_genuine_sav_converts_to_the_unit_normal(tmp_path, protocol):
    svm = _svc(16)
    sav = tmp_path / "b.sav"
    sav.write_bytes(pickle.dumps(svm, protocol=protocol))
    coef, intercept = read_sav(sav)
    np.testing.assert_allclose(coef, svm.coef_.reshape(-1))
    assert intercept == pytest.approx(float(svm.intercept_[0]))


def test_import_sav_and_export_npy_through_the_tool(tmp_path, capsys):
    cfg = tmp_path / "tiny.yml"
    cfg.write_text(yaml.safe_dump(tiny_config("ddpm")))
    svm = _svc(32 * 8 * 8)
    sav = tmp_path / "smile_h.sav"
    sav.write_bytes(pickle.dumps(svm, protocol=2))
    out = tmp_path / "smile_h.npz"
    assert tools_main(["import-sav", str(sav), "--space", "h", "--config", str(cfg), "--t_0", "300",
                       "--n_inv_step", "4", "--attribute", "smile", "--out", str(out)]) == 0
    with np.load(out, allow_pickle=False) as data:
        expected = svm.coef_.reshape(-1) / np.linalg.norm(svm.coef_)
        np.testing.assert_allclose(data["normal"], expected, rtol=1e-5, atol=1e-7)
        assert str(data["space"]) == "h" and tuple(data["shape"]) == (32, 8, 8)
    npy = tmp_path / "smile_h.npy"
    assert tools_main(["export-npy", str(out), str(npy)]) == 0
    arr = np.load(npy, allow_pickle=False)
    assert arr.shape == (1, 32 * 8 * 8) and arr.dtype == np.float32
    np.testing.assert_allclose(arr[0], expected, rtol=1e-5, atol=1e-7)
    # a size that does not fit the model is refused
    assert tools_main(["import-sav", str(sav), "--space", "z", "--config", str(cfg), "--t_0", "300",
                       "--n_inv_step", "4", "--out", str(tmp_path / "z.npz")]) == 1
    assert "coefficients" in capsys.readouterr().err
    assert not (tmp_path / "z.npz").exists()


@pytest.mark.parametrize("wrap", [lambda p: p, lambda p: {"svm": p}, lambda p: [_svc(4), p]])
def test_malicious_sav_is_refused_and_its_payload_never_runs(tmp_path, wrap, capsys):
    marker = tmp_path / "pwned"
    sav = tmp_path / "evil.sav"
    sav.write_bytes(pickle.dumps(wrap(_Payload(marker))))
    with pytest.raises(UserError, match="refusing to load 'posix.system'|refusing to load 'os.system'"):
        read_sav(sav)
    assert not marker.exists(), "the pickle's payload ran"
    assert tools_main(["export-npy", str(sav), str(tmp_path / "x.npy")]) == 1
    assert not marker.exists()


def test_garbage_and_non_svc_pickles_are_refused(tmp_path):
    garbage = tmp_path / "garbage.sav"
    garbage.write_bytes(b"\x80\x04not a pickle at all")
    with pytest.raises(UserError, match="not a readable pickled SVC"):
        read_sav(garbage)
    plain = tmp_path / "array.sav"
    plain.write_bytes(pickle.dumps(np.zeros(3)))
    with pytest.raises(UserError, match="linear SVC"):
        read_sav(plain)


def test_random_control_keeps_each_header_and_draws_a_seeded_unit_normal(tmp_path, capsys):
    """random-control: the same files and headers, each normal a unit vector drawn from the seed
    (nearly orthogonal to the attribute's in 2,048 dimensions), intercept 0; an existing file is
    kept unless --overwrite, and a folder without boundaries is one line."""
    from utils.io.boundary_files import load_boundary

    cfg = tmp_path / "tiny.yml"
    cfg.write_text(yaml.safe_dump(tiny_config("ddpm")))
    src = tmp_path / "bd"
    src.mkdir()
    for name in ("smile", "hat"):
        sav = tmp_path / f"{name}.sav"
        sav.write_bytes(pickle.dumps(_svc(32 * 8 * 8), protocol=2))
        assert tools_main(["import-sav", str(sav), "--space", "h", "--config", str(cfg), "--t_0", "300",
                           "--n_inv_step", "4", "--attribute", name, "--out", str(src / f"tiny_{name}_t300_h.npz")]) == 0
    outs = {seed: tmp_path / f"control{seed}" for seed in (0, 1)}
    for seed, out in outs.items():
        assert tools_main(["random-control", str(src), str(out), "--seed", str(seed)]) == 0
    normals = {}
    for original in sorted(src.glob("*.npz")):
        before = load_boundary(original)
        after, other = (load_boundary(outs[s] / original.name) for s in (0, 1))
        assert (after.attribute, after.space, after.t_0, after.shape, after.config_name) == \
               (before.attribute, before.space, before.t_0, before.shape, before.config_name)
        assert abs(np.linalg.norm(after.normal.astype(np.float64)) - 1) < 1e-6
        assert after.intercept == 0.0 and after.class_summary is None
        assert abs(float(after.normal @ before.normal)) < 0.15
        assert abs(float(after.normal @ other.normal)) < 0.15
        normals[original.name] = after.normal
    assert abs(float(np.dot(*normals.values()))) < 0.15
    again = tmp_path / "again"
    assert tools_main(["random-control", str(src), str(again), "--seed", "0"]) == 0
    for name, normal in normals.items():
        np.testing.assert_array_equal(load_boundary(again / name).normal, normal)
    assert tools_main(["random-control", str(src), str(again)]) == 1
    assert "exists" in capsys.readouterr().err
    partial = tmp_path / "partial"  # only the last file there: refused before the first is written
    partial.mkdir()
    last = sorted(src.glob("*.npz"))[-1].name
    (partial / last).write_bytes(b"kept")
    assert tools_main(["random-control", str(src), str(partial)]) == 1
    assert "exists" in capsys.readouterr().err
    assert sorted(f.name for f in partial.iterdir()) == [last] and (partial / last).read_bytes() == b"kept"
    (tmp_path / "empty").mkdir()
    assert tools_main(["random-control", str(tmp_path / "empty"), str(tmp_path / "x")]) == 1
    assert "no boundary file" in capsys.readouterr().err
