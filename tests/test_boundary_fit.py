"""The Gram-matrix SVM fit (utils/core/gram.py, fit_boundary), streaming it from the latent cache,
the distributed panel scheme, class summaries in boundary files and auto_range.

Tolerances are float64's: K comes from BLAS products whose summation order differs from libsvm's
own dot products (and across CPUs), so nothing here is compared bit for bit.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.svm import SVC

from utils.core.boundary import (SUMMARY_STATS, Boundary, class_summary, edit_latents, fit_boundary, fit_boundary_rows,
                                 hyperplane_distances)
from utils.core.gram import (array_reader, gram_matrix, gram_panels, panel_bounds, panel_share, row_dots, solve_dual,
                             symmetrize, weighted_row_sum)
from utils.errors import UserError
from utils.io.boundary_files import BoundaryRecord, auto_range, load_boundary, save_boundary
from utils.io.latent_cache import LatentCache


def _data(seed: int, n: int, d: int, sep: float = 0.3, dtype=np.float32):
    """Overlapping classes (not separable at small d), so that C and the hinge loss matter."""
    rng = np.random.default_rng(seed)
    u = np.random.default_rng(99).normal(size=d)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)) + sep * (2 * y[:, None] - 1) * u / np.linalg.norm(u) * math.sqrt(d) ** 0.5
    return x.astype(dtype), y


def _cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# --------------------------------------------------------------------------- the fit against SVC(kernel='linear')

@pytest.mark.parametrize("n, d, C", [(80, 300, 1.0), (120, 40, 1.0), (120, 40, 0.05), (60, 500, 7.0)])
def test_fit_equals_svc_linear(n, d, C):
    x, y = _data(n + d, n, d)
    xt, yt = _data(n + d + 1, 50, d)
    svc = SVC(kernel="linear", C=C).fit(x.astype(np.float64), y)
    got = fit_boundary(x, y, xt, yt, C=C, device="cpu")
    w = svc.coef_[0]
    # libsvm stops at the same KKT tolerance on the same problem; only K's rounding differs.
    assert _cos(got.coef, w) >= 1 - 1e-9, f"cosine {_cos(got.coef, w)}"
    np.testing.assert_allclose(got.coef, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
    assert abs(got.intercept - svc.intercept_[0]) <= 1e-6 * max(1.0, abs(svc.intercept_[0]))
    assert got.train_acc == svc.score(x.astype(np.float64), y)
    assert got.test_acc == svc.score(xt.astype(np.float64), yt)


def test_fit_in_float64_equals_float32_input_upcast():
    x, y = _data(1, 70, 64)
    a = fit_boundary(x, y)
    b = fit_boundary(x.astype(np.float64), y)
    c = fit_boundary(torch.from_numpy(x).reshape(70, 4, 4, 4), torch.from_numpy(y))
    x16 = torch.from_numpy(x).bfloat16()  # no numpy type: converted by torch
    d, e = fit_boundary(x16, y), fit_boundary(x16.float().numpy(), y)
    np.testing.assert_allclose(d.coef, e.coef, rtol=1e-6, atol=1e-7)
    for other in (b, c):
        np.testing.assert_allclose(other.coef, a.coef, rtol=1e-6, atol=1e-7)
        assert abs(other.intercept - a.intercept) < 1e-9


def test_fit_distances_are_hyperplane_distances():
    x, y = _data(2, 90, 50)
    xt, yt = _data(3, 30, 50)
    fit = fit_boundary_rows(array_reader(x), y, array_reader(xt), yt, panel_rows=16)
    np.testing.assert_allclose(fit.train_distances, hyperplane_distances(x, fit.boundary), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.test_distances, hyperplane_distances(xt, fit.boundary), rtol=1e-5, atol=1e-6)
    assert fit.boundary.test_acc == np.mean((fit.test_distances > 0) == yt)


def test_nonpositive_c_raises():
    x, y = _data(0, 20, 5)
    with pytest.raises(ValueError, match="C must be positive"):
        fit_boundary(x, y, C=0.0)


# --------------------------------------------------------------------------- the Gram matrix in blocks

@pytest.mark.parametrize("panel_rows", [1, 4, 7, 33, 200])
def test_blocked_gram_equals_one_product(panel_rows):
    x, _ = _data(4, 33, 21)
    x64 = x.astype(np.float64)
    K = gram_matrix(array_reader(x)[0], 33, 21, panel_rows=panel_rows)
    np.testing.assert_allclose(K, x64 @ x64.T, rtol=1e-13, atol=1e-12)
    assert np.array_equal(K, K.T), "symmetrize copies the lower triangle exactly"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_panel_shares_sum_to_the_whole_gram(world_size):
    x, _ = _data(5, 50, 12)
    read = array_reader(x)[0]
    n_panels = len(panel_bounds(50, 6))
    shares = [panel_share(n_panels, r, world_size) for r in range(world_size)]
    assert sorted(p for s in shares for p in s) == list(range(n_panels)), shares
    # What the reduce does: each rank's tiles on zeros elsewhere, summed.
    parts = [gram_panels(read, 50, 12, s, panel_rows=6) for s in shares]
    K = symmetrize(np.sum(parts, axis=0), 6)
    np.testing.assert_allclose(K, gram_matrix(read, 50, 12, panel_rows=6), rtol=1e-14, atol=0)


def test_panel_share_balances_the_triangle():
    costs = [sum(p + 1 for p in panel_share(40, r, 4)) for r in range(4)]
    assert max(costs) - min(costs) <= 4, costs


def test_weighted_row_sum_and_row_dots():
    x, _ = _data(6, 30, 17)
    read = array_reader(x)[0]
    coef = np.zeros(30)
    coef[[0, 5, 6, 29]] = [1.5, -2.0, 0.25, 3.0]
    np.testing.assert_allclose(weighted_row_sum(read, coef, 17, block_rows=4), coef @ x.astype(np.float64), rtol=1e-12)
    w = np.arange(17.0)
    np.testing.assert_allclose(row_dots(read, 30, w, block_rows=7), x.astype(np.float64) @ w, rtol=1e-12)


def test_solve_dual_sign_convention():
    x, y = _data(7, 40, 8)
    x64 = x.astype(np.float64)
    dual = solve_dual(x64 @ x64.T, y)
    decision = (x64 @ x64[dual.support].T) @ dual.dual_coef + dual.intercept
    svc = SVC(kernel="linear").fit(x64, y)
    np.testing.assert_allclose(decision, svc.decision_function(x64), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- streaming from the latent cache

def test_fit_streamed_from_the_latent_cache(tmp_path):
    rng = np.random.default_rng(8)
    n, zs, hs = 12, (1, 4, 4), (2, 2, 2)
    y = np.array([0, 1] * 6)
    z = torch.from_numpy(rng.normal(size=(n, *zs)).astype(np.float32)) + torch.from_numpy(y).float()[:, None, None, None]
    h = torch.from_numpy(rng.normal(size=(n, *hs)).astype(np.float32))
    cache = LatentCache(tmp_path, {"model": "test"})
    keys = [f"{i:064x}" for i in range(n)]
    for i, k in enumerate(keys):
        cache.put(k, z[i], h[i])
    read, count, dim = cache.rows(keys, "z", zs)
    assert (count, dim) == (n, 16)
    np.testing.assert_array_equal(read(3, 7), z[3:7].reshape(4, -1).numpy())
    np.testing.assert_array_equal(cache.rows(keys, "h", hs)[0](0, n), h.reshape(n, -1).numpy())
    train = (read, 8, dim)
    test = (lambda a, b: read(8 + a, 8 + b), 4, dim)
    streamed = fit_boundary_rows(train, y[:8], test, y[8:], panel_rows=3)
    direct = fit_boundary(z[:8].numpy(), y[:8], z[8:].numpy(), y[8:])
    np.testing.assert_allclose(streamed.boundary.coef, direct.coef, rtol=1e-6, atol=1e-7)
    assert streamed.boundary.test_acc == direct.test_acc


def test_cache_rows_of_a_vanished_entry_is_a_user_error(tmp_path):
    cache = LatentCache(tmp_path, {"model": "test"})
    read = cache.rows(["ab" * 32], "z", (1, 2, 2))[0]
    with pytest.raises(UserError, match="cannot be read"):
        read(0, 1)


# --------------------------------------------------------------------------- class summaries and auto_range

def test_class_summary_statistics():
    d = np.array([-3.0, -2.0, -1.0, 0.5, 2.0, 4.0, 6.0])
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    s = class_summary(d, y)
    assert s["neg"]["mean"] == pytest.approx(-2.0) and s["pos"]["p50"] == pytest.approx(3.0)
    assert s["neg"]["std"] == pytest.approx(np.std([-3, -2, -1]))
    assert s["pos"]["p95"] == pytest.approx(np.percentile([0.5, 2, 4, 6], 95))
    empty = class_summary(np.array([1.0]), np.array([1]))["neg"]
    assert set(empty) == set(SUMMARY_STATS) and all(math.isnan(v) for v in empty.values())


def _record(**kw) -> BoundaryRecord:
    normal = np.array([0.6, 0.8], dtype=np.float32)
    base = dict(normal=normal, coef=normal * 2, intercept=3.0, shape=(1, 1, 2), space="z", t_0=200, n_inv_step=40,
                attribute="thick")
    return BoundaryRecord(**{**base, **kw})


def _summary(neg_p5: float, pos_p95: float) -> dict:
    stats = {"mean": 0.0, "std": 1.0, "p5": neg_p5, "p50": 0.0, "p95": pos_p95}
    return {split: {"neg": dict(stats), "pos": dict(stats)} for split in ("train", "test")}


def test_class_summary_round_trips_through_the_file(tmp_path):
    summary = _summary(-4.0, 5.5)
    summary["test"]["pos"]["std"] = float("nan")
    path = save_boundary(tmp_path / "b.npz", _record(class_summary=summary))
    with np.load(path) as raw:
        assert int(raw["format_version"]) == 2 and raw["class_summary"].shape == (2, 2, 5)
    loaded = load_boundary(path).class_summary
    assert math.isnan(loaded["test"]["pos"]["std"])
    summary["test"]["pos"]["std"] = loaded["test"]["pos"]["std"] = 0.0
    assert loaded == summary


def test_version_1_file_loads_without_summary(tmp_path):
    r = _record()
    fields = dict(normal=r.normal, coef=r.coef, intercept=np.asarray(r.intercept), shape=np.asarray(r.shape),
                  space=np.asarray("z"), t_0=np.asarray(200), n_inv_step=np.asarray(40), attribute=np.asarray("thick"),
                  format_version=np.asarray(1))
    np.savez(tmp_path / "old.npz", **fields)
    loaded = load_boundary(tmp_path / "old.npz")
    assert loaded.class_summary is None and loaded.intercept == 3.0
    with pytest.raises(UserError, match="no class summary"):
        auto_range(loaded)


def test_newer_format_version_is_refused(tmp_path):
    path = save_boundary(tmp_path / "b.npz", _record())
    with np.load(path) as raw:
        fields = {k: raw[k] for k in raw.files}
    fields["format_version"] = np.asarray(99)
    np.savez(tmp_path / "new.npz", **fields)
    with pytest.raises(UserError, match="newer"):
        load_boundary(tmp_path / "new.npz")


def test_malformed_class_summary_is_refused(tmp_path):
    path = save_boundary(tmp_path / "b.npz", _record())
    with np.load(path) as raw:
        fields = {k: raw[k] for k in raw.files}
    fields["class_summary"] = np.zeros((3, 5))
    np.savez(tmp_path / "bad.npz", **fields)
    with pytest.raises(UserError, match="class_summary"):
        load_boundary(tmp_path / "bad.npz")


def test_auto_range_is_in_projection_units():
    # coef = 2 * (0.6, 0.8): ||w|| = 2, b = 3, so hyperplane distance s = v.n + 1.5 and d = s - 1.5.
    record = _record(class_summary=_summary(-4.0, 5.5))
    assert auto_range(record) == pytest.approx((-5.5, 4.0))
    # An edit to the auto ends puts a latent at the summary's hyperplane distances.
    v = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    edited = edit_latents(v, torch.from_numpy(record.normal), torch.tensor(auto_range(record))).reshape(2, 2).numpy()
    boundary = Boundary(record.normal, record.coef, record.intercept, float("nan"), float("nan"))
    np.testing.assert_allclose(hyperplane_distances(edited, boundary), [-4.0, 5.5], rtol=1e-6)


def test_auto_range_without_a_class_raises():
    summary = _summary(float("nan"), 2.0)
    with pytest.raises(UserError, match="both"):
        auto_range(_record(class_summary=summary))
    with pytest.raises(ValueError, match="split"):
        auto_range(_record(class_summary=_summary(0.0, 1.0)), split="val")
