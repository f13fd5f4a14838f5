"""Editing a region and leaving the rest (utils/core/region.py, utils/io/region.py).

On constructed normals and masks: the confined move v + N_W (N_W^T N)^-1 (t - N^T v) hits every
target, keeps held projections, is exactly zero outside the region, is the least-norm move inside
it, equals the joint move when the region is everything, and is refused (naming the attribute)
when a normal has too little of itself inside; the LOCO-Edit projection hits the targets orthogonally
to its basis, and the basis is the outside Jacobian's (checked on a network whose Jacobian is known
in closed form); the blended denoising leaves the kept pixels on the reference run bit for bit;
the feather, the area downsampling and the user's region files and boxes."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import float_tolerance, tiny_model, tiny_net
from utils.core.boundary import joint_move, unit_rows
from utils.core.diffusion import Keep, blend, generate, invert, make_alphas_cumprod, timestep_grid
from utils.core.editing import reconstruct
from utils.core.region import (MIN_REGION_SHARE, RegionError, area_downsample, check_projection, check_region,
                               confined_joint_move, feather, latent_weights, outside_jacobian_basis,
                               projected_joint_move, reference_trajectory)
from utils.errors import UserError
from utils.io.region import read_region

SHAPE = (3, 8, 8)  # a latent z of an 8-px image
DIM = int(np.prod(SHAPE))


def box_weights(rows: slice, cols: slice) -> torch.Tensor:
    """An (8, 8) binary mask, 1 on the box."""
    w = torch.zeros(8, 8, dtype=torch.float64)
    w[rows, cols] = 1.0
    return w


REGION = box_weights(slice(1, 6), slice(2, 7))  # 25 of 64 pixels


def random_unit_rows(m: int, seed: int) -> torch.Tensor:
    return unit_rows(torch.randn(m, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def latents(b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, *SHAPE, generator=torch.Generator().manual_seed(seed))


def projections(edited: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    return edited.reshape(*edited.shape[:2], -1).double() @ normals.T  # (B, K, M)


def tolerance(v: torch.Tensor, reach: float = 10.0) -> float:
    """As tests/test_joint_move.py: a few float32 ulps of the largest value, over sqrt(D) terms."""
    return float_tolerance(v.dtype, float(v.abs().max()) + reach, ulps=8) * v[0].numel() ** 0.5


def split_normal(share: float, inside: torch.Tensor, seed: int) -> torch.Tensor:
    """A unit normal (D,) with exactly ``share`` of its squared norm where the flat binary mask
    ``inside`` (D,) is 1: sqrt(s) a + sqrt(1 - s) b, a and b unit vectors on each side."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(DIM, generator=g, dtype=torch.float64) * inside
    b = torch.randn(DIM, generator=g, dtype=torch.float64) * (1 - inside)
    return math.sqrt(share) * a / a.norm() + math.sqrt(1 - share) * b / b.norm()


# ---------------------------------------------------------------------------- the confined move

@pytest.mark.parametrize("soft", [False, True])
def test_the_confined_move_hits_every_target_keeps_held_and_leaves_the_outside_bit_for_bit(soft):
    n = random_unit_rows(4, seed=0)
    n[1] = unit_rows((n[0] * 0.8 + n[1] * 0.6)[None])[0]  # correlated normals, cos 0.8
    weights = REGION * (torch.linspace(0.3, 1.0, 64, dtype=torch.float64).reshape(8, 8) if soft else 1)
    v = latents()
    targets = torch.tensor([[-4.0, 2.0], [3.0, 3.0], [0.0, -6.0]], dtype=torch.float64)  # (K, M)
    check_region(["a", "b", "c", "d"], n, latent_weights(weights, SHAPE), n_held=2)
    edited = confined_joint_move(v, n[:2], targets, n[2:], weights)
    assert edited.shape == (2, 3, *SHAPE) and edited.dtype == v.dtype
    reached = projections(edited, n)
    before = (v.reshape(2, -1).double() @ n.T)[:, None, :]
    tol = tolerance(v)
    assert torch.allclose(reached[..., :2], targets.expand(2, 3, 2), atol=tol, rtol=0), reached[..., :2] - targets
    assert torch.allclose(reached[..., 2:], before[..., 2:].expand(2, 3, 2), atol=tol, rtol=0)
    outside = (weights == 0).expand(SHAPE)
    for b in range(2):
        for k in range(3):
            assert torch.equal(edited[b, k][outside], v[b][outside])  # W = 0: exactly v
            assert (edited[b, k][~outside] != v[b][~outside]).any()


def test_the_confined_move_is_the_least_norm_move_inside_the_region():
    n = random_unit_rows(3, seed=2)
    v = latents(seed=3).double()
    targets = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    moved = (confined_joint_move(v, n, targets, None, REGION)[:, 0] - v).reshape(2, -1).numpy()
    inside = latent_weights(REGION, SHAPE).numpy() > 0
    for b in range(2):  # numpy's least-norm solution of N_in^T x = t - N^T v on the region's values alone
        want, *_ = np.linalg.lstsq(n.numpy()[:, inside], targets[0].numpy() - n.numpy() @ v[b].reshape(-1).numpy(),
                                   rcond=None)
        np.testing.assert_allclose(moved[b, inside], want, atol=1e-10)
        assert np.all(moved[b, ~inside] == 0)


def test_with_the_whole_latent_editable_it_is_the_joint_move():
    # Not bit for bit in general: joint_move takes G's diagonal as exactly 1, the confined solve
    # computes n . (W n), one float64 rounding away. Both are cast to float32 from float64 values a
    # few float64 ulps apart, so almost every value rounds alike.
    n = random_unit_rows(3, seed=4)
    v = latents(seed=5)
    targets = torch.tensor([[-4.0, 2.0], [5.0, -1.0]], dtype=torch.float64)
    confined = confined_joint_move(v, n[:2], targets, n[2:], torch.ones(8, 8))
    joint = joint_move(v, n[:2], targets, n[2:])
    assert torch.allclose(confined, joint, atol=float_tolerance(torch.float32, float(v.abs().max()) + 10, ulps=1),
                          rtol=0)
    assert (confined == joint).double().mean() > 0.99
    double = latents(seed=5).double()  # in float64 the two differ by float64 rounding only
    assert torch.allclose(confined_joint_move(double, n[:2], targets, n[2:], torch.ones(8, 8)),
                          joint_move(double, n[:2], targets, n[2:]), atol=1e-12, rtol=0)


def test_a_batch_equals_its_items_alone():
    n = random_unit_rows(3, seed=6)
    v = latents(5, seed=7)
    targets = torch.tensor([[1.0, 2.0], [-3.0, 0.0]], dtype=torch.float64)
    weights = REGION * 0.7
    batch = confined_joint_move(v, n[:2], targets, n[2:], weights)
    for i in range(5):
        assert torch.equal(batch[i:i + 1], confined_joint_move(v[i:i + 1], n[:2], targets, n[2:], weights))
        for k in range(2):
            assert torch.equal(batch[i:i + 1, k:k + 1],
                               confined_joint_move(v[i:i + 1], n[:2], targets[k:k + 1], n[2:], weights))


def test_a_held_normal_outside_the_region_is_held_by_the_region_itself():
    inside = latent_weights(REGION, SHAPE)
    g = torch.Generator().manual_seed(8)
    held = torch.randn(DIM, generator=g, dtype=torch.float64) * (1 - inside)
    held = (held / held.norm())[None]
    n = random_unit_rows(1, seed=9)
    v = latents(seed=10).double()
    shares = check_region(["moved", "held"], torch.cat([n, held]), inside, n_held=1)
    assert shares[1] == 0
    edited = confined_joint_move(v, n, torch.tensor([[3.0]], dtype=torch.float64), held, REGION)
    assert abs(float(projections(edited, held)[0, 0, 0] - v[0].reshape(-1) @ held[0])) < 1e-12
    assert abs(float(projections(edited, n)[0, 0, 0]) - 3.0) < 1e-12


# ------------------------------------------------------------------------------------ refusals

def test_a_normal_with_too_little_of_itself_inside_is_refused_naming_it_and_its_share():
    inside = latent_weights(REGION, SHAPE)
    other = random_unit_rows(1, seed=11)
    above = split_normal(MIN_REGION_SHARE * 1.01, inside, seed=12)
    shares = check_region(["slant", "thick"], torch.stack([other[0], above]), inside)
    assert shares[1] == pytest.approx(MIN_REGION_SHARE * 1.01, rel=1e-12)
    below = split_normal(MIN_REGION_SHARE * 0.99, inside, seed=12)
    # binary mask: the move is exactly 1 / sqrt(share) times as long (0.0099 -> 10.05)
    with pytest.raises(RegionError, match=r"^thick has 0\.99% of its squared norm inside the region \(at least 1% "
                                          r"is needed\): reaching its target there takes a move 10\.1 times as long "
                                          r"as without the region; enlarge the region or drop the attribute$"):
        check_region(["slant", "thick"], torch.stack([other[0], below]), inside)
    # a held normal is not refused for its share: holding it does not lengthen the move
    check_region(["slant", "thick"], torch.stack([other[0], below]), inside, n_held=1)


@pytest.mark.parametrize("soft", [False, True])
def test_the_amplification_is_what_the_move_measures(soft):
    # One attribute: ||confined move|| / ||unconfined move|| = ||W n|| / (n . W n), = 1 / sqrt(share) when binary.
    weights = REGION * (torch.linspace(0.2, 1.0, 64, dtype=torch.float64).reshape(8, 8) if soft else 1)
    w = latent_weights(weights, SHAPE)
    n = split_normal(0.3, (w > 0).double(), seed=13)[None]
    v = latents(1, seed=14).double()
    target = torch.tensor([[7.0]], dtype=torch.float64)
    confined = (confined_joint_move(v, n, target, None, weights) - v[:, None]).norm()
    free = (joint_move(v, n, target) - v[:, None]).norm()
    share = float(check_region(["a"], n, w)[0])
    want = float((w * n[0]).norm() / (n[0] @ (w * n[0])))
    assert float(confined / free) == pytest.approx(want, rel=1e-10)
    if not soft:
        assert want == pytest.approx(1 / math.sqrt(share), rel=1e-10)
    else:
        assert want < 1 / math.sqrt(share)


def test_normals_parallel_inside_the_region_are_refused_though_apart_outside():
    inside = latent_weights(REGION, SHAPE)
    g = torch.Generator().manual_seed(15)
    a = torch.randn(DIM, generator=g, dtype=torch.float64) * inside
    b1, b2 = (torch.randn(DIM, generator=g, dtype=torch.float64) * (1 - inside) for _ in range(2))
    n = unit_rows(torch.stack([a / a.norm() + b1 / b1.norm(), a / a.norm() + b2 / b2.norm()]))
    assert abs(float(n[0] @ n[1])) < 0.7  # apart as whole normals
    check_region(["smile", "mouth"], n, torch.ones(DIM, dtype=torch.float64))
    with pytest.raises(RegionError, match=r"^inside the region, smile and mouth are too close to move or hold "
                                          r"together \(cos \+1\.0000; .*\): enlarge the region or drop one of them$"):
        check_region(["smile", "mouth"], n, inside)


# ------------------------------------------------------------------------------ LOCO-Edit

def orthonormal_rows(k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(DIM, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T.contiguous()


def test_the_projected_move_hits_targets_and_is_orthogonal_to_the_basis():
    n = random_unit_rows(3, seed=16)
    basis = orthonormal_rows(20, seed=17)
    v = latents(2, seed=18).double()
    targets = torch.tensor([[2.0, -3.0], [0.0, 5.0]], dtype=torch.float64)
    check_projection(["a", "b", "c"], n, basis, n_held=1)
    edited = projected_joint_move(v, n[:2], targets, n[2:], basis)
    reached = projections(edited, n)
    assert torch.allclose(reached[..., :2], targets.expand(2, 2, 2), atol=1e-12, rtol=0)
    assert torch.allclose(reached[..., 2], (v.reshape(2, -1) @ n[2])[:, None].expand(2, 2), atol=1e-12, rtol=0)
    move = (edited - v[:, None]).reshape(4, -1)
    assert (move @ basis.T).abs().max() < 1e-12
    single = projected_joint_move(v.float(), n[:2], targets, n[2:], basis)  # float32 in, float32 out
    assert single.dtype == torch.float32
    assert torch.allclose(projections(single, n[:2]), targets.expand(2, 2, 2), atol=tolerance(v.float()), rtol=0)


def test_a_normal_the_projection_removes_is_refused():
    basis = orthonormal_rows(5, seed=19)
    n = unit_rows((basis[0] + 0.05 * random_unit_rows(1, seed=20)[0])[None])
    with pytest.raises(RegionError, match=r"^bald has 0\.\d+% of its squared norm inside the projection"):
        check_projection(["bald"], n, basis)
    with pytest.raises(ValueError, match="orthonormal"):
        projected_joint_move(latents(1), n, torch.ones(1, 1), None, basis * 2)


class LinearEps:
    """A network whose noise prediction is a fixed linear map of x: eps = A x (flattened), so
    x0_hat = (I - sqrt(1 - a) A) x / sqrt(a) and J = (I - sqrt(1 - a) A) / sqrt(a) exactly. With
    ``variance`` it returns 2C channels, the last C a learned variance the Jacobian must ignore."""

    def __init__(self, a: torch.Tensor, variance: bool = False):
        self.a, self.variance = a, variance

    def __call__(self, x, t, h_override=None):
        eps = (x.reshape(len(x), -1) @ self.a.T).reshape(x.shape)
        out = torch.cat([eps, torch.sin(x) * 100], dim=1) if self.variance else eps
        return out, x.new_zeros(len(x), 1, 1, 1)


@pytest.mark.parametrize("variance", [False, True])
def test_the_outside_jacobian_basis_is_the_closed_form_one(variance):
    shape, t = (1, 3, 4, 4), 300
    dim = 48
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(21), dtype=torch.float64) * 0.3
    alphas = make_alphas_cumprod(0.0001, 0.02, 1000)
    outside = torch.ones(4, 4)
    outside[1:3, 1:4] = 0  # 6 pixels inside, 10 outside: 30 rows
    x = torch.randn(shape, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    k = 7
    basis = outside_jacobian_basis(LinearEps(a, variance), x, t, alphas, outside, k, chunk=8)
    assert basis.shape == (k, dim) and basis.dtype == torch.float64
    ab = float(alphas[t])
    jacobian = (np.eye(dim) - math.sqrt(1 - ab) * a.numpy()) / math.sqrt(ab)
    rows = np.flatnonzero(np.broadcast_to(outside.numpy() > 0, (3, 4, 4)).reshape(-1))
    _, s, vh = np.linalg.svd(jacobian[rows], full_matrices=False)
    assert s[k - 1] - s[k] > 1e-3 * s[0]  # a gap, so the top-k subspace is unique
    want = vh[:k].T @ vh[:k]  # compared as projectors: singular vectors are unique up to sign
    np.testing.assert_allclose((basis.T @ basis).numpy(), want, atol=1e-10)


def test_the_outside_jacobian_basis_of_a_unet_is_its_rows_by_autograd():
    model = tiny_model("ddpm", seed=2)
    alphas = make_alphas_cumprod(0.0001, 0.02, 1000)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(23))
    outside = torch.zeros(16, 16)
    outside[0, :2] = 1  # 2 pixels: 6 rows of J
    basis = outside_jacobian_basis(model, x, 200, alphas, outside, 6, chunk=4)
    ab = alphas[200].float()
    rows = []
    for index in np.flatnonzero(np.broadcast_to(outside.numpy() > 0, (3, 16, 16)).reshape(-1)):
        xg = x.clone().requires_grad_(True)
        x0 = (xg - (1 - ab).sqrt() * model(xg, 200)[0][:, :3]) / ab.sqrt()
        rows.append(torch.autograd.grad(x0.reshape(-1)[index], xg)[0].reshape(-1).double())
    want = torch.linalg.svd(torch.stack(rows), full_matrices=False)[2]
    assert torch.allclose(basis.T @ basis, want.T @ want, atol=1e-5)
    with pytest.raises(ValueError, match="not differentiable"):
        outside_jacobian_basis(tiny_net("ddpm", seed=2), x, 200, alphas, outside, 6)


# ------------------------------------------------------------------------ blended denoising

@pytest.fixture(scope="module")
def kept_run():
    net = tiny_net("ddpm", seed=4)
    alphas = make_alphas_cumprod(0.0001, 0.02, 1000)
    grid = timestep_grid(300, 4)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(24)) * 2 - 1
    inversion = invert(net, image, alphas, grid)
    return net, alphas, grid, inversion


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_the_kept_pixels_end_exactly_at_the_reconstruction(kept_run, eta):
    net, alphas, grid, inversion = kept_run
    region = torch.zeros(16, 16)
    region[4:10, 5:12] = 1
    keep = (1 - feather(region, 2.0))[None, None]
    states = reference_trajectory(net, inversion.z, alphas, grid)
    assert sorted(states) == sorted([-1, *grid])
    reconstruction = reconstruct(net, inversion, alphas, grid, inject_h=False)
    assert torch.equal(states[-1], reconstruction)
    normal = random_unit_rows(1, seed=25)[0].reshape(3, 8, 8).repeat_interleave(2, 1).repeat_interleave(2, 2)
    n = unit_rows(normal.reshape(1, -1))
    z_edit = confined_joint_move(inversion.z, n, torch.tensor([[30.0]], dtype=torch.float64), None,
                                 region[None])[:, 0]
    generators = [torch.Generator().manual_seed(s) for s in (1, 2)] if eta else None
    out = generate(net, z_edit, alphas, grid, eta=eta, generators=generators, keep=Keep(keep, states))
    kept = (keep == 1).expand_as(out)
    assert kept.float().mean() > 0.3
    assert torch.equal(out[kept], reconstruction[kept])  # a blend with weight 1: bit for bit
    inside = (region > 0).expand_as(out)
    assert (out[inside] - reconstruction[inside]).abs().max() > 0.01


def test_with_nothing_kept_it_is_generate_bit_for_bit(kept_run):
    net, alphas, grid, inversion = kept_run
    z = inversion.z + 0.1
    keep = torch.zeros(1, 1, 16, 16)
    states = reference_trajectory(net, inversion.z, alphas, grid, h_edit=inversion.h)
    assert torch.equal(states[-1], reconstruct(net, inversion, alphas, grid, inject_h=True))
    for eta in (0.0, 1.0):
        gens = (lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]) if eta else (lambda: None)
        want = generate(net, z, alphas, grid, h_edit=inversion.h, eta=eta, generators=gens())
        got = generate(net, z, alphas, grid, h_edit=inversion.h, eta=eta, generators=gens(), keep=Keep(keep, states))
        assert torch.equal(got, want)


def test_blend_is_exact_at_zero_and_one():
    e = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(26))
    r = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(27))
    keep = torch.tensor([0.0, 1.0, 0.25, 1.0]).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = blend(e, r, keep)
    assert torch.equal(out[..., 0], e[..., 0]) and torch.equal(out[..., 1], r[..., 1])
    assert torch.allclose(out[..., 2], 0.25 * r[..., 2] + 0.75 * e[..., 2])


# ------------------------------------------------------------------------- masks and grids

def test_the_feather_is_one_on_the_region_and_zero_beyond_its_width():
    mask = torch.zeros(12, 12)
    mask[5, 5] = 1
    soft = feather(mask, 4.0)
    assert soft.dtype == torch.float32 and soft[5, 5] == 1.0
    assert soft[5, 6] == pytest.approx(0.75) and soft[6, 6] == pytest.approx(1 - math.sqrt(2) / 4)
    assert soft[5, 9] == 0.0 and soft[8, 8] == 0.0  # distance 4 and 3 sqrt(2) > 4: exactly 0
    yy, xx = torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij")
    distance = ((yy - 5) ** 2 + (xx - 5) ** 2).sqrt()
    assert torch.all(soft[distance >= 4] == 0) and torch.all(soft[distance < 4] > 0)
    big = torch.zeros(20, 20)
    big[5:15, 5:15] = 0.4  # any value above 0 is in the region
    soft = feather(big, 3.0)
    assert torch.all(soft[5:15, 5:15] == 1.0) and soft[2, 10] == 0.0 and soft[3, 10] > 0
    assert torch.equal(feather(big, 0), (big > 0).float())
    with pytest.raises(ValueError, match="no region"):
        feather(torch.zeros(4, 4), 2.0)


def test_area_downsample_against_hand_computed_shares():
    mask = torch.zeros(4, 4)
    mask[0, 0], mask[1, 1], mask[0, 3], mask[3, 2] = 1, 1, 0.5, 1
    np.testing.assert_array_equal(area_downsample(mask, 2).numpy(), [[0.5, 0.125], [0.0, 0.25]])
    three = torch.zeros(3, 3)
    three[1, 1] = 1  # the centre pixel is split evenly among the four cells of 1.5 x 1.5 pixels
    np.testing.assert_allclose(area_downsample(three, 2).numpy(), np.full((2, 2), 0.25 / 2.25), atol=1e-15)
    three[0, 0] = 1  # wholly in cell (0, 0)
    np.testing.assert_allclose(area_downsample(three, 2).numpy()[0, 0], 1.25 / 2.25, atol=1e-15)
    assert area_downsample(torch.ones(16, 16), 4).shape == (4, 4) and torch.all(area_downsample(torch.ones(16, 16), 4) == 1)


# ------------------------------------------------------------------------- the user's region

def test_a_box_is_the_share_of_each_pixel_inside_it_and_a_mask_file_reads_it_back(tmp_path):
    region = read_region("0.25,0.5,0.75,1", 16)
    assert region.kind == "box" and region.box == (0.25, 0.5, 0.75, 1.0)
    want = np.zeros((16, 16), dtype=np.float32)
    want[8:16, 4:12] = 1
    np.testing.assert_array_equal(region.mask, want)
    assert region.coverage == 0.25
    partial = read_region("0.1,0,0.5,0.5", 10)  # x from pixel 1 to 5, y from 0 to 5: whole pixels
    assert partial.mask.sum() == pytest.approx(20) and partial.mask[0, 0] == 0 and partial.mask[0, 1] == 1
    fraction = read_region("0.125,0,0.5,0.5", 4)  # x from 0.5 to 2 pixels: half of pixel 0
    np.testing.assert_allclose(fraction.mask[0], [0.5, 1, 0, 0])
    # the round trip: the box's mask as a 64-px file, read at 16 px, is the box's mask at 16 px
    path = tmp_path / "mask.png"
    Image.fromarray((read_region("0.25,0.5,0.75,1", 64).mask * 255).astype(np.uint8)).save(path)
    read = read_region(str(path), 16)
    np.testing.assert_array_equal(read.mask, region.mask)
    assert read.kind == "file" and read.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "sha256" in read.describe() and "25.0% of the image" in read.describe()


def test_a_mask_file_is_area_resized_and_cropped_like_its_image(tmp_path):
    rng = np.random.default_rng(28)
    grey = rng.integers(0, 256, size=(32, 48)).astype(np.uint8)  # wider than tall: the centre 32 x 32
    path = tmp_path / "wide.png"
    Image.fromarray(grey).save(path)
    read = read_region(str(path), 8)
    centre = torch.from_numpy(grey[:, 8:40].astype(np.float64) / 255)
    np.testing.assert_allclose(read.mask, area_downsample(centre, 8).numpy(), atol=1e-5)


def one_line_user_error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize("spec, words", [
    ("0.1,0.2,0.3", "3 values"),
    ("0.1,0.2,0.3,0.4,0.5", "5 values"),
    ("a,0.2,0.3,0.4", "not four numbers"),
    ("0.1,0.2,nan,0.4", "outside [0, 1]"),
    ("-0.1,0.2,0.3,0.4", "outside [0, 1]"),
    ("0.1,0.2,1.3,0.4", "outside [0, 1]"),
    ("0.5,0.2,0.3,0.4", "empty or inverted"),
    ("0.1,0.4,0.3,0.4", "empty or inverted"),
    ("0.1,0.1,0.12,0.12", "under one pixel"),
    ("0,0,1,1", "that is not a region; drop --region"),
])
def test_a_malformed_box_is_one_line(spec, words):
    assert words in one_line_user_error(lambda: read_region(spec, 16))


def test_bad_mask_files_are_one_line(tmp_path):
    assert "no such mask image" in one_line_user_error(lambda: read_region(str(tmp_path / "none.png"), 16))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    assert "cannot be read" in one_line_user_error(lambda: read_region(str(junk), 16))
    black = tmp_path / "black.png"
    Image.new("L", (40, 40), 0).save(black)
    assert "nothing to edit" in one_line_user_error(lambda: read_region(str(black), 16))
    speck = tmp_path / "speck.png"
    arr = np.zeros((64, 64), dtype=np.uint8)
    arr[0, 0] = 255  # 1/16 of a pixel at 16 px
    Image.fromarray(arr).save(speck)
    assert "nothing to edit" in one_line_user_error(lambda: read_region(str(speck), 16))
    white = tmp_path / "white.png"
    Image.new("RGB", (20, 20), (255, 255, 255)).save(white)
    assert "drop --region" in one_line_user_error(lambda: read_region(str(white), 16))


def test_region_evaluation_pools_the_other_factors_per_unit_of_score_change():
    """faces_region's leak per unit: sum of the other factors' changes over the sum of the score's,
    so a face whose score hardly moved does not dominate; NaN when no score moved; and the LOCO
    leakage of a change confined to the inside is 0, of one confined to the outside 1."""
    from scripts.evaluation.faces_region import Measured, largest, leakage

    def measured(others, moved):
        n = len(others)
        return Measured(np.zeros(n), np.zeros(n), np.ones(n, bool), np.asarray(others, float), np.ones(n),
                        np.asarray(moved, float), {"eye_open": np.asarray(others, float), "yaw": np.zeros(n)})

    assert measured([0.2, 0.4], [1.0, 0.001]).other_per_unit() == pytest.approx(0.6 / 1.001)
    assert math.isnan(measured([0.2], [0.0]).other_per_unit())
    summary = measured([0.1, 0.3], [2.0, 2.0]).summary()
    assert summary["other_per_unit"] == pytest.approx(0.1) and summary["score_change"]["median"] == 2.0
    assert summary["other_factor_means"] == pytest.approx({"eye_open": 0.2, "yaw": 0.0})
    assert largest(summary, 1) == "eye_open 0.20"
    recon = torch.zeros(3, 4, 4)
    inside = np.zeros((4, 4), bool)
    inside[:2] = True
    edit_in, edit_out = recon.clone(), recon.clone()
    edit_in[:, :2] = 0.5
    edit_out[:, 2:] = 0.5
    assert leakage(edit_in, recon, inside, ~inside) == 0.0
    assert leakage(edit_out, recon, inside, ~inside) == 1.0
