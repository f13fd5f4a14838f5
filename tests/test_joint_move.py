"""The joint move v' = v + N G^-1 (t - N^T v): on constructed normals with known cosines it hits every
target and keeps every held projection, where the plain sum of single moves misses each target by
exactly G's off-diagonal; it is the least-norm such move; one normal gives the single edit; and
normals too close to tell apart are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import float_tolerance
from utils.core.boundary import check_joint, edit_latents, joint_move, resolvable_residual, unit_rows


def normals_with_cosines(gram: np.ndarray, dim: int, seed: int = 0) -> torch.Tensor:
    """Unit rows (M, dim) whose pairwise cosines are ``gram``'s entries: L Q, with G = L L^T
    (Cholesky) and Q (M, dim) orthonormal rows."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, len(gram))))
    return torch.from_numpy(np.linalg.cholesky(gram) @ q.T)


GRAM = np.array([[1.0, 0.9, -0.5, 0.3],
                 [0.9, 1.0, -0.2, 0.6],
                 [-0.5, -0.2, 1.0, 0.1],
                 [0.3, 0.6, 0.1, 1.0]])


@pytest.fixture(scope="module")
def setup():
    n = normals_with_cosines(GRAM, 3 * 8 * 8)
    np.testing.assert_allclose((n @ n.T).numpy(), GRAM, atol=1e-12)  # the construction itself
    v = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return n, v


def _projections(edited: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    return edited.reshape(*edited.shape[:2], -1).double() @ normals.T  # (B, K, M)


def test_the_joint_move_hits_every_target_where_the_plain_sum_misses_by_the_gram_off_diagonal(setup):
    n, v = setup
    moved = n[:3]
    targets = torch.tensor([[-4.0, 2.0, 1.0], [3.0, 3.0, -2.5]], dtype=torch.float64)  # (K, M)
    joint = joint_move(v, moved, targets)
    tol = float_tolerance(torch.float32, float(v.abs().max()) + 10, ulps=8) * v[0].numel() ** 0.5
    reached = _projections(joint, moved)
    assert torch.allclose(reached, targets.expand_as(reached), atol=tol, rtol=0), reached - targets
    # The plain sum v + sum_m (t_m - v.n_m) n_m, written out here: projection i gets its own shift
    # plus sum_{m != i} G_im (t_m - v.n_m), the cross-talk.
    own = v.reshape(2, -1).double() @ moved.T  # (B, M)
    shifts = targets[None] - own[:, None, :]  # (B, K, M)
    plain = v.reshape(2, 1, -1).double() + torch.einsum("bkm,md->bkd", shifts, moved)
    missed = _projections(plain, moved) - targets[None]
    gram = torch.from_numpy(GRAM[:3, :3])
    cross = torch.einsum("im,bkm->bki", gram - torch.eye(3, dtype=torch.float64), shifts)
    assert torch.allclose(missed, cross, atol=1e-9, rtol=0)
    assert missed.abs().max() > 1.0, "the cosines up to 0.9 make the plain sum miss by far"


def test_held_attributes_stay_where_each_latent_has_them(setup):
    n, v = setup
    targets = torch.tensor([[-4.0, 2.0], [5.0, -1.0], [0.0, 0.0]], dtype=torch.float64)
    joint = joint_move(v, n[:2], targets, held=n[2:])
    tol = float_tolerance(torch.float32, float(v.abs().max()) + 10, ulps=8) * v[0].numel() ** 0.5
    reached = _projections(joint, n)
    before = (v.reshape(2, -1).double() @ n.T)[:, None, :]
    assert torch.allclose(reached[..., :2], targets.expand(2, 3, 2), atol=tol, rtol=0)
    assert torch.allclose(reached[..., 2:], before[..., 2:].expand(2, 3, 2), atol=tol, rtol=0)
    assert (before[..., 2:] - _projections(joint_move(v, n[:2], targets), n)[..., 2:]).abs().max() > 0.1, \
        "without holding them, the moves take the other attributes along"


def test_the_joint_move_is_the_least_norm_move_that_sets_the_projections(setup):
    n, v = setup
    targets = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    joint = joint_move(v.double(), n, targets)
    move = (joint[:, 0] - v.double()).reshape(2, -1).numpy()
    flat = v.reshape(2, -1).double().numpy()
    for b in range(2):  # numpy's least-squares solver gives the minimum-norm solution of N^T x = t - N^T v
        want, *_ = np.linalg.lstsq(n.numpy(), targets[0].numpy() - n.numpy() @ flat[b], rcond=None)
        np.testing.assert_allclose(move[b], want, atol=1e-10)


def test_one_normal_is_the_single_edit():
    v = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    normal = torch.randn(32, generator=torch.Generator().manual_seed(3))
    distances = torch.tensor([-2.0, 0.5, 7.0], dtype=torch.float64)
    # The section-5 formula written out in float64: v' = v + (d - v.n) n
    unit = normal.double() / normal.double().norm()
    flat = v.reshape(3, 1, -1).double()
    want = flat + (distances[None, :, None] - (flat * unit).sum(-1, keepdim=True)) * unit
    got = joint_move(v, unit_rows(normal[None]), distances[:, None])
    tol = float_tolerance(torch.float32, float(want.abs().max()), ulps=4)
    assert torch.allclose(got.reshape(3, 3, -1).double(), want, atol=tol, rtol=0)
    assert torch.equal(got, edit_latents(v, normal, distances))


def test_a_batch_equals_its_items_alone(setup):
    # Bit for bit by construction: per-row float64 sums and elementwise products in a fixed order.
    n, _ = setup
    v = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([[1.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    batch = joint_move(v, n[:2], targets, held=n[2:])
    for i in range(5):
        assert torch.equal(batch[i:i + 1], joint_move(v[i:i + 1], n[:2], targets, held=n[2:]))
        for k in range(2):
            assert torch.equal(batch[i:i + 1, k:k + 1], joint_move(v[i:i + 1], n[:2], targets[k:k + 1], held=n[2:]))


@pytest.mark.parametrize("dim", [768, 196_608])
def test_near_parallel_normals_are_refused_naming_the_pair(dim):
    # A pair at cosine c has cond(G) = (1 + c) / (1 - c); check_joint refuses once cond(G) times
    # twice the float32 rounding of the normals passes 1 %: c near 1 - 2 / (1 + 0.005 / r).
    r = resolvable_residual(dim)
    limit = 1 - 2 / (1 + 0.005 / r)
    for cos, refused in ((0.9, False), (limit - 2 * (1 - limit) / 10, False), (limit + (1 - limit) / 10, True)):
        gram = np.array([[1.0, cos], [cos, 1.0]])
        normals = normals_with_cosines(gram, dim, seed=5)
        if refused:
            with pytest.raises(ValueError, match=rf"^slant and thick are too close to move or hold together \(cos "
                                                 rf"\+{cos:.4f}; cond\(G\) .* for {dim} values\): drop one of them$"):
                check_joint(["slant", "thick"], normals)
        else:
            np.testing.assert_allclose(check_joint(["slant", "thick"], normals), gram, atol=1e-9)


def test_a_normal_in_the_span_of_others_is_refused():
    n = normals_with_cosines(np.array([[1.0, 0.3], [0.3, 1.0]]), 100)
    third = n[0] * 0.6 + n[1] * 0.8
    with pytest.raises(ValueError, match="too close to move or hold together"):
        check_joint(["a", "b", "c"], unit_rows(torch.cat([n, third[None]])))

