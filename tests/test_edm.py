import math
from statistics import NormalDist

import pytest
import torch

from loopdb.maths import edm
from loopdb.maths.partition import BlockPartition, sigma_boundaries
from loopdb.maths.sampler import run_sampler

SCHEDULE = edm.NoiseSchedule()


@pytest.mark.parametrize(
    "num_blocks, expected",
    [
        (2, [0.002, 0.3012, 80.0]),
        (3, [0.002, 0.1796, 0.5050, 80.0]),
        (4, [0.002, 0.1341, 0.3012, 0.6766, 80.0]),  # docs/method.md#edm
    ],
)
def test_equiprobability_boundaries(num_blocks, expected):
    assert sigma_boundaries(SCHEDULE, num_blocks) == pytest.approx(expected, abs=1e-4)


def test_equiprobability_ranges_hold_equal_mass():
    bounds = sigma_boundaries(SCHEDULE, 5)
    masses = [SCHEDULE.cdf(hi) - SCHEDULE.cdf(lo) for lo, hi in zip(bounds, bounds[1:])]
    assert masses == pytest.approx([masses[0]] * 5, rel=1e-9)


def test_uniform_partition_is_uniform_in_log_sigma():
    bounds = sigma_boundaries(SCHEDULE, 4, "uniform")
    widths = [math.log(hi / lo) for lo, hi in zip(bounds, bounds[1:])]
    assert widths == pytest.approx([widths[0]] * 4)


def test_block_zero_owns_the_highest_range_and_overlap_widens_it():
    bounds = sigma_boundaries(SCHEDULE, 4)
    assert BlockPartition(bounds).training_range(0) == pytest.approx((0.6766, 80.0), abs=1e-4)
    assert BlockPartition(bounds).training_range(3) == pytest.approx((0.002, 0.1341), abs=1e-4)
    lo, hi = BlockPartition(bounds, 0.1).training_range(1)
    width = math.log(0.6766 / 0.3012)
    assert math.log(lo) == pytest.approx(math.log(0.3012) - 0.1 * width, abs=1e-3)
    assert math.log(hi) == pytest.approx(math.log(0.6766) + 0.1 * width, abs=1e-3)
    assert BlockPartition(bounds, 0.1).training_range(0)[1] == 80.0  # clipped to the global range
    assert [BlockPartition(bounds).owner(s) for s in (50.0, 0.5, 0.2, 0.01)] == [0, 1, 2, 3]


def test_truncated_lognormal_matches_its_distribution():
    sigma = SCHEDULE.sample_sigmas(200_000, torch.Generator().manual_seed(0))
    assert sigma.min() >= 0.002 and sigma.max() <= 80.0
    log_sigma = sigma.double().log()
    # the truncation removes almost nothing here, so the moments are the log-normal's
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.01)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.01)
    inside = SCHEDULE.sample_sigmas(50_000, torch.Generator().manual_seed(1), lo=0.3, hi=0.7)
    assert inside.min() >= 0.3 and inside.max() <= 0.7
    # the median of the renormalised range is the quantile midpoint
    q_mid = (NormalDist().cdf((math.log(0.3) + 1.2) / 1.2) + NormalDist().cdf((math.log(0.7) + 1.2) / 1.2)) / 2
    median = math.exp(-1.2 + 1.2 * NormalDist().inv_cdf(q_mid))
    assert inside.median().item() == pytest.approx(median, rel=0.01)


def test_preconditioning_and_weight():
    sigma, sd = torch.tensor([0.5]), 0.5
    pre = edm.precondition(sigma, sd)
    assert pre.c_skip.item() == pytest.approx(0.5)
    assert pre.c_out.item() == pytest.approx(0.25 / math.sqrt(0.5))
    assert pre.c_in.item() == pytest.approx(1 / math.sqrt(0.5))
    assert pre.c_noise.item() == pytest.approx(math.log(0.5) / 4)
    assert edm.loss_weight(sigma, sd).item() == pytest.approx(0.5 / 0.0625)
    assert edm.loss_weight(torch.tensor([0.002]), sd, clamp=100.0).item() == 100.0
    assert edm.loss_weight(sigma, sd, "unit").item() == 1.0


@pytest.mark.parametrize("kind", ["equiprob", "karras"])
def test_grids_are_descending_from_sigma_max_and_computed_from_t(kind):
    for steps in (2, 3, 8, 33):
        grid = edm.sigma_grid(steps, SCHEDULE, kind)
        assert len(grid) == steps and grid[0] == 80.0 and grid[-1] == 0.002
        assert all(a > b for a, b in zip(grid, grid[1:]))
    assert edm.sigma_grid(1, SCHEDULE, kind) == [80.0]  # a direct prediction, never a lone sigma_min
    assert edm.sigma_grid(4, SCHEDULE, kind, sigma_last=0.3)[-1] == 0.3
    with pytest.raises(ValueError, match=">= 1"):
        edm.sigma_grid(0, SCHEDULE, kind)


def test_equiprob_grid_with_t_equal_b_hits_the_partition():
    # the interior points of a 5-point grid are the B=4 boundaries
    assert edm.sigma_grid(5, SCHEDULE)[::-1] == pytest.approx(sigma_boundaries(SCHEDULE, 4), abs=1e-9)


def test_euler_step_moves_toward_the_denoised_estimate():
    z, target = torch.tensor([10.0]), torch.tensor([1.0])
    stepped = edm.euler_step(z, target, sigma=2.0, sigma_next=1.0)
    assert stepped.item() == pytest.approx(5.5)  # z + (1-2) * (10-1)/2
    assert abs(stepped - target) < abs(z - target)
    assert edm.euler_step(z, target, 2.0, 0.0).item() == pytest.approx(1.0)  # lands on D at sigma 0


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_sampler_recovers_a_point_mass_with_an_exact_denoiser(solver):
    # data = a single point y: the exact denoiser is D(z, sigma) = y for every sigma
    y = torch.tensor([0.3, -0.7])
    z = edm.initial_state((2,), 80.0, 0.5, torch.Generator().manual_seed(0))
    grid = edm.sigma_grid(6, SCHEDULE) + [0.0]
    result = run_sampler(lambda state, sigma: (y, state), z, grid, solver)
    assert torch.allclose(result, y, atol=1e-5)


def test_heun_converges_at_second_order_euler_at_first():
    # data ~ N(0, sd^2): exact denoiser D = z * sd^2 / (sd^2 + sigma^2); the ODE maps z0 to z0 * sd / sqrt(sd^2+s0^2)
    sd, z0 = 0.5, torch.tensor([3.0])
    denoise = lambda state, sigma: (state * sd**2 / (sd**2 + sigma**2), state)  # noqa: E731
    exact = z0 * sd / math.sqrt(sd**2 + 80.0**2)

    def error(solver, steps):
        return abs(run_sampler(denoise, z0, edm.sigma_grid(steps, SCHEDULE, "karras") + [0.0], solver) - exact).item()

    assert error("euler", 16) / error("euler", 32) == pytest.approx(2.0, rel=0.15)
    assert error("heun", 16) / error("heun", 32) > 3.5
    assert error("heun", 32) < error("euler", 32)
