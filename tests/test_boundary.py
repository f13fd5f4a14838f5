"""utils/core/boundary.py (fit, edit, project; docs/algorithm.md sections 4, 5, 9) and utils/io/boundary_files.py
(the safe on-disk format)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import pickle
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from utils.core.boundary import Boundary, edit_latents, latent_distance, fit_boundary, project_boundary, split_indices
from utils.errors import UserError
from utils.io.boundary_files import (BoundaryRecord, discover_boundaries, load_boundary, matching_boundaries,
                                      save_boundary)


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    n = rng.normal(size=d)
    return n / np.linalg.norm(n)


# --------------------------------------------------------------------------- edit_latents

@settings(max_examples=30, deadline=None, derandomize=True)
@given(batch=st.integers(1, 3),
       dims=st.lists(st.integers(1, 4), min_size=1, max_size=3),
       distances=st.lists(st.floats(-200, 200, allow_nan=False), min_size=1, max_size=5),
       scale=st.sampled_from([1e-3, 1.0, 50.0]),
       seed=st.integers(0, 2 ** 16))
def test_edit_latents_sets_projection_and_keeps_orthogonal_part(batch, dims, distances, scale, seed):
    rng = np.random.default_rng(seed)
    d = int(np.prod(dims))
    v = torch.from_numpy(rng.normal(size=(batch, *dims)) * scale)
    n = torch.from_numpy(_unit(rng, d))
    dist = torch.tensor(distances, dtype=torch.float64)
    out = edit_latents(v, n, dist)
    assert out.shape == (batch, len(distances), *dims), f"shape {tuple(out.shape)}"
    assert out.dtype == torch.float64
    flat_v = v.reshape(batch, d)
    flat = out.reshape(batch, len(distances), d)
    proj = flat @ n  # (B, K)
    tol = 1e-8 * max(1.0, float(dist.abs().max()), float(flat_v.norm(dim=1).max()))
    err = float((proj - dist[None, :]).abs().max())
    assert err <= tol, f"projections {proj.tolist()} vs distances {distances} (max err {err})"
    ortho_in = flat_v - (flat_v @ n)[:, None] * n
    ortho_out = flat - proj[..., None] * n
    err_o = float((ortho_out - ortho_in[:, None, :]).abs().max())
    assert err_o <= tol, f"orthogonal component changed by {err_o}"


@pytest.mark.parametrize("shape", [(3, 2, 2), (3, 128, 128)])  # 12 values; 49,152 (a threaded reduction)
def test_edit_latents_batch_equals_items_alone(shape):
    # Bit for bit by construction: every step of edit_latents is per row (elementwise float64
    # products, one sum call per row), so a row's result cannot depend on the rows beside it,
    # whatever BLAS or vector unit the CPU has.
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.normal(size=(4, *shape)))
    n = torch.from_numpy(_unit(rng, int(np.prod(shape))))
    dist = torch.linspace(-5, 5, 3, dtype=torch.float64)
    batch = edit_latents(v, n, dist)
    distances = latent_distance(v, n)
    for i in range(4):
        alone = edit_latents(v[i:i + 1], n, dist)
        diff = float((batch[i:i + 1] - alone).abs().max())
        assert diff == 0.0, f"item {i}: max diff {diff}"
        assert latent_distance(v[i:i + 1], n).item() == distances[i].item()


def test_edit_to_own_distance_returns_the_latent_bit_for_bit():
    # By construction: latent_distance and edit_latents take the same row sums of the same unit
    # normal, so the shift is exactly 0 and v + 0 is v.
    rng = np.random.default_rng(3)
    v = torch.from_numpy(rng.normal(size=(2, 5, 7)).astype(np.float32))
    n = torch.from_numpy(rng.normal(size=35).astype(np.float32))  # not unit length on purpose
    for i in range(2):
        out = edit_latents(v[i:i + 1], n, latent_distance(v[i:i + 1], n))
        assert torch.equal(out[0, 0], v[i])


def test_edit_latents_keeps_float32_and_accepts_numpy_normal():
    rng = np.random.default_rng(1)
    v = torch.from_numpy(rng.normal(size=(2, 6)).astype(np.float32))
    n = _unit(rng, 6).astype(np.float32)
    out = edit_latents(v, n, np.array([-1.0, 2.0]))
    assert out.dtype == torch.float32, f"dtype {out.dtype}"
    proj = out.double().reshape(2, 2, 6) @ torch.from_numpy(n).double()
    assert torch.allclose(proj, torch.tensor([[-1.0, 2.0]] * 2, dtype=torch.float64), atol=1e-5), f"{proj.tolist()}"


def test_edit_latents_golden():
    # v = (3, 4), n = (1, 0): v . n = 3; d = (-1, 5) -> (-1, 4) and (5, 4)
    out = edit_latents(torch.tensor([[3.0, 4.0]], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64),
                       torch.tensor([-1.0, 5.0], dtype=torch.float64))
    assert out.tolist() == [[[-1.0, 4.0], [5.0, 4.0]]], f"got {out.tolist()}"


def test_edit_latents_mismatched_normal_raises():
    with pytest.raises(ValueError):
        edit_latents(torch.zeros(2, 3, 2, 2), torch.ones(11) / math.sqrt(11), torch.tensor([0.0]))


# --------------------------------------------------------------------------- fit_boundary

def _blobs(seed: int, n: int, d: int = 5, sep: float = 4.0):
    """n points per class: positives around +sep/2 * u, negatives around -sep/2 * u."""
    rng = np.random.default_rng(seed)
    u = _unit(np.random.default_rng(1234), d)
    pos = rng.normal(size=(n, d)) * 0.5 + sep / 2 * u
    neg = rng.normal(size=(n, d)) * 0.5 - sep / 2 * u
    x = np.concatenate([pos, neg])
    y = np.array([1] * n + [-1] * n)
    return x, y, u


def test_fit_boundary_on_separable_blobs():
    x, y, u = _blobs(0, 20)
    xt, yt, _ = _blobs(1, 30)
    b = fit_boundary(x, y, xt, yt)
    assert isinstance(b, Boundary)
    assert b.normal.dtype == np.float32 and b.normal.shape == (5,), f"{b.normal.dtype} {b.normal.shape}"
    assert abs(float(np.linalg.norm(b.normal.astype(np.float64))) - 1) < 1e-6, f"norm {np.linalg.norm(b.normal)}"
    proj = x @ b.normal
    assert proj[y == 1].mean() > proj[y == -1].mean(), f"pos {proj[y == 1].mean()} neg {proj[y == -1].mean()}"
    assert float(b.normal @ u) > 0.9, f"cos with the true direction {float(b.normal @ u)}"
    assert b.train_acc == 1.0, f"train_acc {b.train_acc}"
    assert b.test_acc >= 0.95, f"test_acc {b.test_acc}"
    np.testing.assert_allclose(b.normal, b.coef / np.linalg.norm(b.coef), atol=1e-6)
    # the hyperplane w.x + b = 0 classifies the training set
    assert np.all(np.sign(x @ b.coef + b.intercept) == y), "coef/intercept do not separate the training set"


def test_fit_boundary_without_test_set_has_nan_test_acc():
    x, y, _ = _blobs(0, 10)
    assert math.isnan(fit_boundary(x, y).test_acc)


def test_fit_boundary_flattens_latents():
    x, y, _ = _blobs(0, 10, d=12)
    flat = fit_boundary(x, y)
    shaped = fit_boundary(x.reshape(-1, 3, 2, 2), y)
    np.testing.assert_allclose(shaped.normal, flat.normal, atol=1e-7)


def test_fit_boundary_label_conventions_agree():
    x, y, _ = _blobs(2, 15)
    pm = fit_boundary(x, y)
    zo = fit_boundary(x, (y > 0).astype(np.int64))
    diff = float(np.abs(pm.normal - zo.normal).max())
    assert diff < 1e-6, f"normals differ by {diff}"
    assert abs(pm.intercept - zo.intercept) < 1e-6


@pytest.mark.parametrize("labels", [[1] * 10, [0] * 10, [-1] * 10])
def test_fit_boundary_single_class_raises(labels):
    x = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(ValueError):
        fit_boundary(x, np.array(labels))


@pytest.mark.parametrize("labels", [[0, 1, 2, 0, 1, 2], [-1, 0, 1, -1, 0, 1], [0, 1, 0, 1, 0, 5]])
def test_fit_boundary_non_binary_labels_raise(labels):
    x = np.random.default_rng(0).normal(size=(6, 4))
    with pytest.raises(ValueError):
        fit_boundary(x, np.array(labels))


# --------------------------------------------------------------------------- split_indices

def test_split_indices_disjoint_sizes_deterministic():
    tr, te = split_indices(20, 12, 5, np.random.default_rng(7))
    assert len(tr) == 12 and len(te) == 5, f"{len(tr)} {len(te)}"
    assert not set(tr.tolist()) & set(te.tolist()), f"overlap {set(tr.tolist()) & set(te.tolist())}"
    assert set(tr.tolist()) | set(te.tolist()) <= set(range(20))
    tr2, te2 = split_indices(20, 12, 5, np.random.default_rng(7))
    assert tr.tolist() == tr2.tolist() and te.tolist() == te2.tolist()
    tr3, _ = split_indices(20, 12, 5, np.random.default_rng(8))
    assert tr.tolist() != tr3.tolist(), "a different seed gave the same split"


def test_split_indices_too_many_raises():
    with pytest.raises(ValueError):
        split_indices(10, 8, 3, np.random.default_rng(0))


# --------------------------------------------------------------------------- project_boundary

@settings(max_examples=25, deadline=None, derandomize=True)
@given(d=st.integers(4, 12), m=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_project_boundary_unit_and_orthogonal(d, m, seed):
    rng = np.random.default_rng(seed)
    p = _unit(rng, d)
    conds = [_unit(rng, d) for _ in range(m)]
    r = project_boundary(p, *conds)
    assert r.shape == (d,)
    assert abs(float(np.linalg.norm(r.astype(np.float64))) - 1) < 1e-6, f"norm {np.linalg.norm(r)}"
    dots = [float(r.astype(np.float64) @ c) for c in conds]
    assert max(abs(v) for v in dots) < 1e-6, f"dots with conditions {dots}"
    assert float(r @ p) > 0, f"the result points away from the primary (cos {float(r @ p)})"


def test_project_boundary_golden():
    # p = (1, 1, 0), c = (1, 0, 0) -> (0, 1, 0)
    r = project_boundary(np.array([1.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(r, [0.0, 1.0, 0.0], atol=1e-7)


def test_project_boundary_without_conditions_normalises():
    np.testing.assert_allclose(project_boundary(np.array([3.0, 4.0])), [0.6, 0.8], atol=1e-7)


def test_project_boundary_primary_in_span_raises():
    rng = np.random.default_rng(3)
    a, b = _unit(rng, 8), _unit(rng, 8)
    with pytest.raises(ValueError):
        project_boundary(0.3 * a - 2.0 * b, a, b)


def test_project_boundary_repeated_condition_changes_nothing():
    # Conditioning on c twice is conditioning on c: the result must be the primary's component
    # orthogonal to c and nothing more (a rank-deficient condition matrix must not remove an
    # extra, arbitrary direction).
    rng = np.random.default_rng(0)
    p, c = _unit(rng, 6), _unit(rng, 6)
    once = project_boundary(p, c)
    twice = project_boundary(p, c, c)
    diff = float(np.abs(once - twice).max())
    assert diff < 1e-6, f"project_boundary(p, c, c) = {twice.tolist()} vs project_boundary(p, c) = {once.tolist()}"


# --------------------------------------------------------------------------- boundary files

SHAPES = {"z": (3, 2, 2), "h": (3, 2, 2)}


def _record(**kw) -> BoundaryRecord:
    rng = np.random.default_rng(5)
    coef = rng.normal(size=12).astype(np.float32)
    fields = dict(normal=(coef / np.linalg.norm(coef)).astype(np.float32), coef=coef, intercept=-0.123456789,
                  shape=(3, 2, 2), space="h", t_0=500, n_inv_step=40, attribute="Smiling", train_acc=0.875,
                  test_acc=0.75, n_train=16, n_test=8, n_pos=9, n_neg=7, config_name="celeba",
                  checkpoint_sha256="ab" * 32)
    fields.update(kw)
    return BoundaryRecord(**fields)


class _Marker:
    """Unpickling this runs ``touch <path>``: any load that executes pickles leaves the marker."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch '{self.path}'",)


def test_save_load_round_trip_every_field(tmp_path):
    rec = _record()
    path = save_boundary(tmp_path / "smile_h", rec)
    assert path == tmp_path / "smile_h.npz", f"saved to {path}"
    back = load_boundary(path)
    for f in dataclasses.fields(BoundaryRecord):
        a, b = getattr(rec, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):  # stored bytes come back as they were: exact
            assert b.dtype == np.float32 and np.array_equal(a, b), f"{f.name}: {b!r} vs {a!r}"
        else:
            assert a == b and type(b) is type(a), f"{f.name}: {b!r} ({type(b).__name__}) vs {a!r} ({type(a).__name__})"


def test_matching_boundaries_filters_by_config_attribute_t0_and_checkpoint(tmp_path):
    other_sha = "cd" * 32
    files = {
        "h_old": _record(), "h_new": _record(), "z": _record(space="z"), "no_sha": _record(space="z", checkpoint_sha256=""),
        "other_ckpt": _record(checkpoint_sha256=other_sha), "other_t0": _record(t_0=300),
        "other_attr": _record(attribute="Eyeglasses"), "other_config": _record(config_name="church"),
    }
    for i, (name, rec) in enumerate(files.items()):
        path = save_boundary(tmp_path / name, rec)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # h_new is newer than h_old
    (tmp_path / "broken.npz").write_bytes(b"not a boundary")

    def names(found):
        return {space: sorted(p.stem for p, _ in hits) for space, hits in found.items()}

    assert names(matching_boundaries(tmp_path, "celeba", "smiling", 500, "ab" * 32)) == {
        "h": ["h_new", "h_old"], "z": ["no_sha", "z"]}
    assert names(matching_boundaries(tmp_path, "celeba", "Smiling", 500, other_sha)) == {
        "h": ["other_ckpt"], "z": ["no_sha"]}
    assert names(matching_boundaries(tmp_path, "celeba"))["h"] == ["h_new", "h_old", "other_attr", "other_ckpt", "other_t0"]
    assert matching_boundaries(tmp_path / "missing", "celeba") == {}


def test_discovery_takes_the_newest_by_save_number_not_by_file_time(tmp_path):
    for i, name in enumerate(["b_z", "b_h", "b_z-1", "b_h-1", "b_h-2"]):
        path = save_boundary(tmp_path / name, _record(space=name[2]))
        os.utime(path, (2_000_000 - i, 2_000_000 - i))  # a checkout's times, older for later saves
    found = discover_boundaries(tmp_path, "celeba", SHAPES, "smiling", 500)
    assert (found.attribute, found.t_0) == ("Smiling", 500)
    assert {s: p.name for s, p in found.paths.items()} == {"z": "b_z-1.npz", "h": "b_h-2.npz"}
    assert discover_boundaries(tmp_path, "celeba", SHAPES, "eyeglasses", 500) is None


@pytest.mark.parametrize("other, words", [
    ({"attribute": "Eyeglasses"}, "several attributes for config celeba: eyeglasses, smiling; choose one with --edit_attr"),
    ({"t_0": 300}, "several t_0 values for config celeba: 300, 500; choose one with --t_0"),
    ({"checkpoint_sha256": "cd" * 32}, "several checkpoints"),
])
def test_discovery_never_pairs_boundaries_of_different_fits(tmp_path, other, words):
    """A z boundary of one attribute (t_0, checkpoint) is never paired with an h of another."""
    save_boundary(tmp_path / "a_z", _record(space="z"))
    save_boundary(tmp_path / "b_h", _record(space="h", **other))
    with pytest.raises(UserError, match=re.escape(words)):
        discover_boundaries(tmp_path, "celeba", SHAPES)


def test_saved_file_loads_without_pickle(tmp_path):
    path = save_boundary(tmp_path / "b.npz", _record())
    with np.load(path, allow_pickle=False) as data:
        dtypes = {name: data[name].dtype for name in data.files}
    assert not any(dt.hasobject for dt in dtypes.values()), f"dtypes {dtypes}"
    assert {"normal", "coef", "intercept", "shape", "space", "t_0", "n_inv_step", "format_version"} <= set(dtypes)


def test_defaults_round_trip_nan_accuracies(tmp_path):
    rec = BoundaryRecord(normal=np.array([0.6, 0.8], np.float32), coef=np.array([1.2, 1.6], np.float32),
                         intercept=0.0, shape=(2,), space="z", t_0=300, n_inv_step=4)
    back = load_boundary(save_boundary(tmp_path / "d.npz", rec))
    assert math.isnan(back.train_acc) and math.isnan(back.test_acc), f"{back.train_acc} {back.test_acc}"
    assert back.attribute == "" and back.checkpoint_sha256 == "" and back.shape == (2,) and back.space == "z"


def _valid_arrays(rec: BoundaryRecord) -> dict:
    arrays = {f.name: np.asarray(getattr(rec, f.name)) for f in dataclasses.fields(rec)}
    arrays["format_version"] = np.asarray(1)
    return arrays


@pytest.mark.parametrize("field", ["attribute", "normal"])
def test_pickled_object_array_is_refused_and_never_unpickled(tmp_path, field):
    marker = tmp_path / "pwned"
    arrays = _valid_arrays(_record())
    arrays[field] = np.array([_Marker(marker)], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **arrays)
    assert not marker.exists()
    with pytest.raises(UserError):
        load_boundary(path)
    assert not marker.exists(), "loading the boundary file executed a pickle"


def test_sav_path_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "smile.sav"
    path.write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(UserError, match="sav"):
        load_boundary(path)
    assert not marker.exists(), "loading the .sav file executed a pickle"


def test_sav_message_names_a_tool_that_exists(tmp_path):
    # the refusal tells the user which command converts a .sav; that command must exist
    path = tmp_path / "smile.sav"
    path.write_bytes(b"\x80\x04N.")
    with pytest.raises(UserError) as info:
        load_boundary(path)
    found = re.search(r"python -m ([\w.]+)", str(info.value))
    assert found, f"message names no command: {info.value}"
    assert importlib.util.find_spec(found.group(1)) is not None, \
        f"the message sends the user to `python -m {found.group(1)}`, which does not exist: {info.value}"


def test_pickle_named_npz_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "smile.npz"
    path.write_bytes(pickle.dumps(_Marker(marker)))
    with pytest.raises(UserError):
        load_boundary(path)
    assert not marker.exists()


def _corrupt_variants(tmp_path):
    good = save_boundary(tmp_path / "good.npz", _record()).read_bytes()
    return {"zero_bytes": b"", "random": bytes(range(256)) * 4, "text": b"not a boundary\n",
            "truncated": good[: len(good) // 2], "header_only": good[:40]}


@pytest.mark.parametrize("kind", ["zero_bytes", "random", "text", "truncated", "header_only"])
def test_corrupt_boundary_file_raises_user_error(tmp_path, kind):
    path = tmp_path / f"{kind}.npz"
    path.write_bytes(_corrupt_variants(tmp_path)[kind])
    with pytest.raises(UserError, match=kind):
        load_boundary(path)


def test_plain_npy_normal_raises_user_error(tmp_path):
    # InterFaceGAN stores boundaries as a bare .npy array; handing one over must be a clean UserError
    path = tmp_path / "interfacegan_boundary.npy"
    np.save(path, np.ones((1, 4), np.float32) / 2)
    with pytest.raises(UserError):
        load_boundary(path)


def test_missing_boundary_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="nothere"):
        load_boundary(tmp_path / "nothere.npz")


def test_normal_not_unit_raises_user_error(tmp_path):
    path = save_boundary(tmp_path / "b.npz", _record(normal=np.ones(12, np.float32)))
    with pytest.raises(UserError, match="unit"):
        load_boundary(path)


def test_shape_not_matching_normal_raises_user_error(tmp_path):
    path = save_boundary(tmp_path / "b.npz", _record(shape=(3, 2, 3)))
    with pytest.raises(UserError):
        load_boundary(path)


def test_missing_field_raises_user_error(tmp_path):
    arrays = _valid_arrays(_record())
    del arrays["space"]
    np.savez(tmp_path / "b.npz", **arrays)
    with pytest.raises(UserError, match="space"):
        load_boundary(tmp_path / "b.npz")


def test_save_leaves_no_temp_files(tmp_path):
    save_boundary(tmp_path / "a.npz", _record())
    save_boundary(tmp_path / "a.npz", _record(t_0=400))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"], f"folder holds {sorted(os.listdir(tmp_path))}"
    assert load_boundary(tmp_path / "a.npz").t_0 == 400


def test_failed_save_keeps_existing_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = save_boundary(tmp_path / "a.npz", _record())
    before = target.read_bytes()

    def broken_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError):
        save_boundary(target, _record(t_0=1))
    assert target.read_bytes() == before, "the earlier boundary file was changed by a failed save"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"], f"folder holds {sorted(os.listdir(tmp_path))}"
    monkeypatch.undo()
    assert load_boundary(target).t_0 == 500


def test_save_unknown_space_raises(tmp_path):
    with pytest.raises(ValueError):
        save_boundary(tmp_path / "b.npz", _record(space="w"))
    assert list(tmp_path.iterdir()) == []


def test_from_boundary_keeps_fit_results():
    x, y, _ = _blobs(0, 10)
    b = fit_boundary(x, y)
    rec = BoundaryRecord.from_boundary(b, shape=(5,), space="z", t_0=500, n_inv_step=40)
    # a copy of float32 arrays and Python floats: exact
    assert rec.intercept == b.intercept and np.array_equal(rec.normal, b.normal) and rec.train_acc == b.train_acc
    assert "normal" not in rec.describe() and rec.describe()["t_0"] == 500
