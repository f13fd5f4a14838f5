"""Directions without labels (utils/core/discovery.py): the Jacobian of x0_hat against closed forms,
finite differences and an exact SVD; PCA against sklearn; naming against brute force; the SVM in a
subspace against sklearn's SVC.

The networks: ``LinearEpsNet`` (eps = A x, so J = (I - sqrt(1 - a_t) A) / sqrt(a_t) is known in
closed form) and the tiny DDPM of tests/helpers.py with PyTorch's default initialisation (seed 0).
The helpers' N(0, 0.1^2) weights give a Jacobian of almost equal singular values (s_2 / s_1 > 0.99
at every t tried), whose top vectors no iteration can single out; the default initialisation has
s_2 / s_1 = 0.906 at t = 600 for the image used here (checked in the test).
"""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.svm import SVC

from models import build_model
from tests.helpers import tiny_config, tiny_net
from utils.core.boundary import hyperplane_distances
from utils.core.diffusion import alpha_bar, ddim_step, make_alphas_cumprod
from utils.core.discovery import (Match, captured_share, edit_linearity, exact_jacobian, fit_within, global_basis,
                                  jacobian_subspace, match_directions, principal_angles, principal_directions,
                                  x0_hat)

torch.set_num_threads(1)

ALPHAS = make_alphas_cumprod(0.0001, 0.02, 1000)
EPS32 = float(np.finfo(np.float32).eps)


def _orthogonal(n: int, seed: int) -> np.ndarray:
    """A random (n, n) orthogonal matrix (QR of a Gaussian one)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return q * np.sign(np.diag(r))


class LinearEpsNet:
    """eps(x, t) = A x for every t: ``net(x, t, h_override=None) -> (out, h)`` with out = A x
    (flattened per image) and h the per-image mean (B, 1, 1, 1). Optionally eps += c x^2."""

    def __init__(self, A: torch.Tensor, shape: tuple[int, ...], quadratic: float = 0.0):
        self.A, self.shape, self.quadratic = A, shape, quadratic

    def __call__(self, x, t, h_override=None):
        flat = x.reshape(len(x), -1)
        out = flat @ self.A.T + self.quadratic * flat ** 2
        return out.reshape(x.shape), flat.mean(dim=1).reshape(-1, 1, 1, 1)


def linear_net_with_jacobian(U: np.ndarray, S: np.ndarray, Vt: np.ndarray, t: int, shape, dtype,
                             quadratic: float = 0.0) -> LinearEpsNet:
    """The net whose J = d x0_hat / d x_t is U diag(S) V^T at timestep t (quadratic = 0):
    A = (I - sqrt(a_t) U S V^T) / sqrt(1 - a_t)."""
    a = float(alpha_bar(ALPHAS, t))
    J = U @ np.diag(S) @ Vt
    A = (np.eye(len(S)) - math.sqrt(a) * J) / math.sqrt(1 - a)
    return LinearEpsNet(torch.tensor(A, dtype=dtype), shape, quadratic)


# The constructed spectrum: 8 large singular values, then a gap (s_9 / s_8 = 0.4), then small ones.
SHAPE, T_LIN = (1, 1, 8, 8), 400
D_LIN = 64
S_LIN = np.concatenate([[8.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5], np.linspace(1.0, 0.1, D_LIN - 8)])


@pytest.fixture(scope="module")
def lin():
    U, V = _orthogonal(D_LIN, 1), _orthogonal(D_LIN, 2)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=SHAPE))
    return U, V.T, x


@pytest.fixture(scope="module")
def tiny():
    """The tiny DDPM (default init, seed 0), one x_t, t = 600, and its exact Jacobian (768 x 768)."""
    torch.manual_seed(0)
    model = build_model(tiny_config("ddpm")).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    J = exact_jacobian(model, x, 600, ALPHAS)
    return model, x, 600, J


# --------------------------------------------------------------------------- x0_hat

def test_x0_hat_is_ddim_steps_prediction(tiny):
    model, x, t, _ = tiny
    got = x0_hat(model, x, t, ALPHAS).detach()
    eps = model(x, t)[0][:, :3].detach()
    # A DDIM move to t' = -1 (a = 1) lands on x0_hat itself, computed there in float64.
    want = ddim_step(x, eps, alpha_bar(ALPHAS, t), alpha_bar(ALPHAS, -1))
    assert got.dtype == torch.float32
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= 8 * EPS32 * scale / math.sqrt(float(alpha_bar(ALPHAS, t)))


def test_inference_net_is_refused():
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="inference_mode"):
        jacobian_subspace(tiny_net("ddpm"), x, 300, ALPHAS, 2, 1, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- subspace iteration, closed form

@pytest.mark.parametrize("dtype, max_degrees, sv_rtol", [(torch.float64, 1e-6, 1e-10), (torch.float32, 1e-3, 1e-5)])
def test_subspace_iteration_finds_the_constructed_singular_vectors(lin, dtype, max_degrees, sv_rtol):
    U, Vt, x = lin
    net = linear_net_with_jacobian(U, S_LIN, Vt, T_LIN, SHAPE, dtype)
    # Rate (s_9 / s_8)^2 = 0.16 per step: 16 steps take a random start below 1e-11 of its angle.
    got = jacobian_subspace(net, x.to(dtype), T_LIN, ALPHAS, 8, 16, torch.Generator().manual_seed(0))
    assert got.basis.shape == (8, D_LIN) and got.basis.dtype == torch.float64
    assert principal_angles(got.basis, Vt[:8]) < max_degrees
    np.testing.assert_allclose(got.singular_values.numpy(), S_LIN[:8], rtol=sv_rtol)
    # Distinct singular values: each Ritz vector is the singular vector itself, up to sign.
    cos = np.abs(np.sum(got.basis.numpy() * Vt[:8], axis=1))
    assert np.all(cos > 1 - 1e-5), cos
    np.testing.assert_allclose(got.basis.numpy() @ got.basis.numpy().T, np.eye(8), atol=1e-12)
    assert got.step_angles.shape == (16,) and got.step_angles[-1] < got.step_angles[0]


def test_too_few_iterations_do_not_converge(lin):
    """The check above can fail: one step from a random start is far from the answer."""
    U, Vt, x = lin
    net = linear_net_with_jacobian(U, S_LIN, Vt, T_LIN, SHAPE, torch.float64)
    got = jacobian_subspace(net, x, T_LIN, ALPHAS, 8, 1, torch.Generator().manual_seed(0))
    assert principal_angles(got.basis, Vt[:8]) > 5


def test_with_a_region_it_finds_the_singular_vectors_of_the_masked_jacobian(lin):
    """output_weights W: the top right singular vectors of diag(W) J (numpy's SVD of the constructed
    J with its rows weighted), the moves that change the region's pixels most; not those of J."""
    U, Vt, x = lin
    net = linear_net_with_jacobian(U, S_LIN, Vt, T_LIN, SHAPE, torch.float64)
    weights = np.zeros((8, 8))
    weights[:, :3] = 1.0
    weights[:, 3] = 0.5  # a soft edge
    masked = weights.reshape(-1, 1) * (U @ np.diag(S_LIN) @ Vt)
    _, s_masked, vt_masked = np.linalg.svd(masked)
    gap = s_masked[4] / s_masked[3]
    steps = int(np.ceil(np.log(1e-12) / (2 * np.log(gap))))
    got = jacobian_subspace(net, x, T_LIN, ALPHAS, 4, steps, torch.Generator().manual_seed(0), oversample=4,
                            output_weights=torch.from_numpy(weights))
    assert principal_angles(got.basis, vt_masked[:4]) < 1e-4
    np.testing.assert_allclose(got.singular_values.numpy(), s_masked[:4], rtol=1e-8)
    assert principal_angles(got.basis, Vt[:4]) > 5  # the whole image's top directions are other ones


def test_oversampling_converges_where_the_block_gap_is_small(lin):
    """A spectrum without a gap after the 8th value (s_9 / s_8 = 0.99) but one after the 12th:
    8 vectors barely move in 10 steps, 8 + 4 converge."""
    U, Vt, x = lin
    S = np.concatenate([[8.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.0, 2.5, 2.475, 2.45, 2.425, 2.4], np.linspace(1.0, 0.1, 52)])
    net = linear_net_with_jacobian(U, S, Vt, T_LIN, SHAPE, torch.float64)
    plain = jacobian_subspace(net, x, T_LIN, ALPHAS, 8, 10, torch.Generator().manual_seed(0))
    over = jacobian_subspace(net, x, T_LIN, ALPHAS, 8, 10, torch.Generator().manual_seed(0), oversample=4)
    assert principal_angles(over.basis, Vt[:8]) < 0.01 < 5 < principal_angles(plain.basis, Vt[:8])


def test_same_generator_same_result_and_loop_equals_vmap(lin):
    U, Vt, x = lin
    net = linear_net_with_jacobian(U, S_LIN, Vt, T_LIN, SHAPE, torch.float32)
    x32 = x.float()
    runs = [jacobian_subspace(net, x32, T_LIN, ALPHAS, 4, 3, torch.Generator().manual_seed(5), batching=b)
            for b in ("auto", "auto", "loop")]
    assert runs[0].batching == "vmap" and runs[2].batching == "loop"
    assert torch.equal(runs[0].basis, runs[1].basis)
    torch.testing.assert_close(runs[2].basis, runs[0].basis, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- the tiny UNet

def test_exact_jacobian_matches_finite_differences(tiny):
    """Central differences of the float32 network on 6 columns, to a tolerance built from float32:

        |FD - J| <= rounding / h + truncation + J's own rounding,

    rounding = the largest |x0_hat_32 - x0_hat_64| at the evaluated points (a float64 copy of the
    network gives the reference), truncation = |FD_64 - J_64| with the same h (the h^2 term; float64
    rounding is 1e-9 times smaller), J's rounding = |J_32 - J_64|. The realised step (x + h) - (x - h)
    is exact in float32 (Sterbenz), so no step error enters."""
    model, x, t, J = tiny
    model64 = copy.deepcopy(model).double()
    J64 = exact_jacobian(model64, x.double(), t, ALPHAS)
    h = 2.0 ** -4
    columns = [0, 97, 255, 256, 500, 767]

    def f(m, v):
        return x0_hat(m, v, t, ALPHAS).detach().reshape(-1)

    rounding = truncation = 0.0
    fd = []
    for j in columns:
        ends = []
        for sign in (1, -1):
            v = x.clone().reshape(-1)
            v[j] += sign * h
            ends.append(v.reshape(x.shape))
        step = float(ends[0].reshape(-1)[j]) - float(ends[1].reshape(-1)[j])
        out32 = [f(model, v) for v in ends]
        out64 = [f(model64, v.double()) for v in ends]
        rounding = max(rounding, *(float((a.double() - b).abs().max()) for a, b in zip(out32, out64)))
        fd64 = (out64[0] - out64[1]) / step
        truncation = max(truncation, float((fd64 - J64[:, j]).abs().max()))
        fd.append((out32[0].double() - out32[1].double()) / step)
    fd = torch.stack(fd, dim=1)
    J_cols, J64_cols = J[:, columns].double(), J64[:, columns]
    tolerance = 2 * (2 * rounding / (2 * h) + truncation + float((J_cols - J64_cols).abs().max()))
    assert tolerance < 1e-2 * float(J_cols.abs().max()), "the check would be too loose to mean anything"
    assert float((fd - J_cols).abs().max()) <= tolerance
    # It can fail: J is not symmetric, so the transpose's columns miss.
    assert float((fd - J.T[:, columns].double()).abs().max()) > tolerance


def test_subspace_iteration_on_the_tiny_unet_matches_the_exact_svd(tiny):
    """Measured on this net (rank 1, s_2 / s_1 = 0.906): the angle to J's top right singular vector
    is 9.0 degrees after 10 steps, 0.9 after 20, 0.02 after 40; with oversample 3, 2.4 after 10."""
    model, x, t, J = tiny
    _, S, Vt = torch.linalg.svd(J.double())
    assert float(S[1] / S[0]) < 0.92, "the premise: a gap after the top singular value"
    got = jacobian_subspace(model, x, t, ALPHAS, 1, 25, torch.Generator().manual_seed(0))
    assert got.batching == "vmap"
    assert principal_angles(got.basis, Vt[:1]) < 2.0
    assert abs(float(got.singular_values[0] / S[0]) - 1) < 1e-3
    loop = jacobian_subspace(model, x, t, ALPHAS, 1, 25, torch.Generator().manual_seed(0), batching="loop")
    assert principal_angles(loop.basis, got.basis) < 0.05


def test_principal_angles_of_a_known_rotation():
    e = np.eye(5)
    theta = math.radians(30.0)
    U = e[:2]
    V = np.stack([e[0], math.cos(theta) * e[1] + math.sin(theta) * e[2]])
    assert principal_angles(U, V) == pytest.approx(30.0, abs=1e-10)
    assert principal_angles(U, e[:3]) == pytest.approx(0.0, abs=1e-6)  # contained
    assert principal_angles(e[:1], e[1:2]) == pytest.approx(90.0)
    assert principal_angles(torch.from_numpy(U), torch.from_numpy(V) * 3) == pytest.approx(30.0, abs=1e-10)


# --------------------------------------------------------------------------- across images

def test_global_basis_is_the_weighted_eigenbasis():
    rng = np.random.default_rng(4)
    D = 30
    common = _orthogonal(D, 5)[:3]  # shared by every image
    bases, weights = [], []
    for i in range(6):
        rotated = _orthogonal(3, 10 + i) @ common
        own = rng.normal(size=D)
        own -= common.T @ (common @ own)
        bases.append(np.vstack([rotated, own / np.linalg.norm(own)]))
        weights.append(np.array([3.0, 2.5, 2.0, 0.5]))
    got = global_basis(bases, weights, 3)
    assert principal_angles(got, common) < 1e-6
    # The oracle: top eigenvectors of M = sum_ij w_ij^2 v_ij v_ij^T.
    M = sum((w[:, None] * b).T @ (w[:, None] * b) for b, w in zip(bases, weights))
    eigval, eigvec = np.linalg.eigh(M)
    want = eigvec[:, ::-1][:, :3].T
    np.testing.assert_allclose(np.abs(np.sum(got * want, axis=1)), 1.0, atol=1e-8)
    assert np.all(got[np.arange(3), np.abs(got).argmax(axis=1)] > 0)
    # Unweighted: the common directions still dominate (6 images against 1 each).
    assert principal_angles(global_basis(bases, None, 3), common) < 1e-6
    with pytest.raises(ValueError, match="weights"):
        global_basis(bases, [w[:2] for w in weights], 3)


def test_principal_directions_equal_sklearn_pca():
    rng = np.random.default_rng(6)
    N, D = 60, 200
    scales = np.concatenate([[10.0, 7.0, 5.0, 3.0], np.full(D - 4, 0.5)])
    X = (rng.normal(size=(N, D)) * scales) @ _orthogonal(D, 7) + 3.0
    directions, ratio, mean = principal_directions(X.astype(np.float32), 4)
    pca = PCA(n_components=4, svd_solver="full").fit(X.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(ratio, pca.explained_variance_ratio_, rtol=1e-10)
    np.testing.assert_allclose(mean, pca.mean_, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(directions * pca.components_, axis=1)), 1.0, atol=1e-10)
    np.testing.assert_allclose(directions @ directions.T, np.eye(4), atol=1e-12)
    # The sign rule: largest-magnitude component positive, whatever the data's sign or row order.
    assert np.all(directions[np.arange(4), np.abs(directions).argmax(axis=1)] > 0)
    flipped, _, flipped_mean = principal_directions(-X[::-1].astype(np.float32), 4)
    np.testing.assert_allclose(flipped, directions, atol=1e-10)
    np.testing.assert_allclose(flipped_mean, -mean, atol=1e-10)
    from_torch, _, _ = principal_directions(torch.from_numpy(X.astype(np.float32)).reshape(N, 8, 5, 5), 4)
    np.testing.assert_allclose(from_torch, directions, atol=1e-12)
    with pytest.raises(ValueError, match="rank"):
        principal_directions(X[:4], 4)


# --------------------------------------------------------------------------- naming

def _noisy_permutation(seed: int, r: int, names: list[str], D: int = 40, noise: float = 0.15):
    rng = np.random.default_rng(seed)
    normals = {k: rng.normal(size=D) for k in names}
    order = rng.permutation(len(names))[:r]
    signs = rng.choice([-1.0, 1.0], size=r)
    found = np.stack([signs[i] * normals[names[order[i]]] / np.linalg.norm(normals[names[order[i]]])
                      + noise * rng.normal(size=D) / math.sqrt(D) for i in range(r)])
    return found * 3.0, normals, order, signs  # scaled: normalised inside


def test_match_recovers_a_signed_permutation():
    names = ["Smiling", "Young", "Male", "Eyeglasses", "Bald"]
    found, normals, order, signs = _noisy_permutation(0, 5, names)
    matches = match_directions(found, normals)
    assert [m.index for m in matches] == list(range(5))
    assert [m.name for m in matches] == [names[j] for j in order]
    assert all(np.sign(m.cosine) == s and abs(m.cosine) > 0.95 for m, s in zip(matches, signs))


def test_match_with_more_names_or_more_directions():
    names = ["a", "b", "c", "d", "e"]
    found, normals, order, _ = _noisy_permutation(1, 3, names)
    matches = match_directions(found, normals)
    assert [m.name for m in matches[:3]] == [names[j] for j in order]
    assert matches[3:] == [Match(None, n, None) for n in names if n not in {names[j] for j in order}]
    found, normals, order, _ = _noisy_permutation(2, 4, names[:4])
    extra = np.random.default_rng(3).normal(size=(2, 40))
    matches = match_directions(np.vstack([found, extra]), normals)
    assert [m.name for m in matches[:4]] == [names[j] for j in order]
    assert matches[4:] == [Match(4, None, None), Match(5, None, None)]
    assert match_directions(found, {}) == [Match(i, None, None) for i in range(4)]


def test_match_is_the_best_assignment_not_the_greedy_one():
    rng = np.random.default_rng(8)
    for trial in range(20):
        found = rng.normal(size=(4, 6))
        normals = {f"n{j}": rng.normal(size=6) for j in range(5)}
        got = sum(abs(m.cosine) for m in match_directions(found, normals) if m.cosine is not None)
        f = found / np.linalg.norm(found, axis=1, keepdims=True)
        n = np.stack([v / np.linalg.norm(v) for v in normals.values()])
        cos = np.abs(f @ n.T)
        best = max(sum(cos[i, p[i]] for i in range(4)) for p in itertools.permutations(range(5), 4))
        assert got == pytest.approx(best, abs=1e-12), trial
    with pytest.raises(ValueError, match="zero"):
        match_directions(np.zeros((1, 6)), normals)


def test_captured_share():
    V = _orthogonal(50, 9)[:5]
    assert captured_share(V[2] * 4, V) == pytest.approx(1.0)
    assert captured_share(_orthogonal(50, 9)[7], V) == pytest.approx(0.0, abs=1e-20)
    mixed = 0.6 * V[0] + 0.8 * _orthogonal(50, 9)[10]
    assert captured_share(mixed, V) == pytest.approx(0.36)
    rng = np.random.default_rng(10)
    shares = [captured_share(rng.normal(size=50), V) for _ in range(2000)]
    assert np.mean(shares) == pytest.approx(5 / 50, rel=0.1)  # the random baseline r / D
    with pytest.raises(ValueError, match="orthonormal"):
        captured_share(V[0], V * 2)


# --------------------------------------------------------------------------- a few labels

def test_fit_within_equals_svc_on_the_coordinates():
    rng = np.random.default_rng(11)
    N, D, r = 80, 40, 6
    V = _orthogonal(D, 12)[:r]
    y = rng.integers(0, 2, N)
    direction = 0.8 * V[0] + 0.6 * _orthogonal(D, 12)[20]  # partly outside the subspace
    X = rng.normal(size=(N, D)) + 1.2 * (2 * y[:, None] - 1) * direction
    yt = rng.integers(0, 2, 30)
    Xt = rng.normal(size=(30, D)) + 1.2 * (2 * yt[:, None] - 1) * direction
    got = fit_within(X.astype(np.float32), y, V, Xt.astype(np.float32), yt, C=0.5)
    c, ct = X.astype(np.float32).astype(np.float64) @ V.T, Xt.astype(np.float32).astype(np.float64) @ V.T
    svc = SVC(kernel="linear", C=0.5).fit(c, y)
    w = svc.coef_[0]
    np.testing.assert_allclose(V @ got.coef.astype(np.float64), w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
    np.testing.assert_allclose(got.coef, V.T @ w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    assert abs(got.intercept - svc.intercept_[0]) <= 1e-5 * max(1.0, abs(svc.intercept_[0]))
    assert got.train_acc == svc.score(c, y) and got.test_acc == svc.score(ct, yt)
    n = got.normal.astype(np.float64)
    assert np.linalg.norm(n - V.T @ (V @ n)) < 1e-6 and np.linalg.norm(n) == pytest.approx(1.0, abs=1e-6)
    # Signed distances of full latents are the subspace SVM's.
    np.testing.assert_allclose(hyperplane_distances(Xt, got), svc.decision_function(ct) / np.linalg.norm(w),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="orthonormal"):
        fit_within(X, y, V * 1.1)


# --------------------------------------------------------------------------- local linearity

def test_edit_linearity_linear_and_nonlinear(lin, tiny):
    U, Vt, x = lin
    net = linear_net_with_jacobian(U, S_LIN, Vt, T_LIN, SHAPE, torch.float64)
    direction = np.random.default_rng(13).normal(size=D_LIN)
    assert edit_linearity(net, x, T_LIN, ALPHAS, direction, 50.0) == pytest.approx(1.0, abs=1e-12)
    bent = linear_net_with_jacobian(U, S_LIN, Vt, T_LIN, SHAPE, torch.float64, quadratic=0.3)
    small = edit_linearity(bent, x, T_LIN, ALPHAS, direction, 1e-3)
    large = edit_linearity(bent, x, T_LIN, ALPHAS, direction, 20.0)
    assert small == pytest.approx(1.0, abs=1e-5) and large < 0.9
    model, x_unet, t, _ = tiny
    d = torch.randn(3 * 16 * 16, generator=torch.Generator().manual_seed(14))
    near = edit_linearity(model, x_unet, t, ALPHAS, d, 0.05)
    far = edit_linearity(model, x_unet, t, ALPHAS, d, 200.0)
    assert near > 0.999 and far < near


def test_few_labels_standard_error_is_scipys():
    """faces_discovery.standard_error: the standard error of the mean over the label draws, as
    scipy.stats.sem computes it (ddof 1); one draw has none."""
    from scipy.stats import sem

    from scripts.evaluation.faces_discovery import standard_error

    values = np.random.default_rng(3).uniform(0.5, 1.0, size=10)
    assert standard_error(values) == pytest.approx(float(sem(values)), rel=1e-12)
    assert standard_error([0.7]) == 0.0


@pytest.mark.parametrize("flags", [["--n_draws", "0"], ["--n_labels", "1"]])
def test_few_labels_refuses_no_draw_or_one_label(flags, capsys, tmp_path):
    """faces_discovery: no draw of labels, or fewer labels than the two classes, is a usage error
    (exit 2, one line naming both flags) before any model is loaded."""
    from scripts.evaluation.faces_discovery import main

    with pytest.raises(SystemExit) as exit_:
        main(["--found", str(tmp_path), *flags])
    assert exit_.value.code == 2
    assert "--n_labels >= 2" in capsys.readouterr().err


def test_few_labels_show_both_classes_from_the_pool():
    """faces_discovery.stratified_labels: per attribute half positive, half negative labels, all from
    the pool; the same seed gives the same rows; too few of a class is one line."""
    from scripts.evaluation.faces_discovery import stratified_labels
    from utils.errors import UserError

    rng = np.random.default_rng(0)
    labels = rng.choice([-1, 0, 1], size=(300, 3), p=[0.6, 0.1, 0.3])
    labels[:, 2] = np.where(np.arange(300) < 12, 1, -1)  # a rare class
    pool = np.arange(100, 300)
    chosen = stratified_labels(labels[:, :2], pool, 10, seed=4)
    for a, rows in enumerate(chosen):
        assert len(rows) == 10 and set(rows) <= set(pool)
        assert sorted(labels[rows, a]) == [-1] * 5 + [1] * 5
    again = stratified_labels(labels[:, :2], pool, 10, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(again, chosen))
    assert len(stratified_labels(labels[:, 2:], np.arange(300), 10, seed=4)[0]) == 10
    with pytest.raises(UserError, match="fewer than 5"):
        stratified_labels(labels[:, 2:], pool, 10, seed=4)
