"""Edit sequences on a tiny random UNet: edits set each latent's projection to its distance, the
identity edit reproduces the reconstruction exactly, and batching never changes a result (per-edit
seeded noise); on a constructed linear network, an edit moves the image along the normal as the
closed form says."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import float_tolerance, max_abs, moves_along, tiny_net
from utils.core.diffusion import invert, make_alphas_cumprod, timestep_grid
from utils.core.boundary import latent_distance
from utils.core.editing import edit_sequence, iter_edits, reconstruct
from utils.core.seeds import EDIT, EVALUATION_NOISE, RADIUS_NOISE, SAMPLE, SAMPLE_EDIT, item_seed


@pytest.fixture(scope="module", params=["ddpm", "adm"])
def setup(request):
    net = tiny_net(request.param, seed=11)
    ac = make_alphas_cumprod(0.0001, 0.02, 1000)
    grid = timestep_grid(300, 5)
    x0 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    inv = invert(net, x0, ac, grid)
    gen = torch.Generator().manual_seed(9)
    normals = {"z": torch.randn(3 * 16 * 16, generator=gen), "h": torch.randn(32 * 8 * 8, generator=gen)}
    normals = {k: v / v.norm() for k, v in normals.items()}
    return net, ac, grid, inv, normals


@pytest.mark.parametrize("h_policy", ["lagged", "once"])
@pytest.mark.parametrize("spaces", [("z",), ("h",), ("z", "h")])
def test_identity_edit_reproduces_reconstruction_exactly(setup, h_policy, spaces):
    net, ac, grid, inv, normals = setup
    recon = reconstruct(net, inv, ac, grid, inject_h="h" in spaces, h_policy=h_policy)
    # A distance equal to the latent's own projection moves nothing, in every edited space.
    n_z, n_h = normals["z"], normals["h"]
    d = latent_distance(inv.z if "z" in spaces else inv.h, n_z if "z" in spaces else n_h)
    if len(spaces) == 2:
        # One distance serves both spaces: tilt the h normal so that h's own projection is d too.
        h = inv.h.reshape(-1).double()
        u = h / h.norm()
        w = n_h.double() - (n_h.double() @ u) * u
        cos = float(d) / float(h.norm())
        assert abs(cos) < 1, "test setup: |d_z| must be below |h|"
        n_h = (cos * u + (1 - cos ** 2) ** 0.5 * w / w.norm()).float()
        assert abs(float(latent_distance(inv.h, n_h)) - float(d)) < 1e-4
    out = edit_sequence(net, inv, ac, grid, *moves_along(d, n_z if "z" in spaces else None,
                                                         n_h if "h" in spaces else None),
                        seeds=[0], eta=0.0, h_policy=h_policy)
    # Bit for bit in one space, by construction: the shift d - v.n is exactly 0 (joint_move and
    # latent_distance take the same row sums), so the edit starts from the very latents of the
    # reconstruction and runs the same calls on the same batch composition (one item), hence the
    # same kernels. In both spaces, h moves by the float32 rounding of the tilted normal.
    tolerance = 0 if len(spaces) == 1 else 1e-5
    assert (out - recon).abs().max() <= tolerance, f"{spaces}: max diff {(out - recon).abs().max().item()}"


@pytest.mark.parametrize("h_policy", ["lagged", "once"])
def test_reconstruction_injects_the_inverted_h_only_when_asked(setup, h_policy):
    net, ac, grid, inv, normals = setup
    overrides, own_h = [], []

    def recording(x, t, h_override=None):
        out, h = net(x, t, h_override=h_override)
        overrides.append(h_override)
        own_h.append(h)
        return out, h

    plain = reconstruct(recording, inv, ac, grid, inject_h=False, h_policy=h_policy)
    assert len(overrides) == len(grid) and all(o is None for o in overrides), "no h may be injected"
    overrides.clear()
    own_h.clear()
    injected = reconstruct(recording, inv, ac, grid, inject_h=True, h_policy=h_policy)
    assert torch.equal(overrides[0], inv.h), "the first call gets the inverted h"
    if h_policy == "once":
        assert all(o is None for o in overrides[1:])
    else:  # each later call gets the previous call's own bottleneck
        assert all(torch.equal(o, h) for o, h in zip(overrides[1:], own_h[:-1]))
    # and injecting the inverted h is not neutral (it comes from the last inversion call, below t_0)
    assert max_abs(injected, plain) > 1e-4


def test_edits_set_each_latents_projection_to_its_distance(setup):
    """z' = z + (d - z.n) n in each edited space: z'.n = d, and the part of z across the normal is kept."""
    net, ac, grid, inv, normals = setup
    distances = torch.tensor([-30.0, -5.0, 0.0, 12.5, 30.0], dtype=torch.float64)
    batches = list(iter_edits(net, inv, ac, grid, *moves_along(distances, normals["z"], normals["h"]), [list(range(5))],
                              eta=0.0, batch_size=2))
    assert [k for b in batches for _, k in b.items] == list(range(5))
    for space, original in (("z", inv.z), ("h", inv.h)):
        n = normals[space].double()
        edited = torch.cat([getattr(b, space) for b in batches]).reshape(5, -1).double()
        v = original.reshape(1, -1).double()
        # Each value is rounded to float32 once or twice: an error of at most eps (|v| + |shift|)
        # along any unit direction.
        tol = float_tolerance(torch.float32, float(v.norm()) + 2 * float(distances.abs().max()), ulps=2)
        projections = edited @ n
        assert torch.allclose(projections, distances, rtol=0, atol=tol), (space, projections - distances)
        across = edited - projections[:, None] * n
        assert torch.allclose(across, (v - (v @ n) * n).expand_as(across), rtol=0, atol=tol), space
    # and the network sees the moves: every distance gives another image
    images = torch.cat([b.images for b in batches])
    for i in range(5):
        for j in range(i):
            assert max_abs(images[i], images[j]) > 1e-3, (i, j)


def _linear_net(x, t, h_override=None):
    """A constructed network whose DDIM path is linear: eps = h_override (h has x's shape) when
    given, else 0; its own h is 0. With eps = 0 a DDIM step from t to t' scales x by
    sqrt(a_t' / a_t), so generating from z at eta 0 gives z / sqrt(a_{t_0})."""
    eps = torch.zeros_like(x) if h_override is None else h_override.reshape(x.shape).to(x.dtype)
    return eps, torch.zeros_like(x)


@pytest.mark.parametrize("space", ["z", "h"])
def test_an_edit_moves_the_image_along_the_normal_by_the_distance(space):
    """On the constructed linear network an edit's effect is known in closed form. Moving z to
    distance d moves the image along n by (d - z.n) / sqrt(a_{t_0}); moving h (the first call's
    eps here) to d moves it along n by c d, c = sqrt((1 - a_t1) / a_t1) - sqrt((1 - a_t0) / a_t0),
    t1 the next grid point below t_0. Either way the image moves along n only, linearly in d."""
    ac = make_alphas_cumprod(0.0001, 0.02, 1000)
    grid = timestep_grid(300, 5)
    x0 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1
    inv = invert(_linear_net, x0, ac, grid)
    n = torch.randn(3 * 16 * 16, generator=torch.Generator().manual_seed(9))
    n = n / n.norm()
    distances = torch.tensor([-30.0, -5.0, 0.0, 12.5, 30.0], dtype=torch.float64)
    recon = reconstruct(_linear_net, inv, ac, grid, inject_h=space == "h")
    out = edit_sequence(_linear_net, inv, ac, grid, *moves_along(distances, n if space == "z" else None,
                                                                 n if space == "h" else None),
                        seeds=list(range(5)), eta=0.0)
    a_t0, a_t1 = ac[grid[-1]], ac[grid[-2]]
    if space == "z":
        shift = (distances - latent_distance(inv.z, n)) / a_t0.sqrt()
    else:
        assert not inv.h.any()  # the network's own h is 0, so the edit sets the first eps to d n
        shift = distances * (((1 - a_t1) / a_t1).sqrt() - ((1 - a_t0) / a_t0).sqrt())
    expected = recon.reshape(1, -1).double() + shift[:, None] * n.double()
    # float32 rounding of each of the len(grid) DDIM steps, at the size of the images
    tol = float_tolerance(torch.float32, float(expected.abs().max()), ulps=4 * len(grid))
    assert torch.allclose(out.reshape(5, -1).double(), expected, rtol=0, atol=tol), \
        (out.reshape(5, -1).double() - expected).abs().max()
    # Hence the image's projection on n is monotone in d: increasing for z, and for h with the
    # sign of c (negative: a larger eps takes more of n away). For z it is d / sqrt(a_{t_0}).
    projections = out.reshape(5, -1).double() @ n.double()
    if space == "z":
        assert torch.allclose(projections, distances / a_t0.sqrt(), rtol=0, atol=tol * n.numel() ** 0.5)
    assert (projections.diff() * shift.diff() > 0).all(), projections


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batched_edits_equal_one_at_a_time(setup, eta):
    net, ac, grid, inv, normals = setup
    distances = torch.linspace(-20, 20, 5)
    seeds = [item_seed(1234, k) for k in range(5)]
    batched = edit_sequence(net, inv, ac, grid, *moves_along(distances, normals["z"], normals["h"]), seeds, eta=eta, batch_size=5)
    ones = edit_sequence(net, inv, ac, grid, *moves_along(distances, normals["z"], normals["h"]), seeds, eta=eta, batch_size=1)
    # Batch 5 and batch 1 may run other convolution kernels: equal up to float32 rounding, which
    # the noise of each edit does not amplify (it depends on (seed, k) only).
    tol = float_tolerance(torch.float32, float(ones.abs().max()), ulps=100)
    assert torch.allclose(batched, ones, rtol=0, atol=tol), (batched - ones).abs().max()
    # The noise of edit k depends on (seed, k) only: a different seed for one edit changes only that edit.
    if eta > 0:
        other = edit_sequence(net, inv, ac, grid, *moves_along(distances, normals["z"], normals["h"]),
                              seeds[:4] + [item_seed(99, 4)], eta=eta, batch_size=2)
        assert torch.allclose(other[:4], ones[:4], rtol=0, atol=tol)
        assert (other[4] - ones[4]).abs().max() > 1e-3


def test_item_seed_follows_the_documented_encoding():
    """The golden values come from np.random.SeedSequence fed the words written out by hand from
    utils/core/seeds.py's docstring: [domain, count, lo, hi of each integer], domain EDIT = 1."""
    def oracle(words):
        return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0]) >> 1
    assert item_seed(1234, 5, 0, 7) == oracle([1, 4, 1234, 0, 5, 0, 0, 0, 7, 0])
    # 2**63 - 1 = 0x7fffffff_ffffffff: low word 2**32 - 1, high word 2**31 - 1; SAMPLE = 3
    assert item_seed(2 ** 63 - 1, 2, domain=SAMPLE) == oracle([3, 2, 2 ** 32 - 1, 2 ** 31 - 1, 2, 0])
    assert item_seed(9, domain=RADIUS_NOISE) == oracle([4, 1, 9, 0])


def test_item_seed_is_injective_where_seed_sequence_is_not():
    # SeedSequence alone: trailing zero words vanish, and a 64-bit integer is split into two words.
    assert np.random.SeedSequence([1234, 5]).generate_state(1) == np.random.SeedSequence([1234, 5, 0]).generate_state(1)
    assert (np.random.SeedSequence([9, 1, 2 ** 32 * 3 + 7]).generate_state(1)
            == np.random.SeedSequence([9, 1, 7, 3]).generate_state(1))
    assert item_seed(1234, 5) != item_seed(1234, 5, 0)
    assert item_seed(1234) != item_seed(1234, 0)
    assert item_seed(9, 1, 2 ** 32 * 3 + 7) != item_seed(9, 1, 7, 3)
    # the old namespace offsets: a sample's noise (then key 10_000 + j) no longer meets an edit key
    assert item_seed(1234, 10_000, domain=EDIT) != item_seed(1234, 10_000, domain=SAMPLE)
    assert len({item_seed(1234, 0, domain=d) for d in (EDIT, SAMPLE_EDIT, SAMPLE, RADIUS_NOISE, EVALUATION_NOISE)}) == 5
    assert len({item_seed(1234, k) for k in range(100)}) == 100
    assert item_seed(1, 2) != item_seed(2, 1)
    for bad in (-1, 2 ** 64):
        with pytest.raises(ValueError):
            item_seed(1234, bad)
