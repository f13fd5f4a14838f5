"""Pins the numerical conventions of utils/core/diffusion.py (docs/algorithm.md section 2) with goldens on tiny inputs,
a recording stand-in network, and exactness / batch-independence properties."""
from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import max_abs
from utils.core.diffusion import (alpha_bar, ddim_step, ddim_trajectory, generate, generation_pairs, invert,
                             inversion_pairs, make_alphas_cumprod, sampling_pairs, timestep_grid)
from utils.core.mixing import radius_curves

BETA_START, BETA_END, T = 0.0001, 0.02, 1000


@pytest.fixture(scope="module")
def ac() -> torch.Tensor:
    return make_alphas_cumprod(BETA_START, BETA_END, T)


def hand_alpha_bar(t: int) -> float:
    """a_t = prod_{s<=t} (1 - beta_s) with betas linear from beta_start to beta_end, in plain Python."""
    prod = 1.0
    for s in range(t + 1):
        prod *= 1.0 - (BETA_START + s * (BETA_END - BETA_START) / (T - 1))
    return prod


class RecordingNet:
    """Stand-in for ``net(x, t, h_override=None) -> (eps, h)``: records t and the override it got.

    eps = 0.1 * x * t / (t + 1) (elementwise, so items of a batch never interact);
    h = a (B, 2, 1, 1) tensor filled with t, so the timestep of the call that made h is readable.
    """

    def __init__(self):
        self.ts: list[int] = []
        self.overrides: list[torch.Tensor | None] = []

    def __call__(self, x, t, h_override=None):
        self.ts.append(t)
        self.overrides.append(h_override)
        eps = 0.1 * x * (t / (t + 1))
        h = torch.full((x.shape[0], 2, 1, 1), float(t), dtype=x.dtype)
        return eps, h


class ConstantEpsNet:
    """eps is a fixed tensor e, independent of x and t."""

    def __init__(self, e: torch.Tensor):
        self.e = e

    def __call__(self, x, t, h_override=None):
        return self.e.expand_as(x).clone(), torch.zeros(x.shape[0], 1, 1, 1, dtype=x.dtype)


# --------------------------------------------------------------------------- timestep grid

def test_timestep_grid_golden_500_40():
    g = timestep_grid(500, 40)
    assert len(g) == 40, f"length {len(g)}"
    assert g[:4] == [0, 12, 25, 38], f"starts {g[:4]}"
    assert g[-3:] == [474, 487, 500], f"ends {g[-3:]}"
    assert all(isinstance(v, int) for v in g), f"types {set(type(v) for v in g)}"


def test_timestep_grid_truncates_toward_zero():
    # linspace(0, 1, 4) * 10 = [0, 3.33, 6.67, 10] -> truncation gives 6, not the rounded 7
    assert timestep_grid(10, 4) == [0, 3, 6, 10], f"got {timestep_grid(10, 4)}"


@pytest.mark.parametrize("n", [1, 0, -3])
def test_timestep_grid_needs_two_points(n):
    with pytest.raises(ValueError):
        timestep_grid(500, n)


# --------------------------------------------------------------------------- schedule

def test_alphas_cumprod_dtype_and_length(ac):
    assert ac.dtype == torch.float64, f"dtype {ac.dtype}"
    assert ac.shape == (T,), f"shape {tuple(ac.shape)}"


@pytest.mark.parametrize("t", [0, 499, 999])
def test_alpha_bar_matches_hand_product(ac, t):
    expected = hand_alpha_bar(t)
    got = alpha_bar(ac, t)
    assert got.dtype == torch.float64, f"dtype {got.dtype}"
    assert abs(float(got) - expected) <= 1e-12 * expected, f"a_{t} = {float(got)!r}, hand product {expected!r}"


def test_alpha_bar_at_zero_is_one_minus_beta_start(ac):
    assert abs(float(alpha_bar(ac, 0)) - (1 - 1e-4)) < 1e-15, f"a_0 = {float(alpha_bar(ac, 0))!r}"


def test_alpha_bar_clean_is_one(ac):
    got = alpha_bar(ac, -1)
    assert float(got) == 1.0 and got.dtype == torch.float64, f"a_-1 = {got!r}"


@pytest.mark.parametrize("t", [-2, T])
def test_alpha_bar_out_of_range_raises(ac, t):
    with pytest.raises(ValueError):
        alpha_bar(ac, t)


# --------------------------------------------------------------------------- ddim_step goldens

def _x_eps_noise():
    x = torch.arange(8, dtype=torch.float64).reshape(2, 1, 2, 2) / 4 - 1      # -1, -0.75, ..., 0.75
    eps = torch.arange(8, dtype=torch.float64).reshape(2, 1, 2, 2) / 8 - 0.5  # -0.5, ..., 0.375
    noise = (torch.arange(8, dtype=torch.float64).reshape(2, 1, 2, 2) - 3.5) / 2
    return x, eps, noise


def _hand_eta0(x, e, a, an):
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    return math.sqrt(an) * x0 + math.sqrt(1 - an) * e


def _hand_eta(x, e, n, a, an, eta):
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    c1 = eta * math.sqrt((1 - a / an) * (1 - an) / (1 - a))
    c2 = math.sqrt(1 - an - c1 ** 2)
    return math.sqrt(an) * x0 + c2 * e + c1 * n


@pytest.mark.parametrize("a_t, a_next", [(0.6, 0.9), (0.9, 0.6)])  # denoising and inverting
def test_ddim_step_eta0_golden(a_t, a_next):
    x, eps, _ = _x_eps_noise()
    out = ddim_step(x, eps, torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_next, dtype=torch.float64))
    assert out.shape == x.shape
    for idx in [(0, 0, 0, 1), (1, 0, 1, 0), (1, 0, 1, 1)]:
        expected = _hand_eta0(float(x[idx]), float(eps[idx]), a_t, a_next)
        assert abs(float(out[idx]) - expected) < 1e-12, f"out{idx} = {float(out[idx])!r}, hand {expected!r}"


def test_ddim_step_eta0_literal_value():
    # x = 0.5, e = 0.25, a_t = 0.5, a_next = 0.75: x0 = (0.5 - sqrt(.5)/4)/sqrt(.5) = 0.45710678...
    # out = sqrt(.75) * x0 + 0.5 * 0.25 = 0.52086608...
    out = ddim_step(torch.tensor([[[[0.5]]]], dtype=torch.float64), torch.tensor([[[[0.25]]]], dtype=torch.float64),
                    torch.tensor(0.5, dtype=torch.float64), torch.tensor(0.75, dtype=torch.float64))
    assert abs(float(out) - 0.5208660847496849) < 1e-12, f"got {float(out)!r}"


def test_ddim_step_eta_half_golden_with_given_noise():
    x, eps, noise = _x_eps_noise()
    a_t, a_next, eta = 0.6, 0.9, 0.5
    out = ddim_step(x, eps, torch.tensor(a_t, dtype=torch.float64), torch.tensor(a_next, dtype=torch.float64),
                    eta=eta, noise=noise)
    for idx in [(0, 0, 0, 0), (0, 0, 1, 1), (1, 0, 0, 1)]:
        expected = _hand_eta(float(x[idx]), float(eps[idx]), float(noise[idx]), a_t, a_next, eta)
        assert abs(float(out[idx]) - expected) < 1e-12, f"out{idx} = {float(out[idx])!r}, hand {expected!r}"
    # and the noise really enters: eta 0.5 differs from eta 0
    assert max_abs(out, ddim_step(x, eps, torch.tensor(a_t), torch.tensor(a_next))) > 1e-3


def test_ddim_step_per_item_alphas_broadcast():
    x, eps, _ = _x_eps_noise()
    a_t = torch.tensor([0.6, 0.3], dtype=torch.float64).view(2, 1, 1, 1)
    a_next = torch.tensor([0.9, 0.8], dtype=torch.float64).view(2, 1, 1, 1)
    out = ddim_step(x, eps, a_t, a_next)
    for idx in [(0, 0, 1, 0), (1, 0, 0, 1)]:
        b = idx[0]
        expected = _hand_eta0(float(x[idx]), float(eps[idx]), float(a_t[b]), float(a_next[b]))
        assert abs(float(out[idx]) - expected) < 1e-12, f"out{idx} = {float(out[idx])!r}, hand {expected!r}"


def test_ddim_step_keeps_input_dtype():
    x, eps, _ = _x_eps_noise()
    out = ddim_step(x.float(), eps.float(), torch.tensor(0.6), torch.tensor(0.9))
    assert out.dtype == torch.float32, f"dtype {out.dtype}"


def test_ddim_step_last_move_to_clean_returns_x0_hat(ac):
    # (0 -> -1): a_next = 1, so x_{-1} = x0_hat, for eta 0 and for eta 1 (c1 = c2 = 0 there)
    x, eps, noise = _x_eps_noise()
    a0 = alpha_bar(ac, 0)
    x0_hat = (x - (1 - a0).sqrt() * eps) / a0.sqrt()
    for eta in (0.0, 1.0):
        out = ddim_step(x, eps, a0, alpha_bar(ac, -1), eta=eta, noise=noise)
        assert max_abs(out, x0_hat) < 1e-12, f"eta={eta}: max diff {max_abs(out, x0_hat)}"


def test_ddim_step_eta_toward_noise_raises():
    x, eps, noise = _x_eps_noise()
    with pytest.raises(ValueError):
        ddim_step(x, eps, torch.tensor(0.9), torch.tensor(0.6), eta=0.5, noise=noise)


def test_ddim_step_eta_without_noise_raises():
    x, eps, _ = _x_eps_noise()
    with pytest.raises(ValueError):
        ddim_step(x, eps, torch.tensor(0.6), torch.tensor(0.9), eta=0.5)


# --------------------------------------------------------------------------- pairs

def test_inversion_and_generation_pairs_exact():
    grid = [0, 3, 6, 10]
    assert inversion_pairs(grid) == [(0, 3), (3, 6), (6, 10)], f"got {inversion_pairs(grid)}"
    assert generation_pairs(grid) == [(10, 6), (6, 3), (3, 0), (0, -1)], f"got {generation_pairs(grid)}"


def test_generation_pairs_length_and_sentinel():
    grid = timestep_grid(500, 40)
    pairs = generation_pairs(grid)
    assert len(pairs) == 40 and pairs[0] == (500, 487) and pairs[-1] == (0, -1), f"{len(pairs)} {pairs[:1]} {pairs[-1:]}"
    assert len(inversion_pairs(grid)) == 39


@pytest.mark.parametrize("n_steps", [500, 501])
def test_sampling_pairs_visit_every_integer(n_steps):
    pairs = sampling_pairs(1000, 500, n_steps)
    visited = [pairs[0][0]] + [b for _, b in pairs]
    assert visited == list(range(999, 499, -1)), f"first {visited[:4]}, last {visited[-4:]}, len {len(visited)}"
    assert all(a == b + 1 for a, b in pairs)


def test_sampling_pairs_needs_two_points():
    with pytest.raises(ValueError):
        sampling_pairs(1000, 500, 1)


# --------------------------------------------------------------------------- the loops, with a recording net

GRID = [0, 10, 20, 30]


def test_invert_evaluates_at_lower_timestep_and_keeps_last_h(ac):
    net = RecordingNet()
    x0 = torch.linspace(-1, 1, 2 * 3 * 2 * 2, dtype=torch.float64).reshape(2, 3, 2, 2)
    inv = invert(net, x0, ac, GRID)
    assert net.ts == [0, 10, 20], f"calls at {net.ts}"
    assert all(o is None for o in net.overrides), f"overrides {net.overrides}"
    assert inv.h.shape == (2, 2, 1, 1) and torch.all(inv.h == 20.0), f"h holds {inv.h.flatten().tolist()}"
    # z is the DDIM chain, step by step
    x = x0
    for t, tn in [(0, 10), (10, 20), (20, 30)]:
        x = ddim_step(x, 0.1 * x * (t / (t + 1)), alpha_bar(ac, t), alpha_bar(ac, tn))
    assert max_abs(inv.z, x) < 1e-12, f"max diff {max_abs(inv.z, x)}"


def test_invert_h_from_call_at_487_on_real_grid(ac):
    net = RecordingNet()
    inv = invert(net, torch.zeros(1, 1, 1, 1, dtype=torch.float64), ac, timestep_grid(500, 40))
    assert net.ts[-1] == 487 and 500 not in net.ts, f"last calls {net.ts[-3:]}"
    assert float(inv.h.flatten()[0]) == 487.0, f"h from t={float(inv.h.flatten()[0])}"


def test_generate_first_call_at_t0_and_makes_S_calls(ac):
    net = RecordingNet()
    generate(net, torch.ones(1, 1, 2, 2, dtype=torch.float64), ac, GRID)
    assert net.ts == [30, 20, 10, 0], f"calls at {net.ts}"
    assert all(o is None for o in net.overrides), f"overrides {net.overrides}"


def _override_values(overrides):
    return [None if o is None else float(o.flatten()[0]) for o in overrides]


def test_generate_lagged_policy_passes_previous_own_h(ac):
    net = RecordingNet()
    h_edit = torch.full((1, 2, 1, 1), -7.0, dtype=torch.float64)
    generate(net, torch.ones(1, 1, 2, 2, dtype=torch.float64), ac, GRID, h_edit=h_edit, h_policy="lagged")
    assert net.overrides[0] is h_edit, f"first override {net.overrides[0]}"
    assert _override_values(net.overrides) == [-7.0, 30.0, 20.0, 10.0], f"got {_override_values(net.overrides)}"


def test_generate_once_policy_overrides_only_first_call(ac):
    net = RecordingNet()
    h_edit = torch.full((1, 2, 1, 1), -7.0, dtype=torch.float64)
    generate(net, torch.ones(1, 1, 2, 2, dtype=torch.float64), ac, GRID, h_edit=h_edit, h_policy="once")
    assert _override_values(net.overrides) == [-7.0, None, None, None], f"got {_override_values(net.overrides)}"


def test_generate_default_policy_is_lagged(ac):
    net = RecordingNet()
    h_edit = torch.full((1, 2, 1, 1), -7.0, dtype=torch.float64)
    generate(net, torch.ones(1, 1, 2, 2, dtype=torch.float64), ac, GRID, h_edit=h_edit)
    assert _override_values(net.overrides) == [-7.0, 30.0, 20.0, 10.0], f"got {_override_values(net.overrides)}"


def test_generate_unknown_policy_raises(ac):
    net = RecordingNet()
    with pytest.raises(ValueError, match="policy"):
        generate(net, torch.ones(1, 1, 2, 2), ac, GRID, h_edit=torch.zeros(1, 2, 1, 1), h_policy="always")
    assert net.ts == [], f"the network was called at {net.ts} before the policy was checked"


def test_trajectory_uses_only_first_channels_of_learned_variance_output(ac):
    # a 2C-channel output (improved-DDPM): only the first C channels are eps
    def net(x, t, h_override=None):
        return torch.cat([0.1 * x, torch.full_like(x, 1e6)], dim=1), torch.zeros(x.shape[0], 1, 1, 1)

    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(1, 3, 2, 2)
    out = list(ddim_trajectory(net, x, ac, [(10, 20)]))[-1].x
    expected = ddim_step(x, 0.1 * x, alpha_bar(ac, 10), alpha_bar(ac, 20))
    assert max_abs(out, expected) < 1e-12, f"max diff {max_abs(out, expected)}"


# --------------------------------------------------------------------------- exactness

def _sample(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("grid", [[0, 10, 20, 30], timestep_grid(500, 40), timestep_grid(999, 7)])
def test_invert_then_generate_with_constant_eps_is_x0_hat(ac, grid):
    x = _sample((2, 3, 4, 4), 0)
    e = _sample((1, 3, 4, 4), 1)
    net = ConstantEpsNet(e)
    out = generate(net, invert(net, x, ac, grid).z, ac, grid)
    a0 = float(alpha_bar(ac, 0))
    expected = (x - math.sqrt(1 - a0) * e) / math.sqrt(a0)
    assert out.dtype == torch.float64
    assert max_abs(out, expected) < 1e-10, f"max diff {max_abs(out, expected)}"


def test_trajectory_up_then_back_down_returns_x(ac):
    grid = timestep_grid(500, 40)
    x = _sample((2, 3, 4, 4), 2)
    net = ConstantEpsNet(_sample((1, 3, 4, 4), 3))
    up = list(ddim_trajectory(net, x, ac, inversion_pairs(grid)))
    down_pairs = generation_pairs(grid)[:-1]
    assert down_pairs == [(b, a) for a, b in reversed(inversion_pairs(grid))]
    down = list(ddim_trajectory(net, up[-1].x, ac, down_pairs))
    assert down[-1].t == 0 and max_abs(down[-1].x, x) < 1e-10, f"t={down[-1].t}, max diff {max_abs(down[-1].x, x)}"
    assert max_abs(up[-1].x, x) > 1e-2  # the walk did move


# --------------------------------------------------------------------------- randomness

def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_batch_equals_items_one_by_one_with_eta_1(ac):
    net = RecordingNet()
    z = _sample((3, 3, 4, 4), 4)
    pairs = generation_pairs([0, 10, 20, 30])
    seeds = [11, 12, 13]
    batch = list(ddim_trajectory(net, z, ac, pairs, eta=1.0, generators=_gens(seeds)))[-1].x
    for i, s in enumerate(seeds):
        single = list(ddim_trajectory(net, z[i:i + 1], ac, pairs, eta=1.0, generators=_gens([s])))[-1].x
        # Bit for bit by construction: the stand-in net and the DDIM step are float64 elementwise
        # arithmetic, and item i's noise comes from its own generator whatever the batch.
        assert max_abs(batch[i:i + 1], single) == 0.0, f"item {i}: max diff {max_abs(batch[i:i + 1], single)}"
    # and the noise is there: a different seed gives a different result
    other = list(ddim_trajectory(net, z[:1], ac, pairs, eta=1.0, generators=_gens([99])))[-1].x
    assert max_abs(other, batch[:1]) > 1e-3


def test_trajectory_eta_without_generators_raises(ac):
    with pytest.raises(ValueError):
        list(ddim_trajectory(RecordingNet(), torch.zeros(2, 1, 2, 2), ac, [(20, 10)], eta=1.0))


def test_trajectory_wrong_number_of_generators_raises(ac):
    with pytest.raises(ValueError):
        list(ddim_trajectory(RecordingNet(), torch.zeros(2, 1, 2, 2), ac, [(20, 10)], eta=1.0,
                             generators=_gens([1])))


# --------------------------------------------------------------------------- mixing step (utils/core/mixing.py)

class LinearEpsNet:
    """eps = k x: every DDIM move (eta 0) from t to t' scales x by the scalar
    f(t, t') = sqrt(a_t' / a_t) (1 - k sqrt(1 - a_t)) + k sqrt(1 - a_t'), so radii have a closed form."""

    def __init__(self, k: float):
        self.k = k

    def __call__(self, x, t, h_override=None):
        return self.k * x, torch.zeros(x.shape[0], 1, 1, 1, dtype=x.dtype)


def test_radius_curves_and_mixing_step_golden(ac):
    ts = [0, 250, 500, 750, 999]
    d = 3 * 4 * 4
    images = torch.cat([torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), -0.25)]).double()
    noise = torch.ones(2, 3, 4, 4, dtype=torch.float64)

    def move(t, t_next, k=1.0):
        a, a_next = hand_alpha_bar(t), hand_alpha_bar(t_next)
        return math.sqrt(a_next / a) * (1 - k * math.sqrt(1 - a)) + k * math.sqrt(1 - a_next)

    # By hand, in plain Python: inverted radii walk up from mean ||x0|| = 0.375 sqrt(d), sampled
    # radii walk down from ||x_{T-1}|| = sqrt(d).
    inverted = [0.375 * math.sqrt(d)]
    for t, t_next in zip(ts, ts[1:]):
        inverted.append(inverted[-1] * abs(move(t, t_next)))
    sampled = [math.sqrt(d)]
    for t, t_next in zip(ts[::-1], ts[::-1][1:]):
        sampled.append(sampled[-1] * abs(move(t, t_next)))
    sampled.reverse()
    mean_sq = (0.25 + 0.0625) / 2 * d
    analytic = [math.sqrt(hand_alpha_bar(t) * mean_sq + (1 - hand_alpha_bar(t)) * d) for t in ts]

    out = radius_curves(LinearEpsNet(1.0), images, noise, ac, ts, epsilon=0.35, batch_size=1)
    assert out["t"] == ts
    # float64 throughout; the code and the plain-Python walk round differently in the last bits
    tol = 1e-12
    for key, want in (("radius_inverted", inverted), ("radius_sampled", sampled), ("radius_analytic", analytic)):
        got = out[key]
        assert all(abs(g - w) <= tol * abs(w) for g, w in zip(got, want)), f"{key}: {got} vs {want}"
    # The relative differences, against literal values to four places as a fixed reference:
    want = [0.1175, 0.3134, 0.4111, 0.4261, 0.4268]
    assert all(abs(g - w) < 1e-4 for g, w in zip(out["relative_difference"], want)), out["relative_difference"]
    # t_m: the largest t at which the difference is at most epsilon (here 250, not the last candidate)
    assert out["t_m"] == 250
    assert radius_curves(LinearEpsNet(1.0), images, noise, ac, ts, epsilon=0.1)["t_m"] is None
    assert radius_curves(LinearEpsNet(1.0), images, noise, ac, ts, epsilon=0.5)["t_m"] == 999


def test_ddim_step_clips_x0_hat_only_when_asked():
    """clip_x0 (sampling from noise only): x0_hat clipped to [-1, 1] and the noise recomputed from it,
    x_{t'} = sqrt(a') clip(x0_hat) + sqrt(1 - a') (x_t - sqrt(a) clip(x0_hat)) / sqrt(1 - a)."""
    a, a_next = torch.tensor(0.04, dtype=torch.float64), torch.tensor(0.09, dtype=torch.float64)
    x = torch.tensor([[[[0.5, -0.5]]]], dtype=torch.float64)
    eps = torch.tensor([[[[-2.0, 0.1]]]], dtype=torch.float64)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()  # 12.298..., -2.9874...: both beyond [-1, 1]
    clipped = x0.clamp(-1, 1)
    expected = a_next.sqrt() * clipped + (1 - a_next).sqrt() * (x - a.sqrt() * clipped) / (1 - a).sqrt()
    assert torch.allclose(ddim_step(x, eps, a, a_next, clip_x0=True), expected, atol=1e-12)
    assert torch.allclose(ddim_step(x, eps, a, a_next), a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, atol=1e-12)
