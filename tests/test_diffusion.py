"""Schedules, samplers and per-sample noise of bench.diffusion, checked against known answers.

Data x0 ~ N(MU, S^2) per dimension has the exact noise predictor
eps*(x_t, t) = sigma_t (x_t - alpha_t MU) / (alpha_t^2 S^2 + sigma_t^2), and an exact ODE map between
any two times (affine per dimension). Samplers are checked three ways: their affine map against the
exact one, Monte-Carlo moments against the exact marginal, and pinned outputs produced by the
official implementations (U-ViT, DPM-Solver, DDIM) with the same predictor. A wrong predictor
(eps * 0.5) must fail every tolerance.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from bench.diffusion import (SAMPLERS, SCHEDULES, DiscreteSchedule, NoiseSource, VPSDE, ddim_timesteps,
                             diffusion_training_inputs, dpm_time_steps)
from bench.diffusion.noise import _i64, _mix, _mix_int
from bench.diffusion.samplers import singlestep_orders
from bench.registry import UnknownNameError

MU = torch.tensor([1.5, -0.5, 0.0, 3.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 2.0, 0.2], dtype=torch.float64)
F64 = torch.float64
SCHEDULE_NAMES = ["vp", "linear", "scaled_linear"]


def schedule(name):
    return SCHEDULES.get(name)()


def gaussian_eps(sch, scale=1.0, calls=None):
    """The optimal noise predictor for N(MU, S^2) data (times `scale`, to build a wrong one)."""

    def eps_fn(x, model_t):
        assert model_t.shape == (x.shape[0],) and model_t.dtype == torch.float32
        if calls is not None:
            calls.append(model_t.clone())
        t = sch.from_model_time(model_t[:1].double())  # all samples share t in these samplers
        a, s = sch.alpha(t), sch.sigma(t)
        eps = s * (x.double() - a * MU) / (a**2 * S**2 + s**2)
        return (scale * eps).to(x.dtype)

    return eps_fn


def marginal(sch, t):
    """Mean and std of x_t per dimension."""
    a, s = sch.alpha(t), sch.sigma(t)
    return a * MU, torch.sqrt(a**2 * S**2 + s**2)


def exact_map(sch, t_from, t_to):
    """The probability-flow ODE map x_to = gain * x_from + offset (affine for Gaussian data)."""
    m0, r0 = marginal(sch, t_from)
    m1, r1 = marginal(sch, t_to)
    return r1 / r0, m1 - r1 / r0 * m0


def affine_of(name, sch, steps, scale=1.0, **options):
    """The sampler's own map x_T -> x_0, read off from x_T = 0 and x_T = 1 (float64)."""
    x = torch.stack([torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)])
    out = SAMPLERS.get(name)(gaussian_eps(sch, scale), sch, None, (4,), steps, x_init=x, dtype=F64, **options)
    return out[1] - out[0], out[0]


def time_range(name, sch, steps, options):
    """The (start, end) times that a sampler walks."""
    if name == "ddim":
        first = ddim_timesteps(sch.num_steps, steps, options.get("skip", "uniform"))[-1]
        return (first + 1) / sch.num_steps, 0.0
    if name == "euler_maruyama":
        return 1.0, 0.0
    return 1.0, options.get("t_end", sch.t_end)


# ------------------------------------------------------------------------------------------------
# Noise
# ------------------------------------------------------------------------------------------------

def test_noise_does_not_depend_on_batch_or_position():
    shape = (3, 4, 4)
    alone = NoiseSource(11, [5])
    for pos in range(8):
        others = [100 + j for j in range(7)]
        batch = NoiseSource(11, others[:pos] + [5] + others[pos:])
        assert torch.equal(batch.initial(shape)[pos], alone.initial(shape)[0])
        assert torch.equal(batch.step(7, shape)[pos], alone.step(7, shape)[0])
    assert torch.equal(NoiseSource(11, range(8)).subset([5]).step(3, shape), alone.step(3, shape))
    assert torch.equal(NoiseSource.range(11, 4, 3).initial(shape)[1], alone.initial(shape)[0])


def test_noise_differs_by_seed_index_and_step():
    shape = (16,)
    base = NoiseSource(0, [0]).initial(shape)
    for other in (NoiseSource(1, [0]).initial(shape), NoiseSource(0, [1]).initial(shape),
                  NoiseSource(0, [0]).step(0, shape), NoiseSource(0, [0]).step(1, shape)):
        assert not torch.allclose(base, other)
    # element j depends only on j: a longer draw starts with the shorter one
    assert torch.equal(NoiseSource(0, [3]).step(2, (7,)), NoiseSource(0, [3]).step(2, (10,))[:, :7])


def test_noise_hash_wraps_like_unsigned_64_bit():
    rng = np.random.default_rng(0)
    vals = [int(v) for v in rng.integers(0, 2**63, 500, dtype=np.int64)] + [2**64 - 1, 2**63, 0, 1]
    got = _mix(torch.tensor([_i64(v) for v in vals], dtype=torch.int64))
    assert [g & (2**64 - 1) for g in got.tolist()] == [_mix_int(v) for v in vals]


def test_noise_is_standard_normal_and_uncorrelated():
    src = NoiseSource(2024, range(512))
    z = src.step(0, (400,)).double()  # 204,800 numbers
    flat = z.flatten()
    n = flat.numel()
    assert abs(flat.mean()) < 4 / math.sqrt(n)
    assert abs(flat.std() - 1) < 4 / math.sqrt(2 * n)
    assert abs((flat**4).mean() - 3) < 0.05
    xs = torch.sort(flat).values  # Kolmogorov-Smirnov distance to the normal CDF
    cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
    ks = torch.max(torch.abs(cdf - torch.arange(1, n + 1, dtype=F64) / n))
    assert ks < 1.63 / math.sqrt(n)  # 1% critical value
    z2 = src.step(1, (400,)).double()
    for a, b in [(z[:, 1:], z[:, :-1]), (z[1:], z[:-1]), (z, z2)]:  # elements, samples, steps
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(corr) < 4 / math.sqrt(a.numel())


def test_noise_cost_is_small():
    """Per-step noise for 64 samples of 3x32x32 costs a few torch.randn of the same size (best of 5)."""
    src, shape = NoiseSource(0, range(64)), (3, 32, 32)

    def best(fn):
        times = []
        for k in range(5):
            start = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda k: src.step(k, shape))  # both under conftest.py's thread setting
    plain = best(lambda k: torch.randn(64, *shape))
    print(f"noise: {ours * 1e3:.2f} ms per step (torch.randn: {plain * 1e3:.2f} ms)")
    assert ours < 25 * plain + 1e-3


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------

def test_vp_matches_uvit_sde():
    vp = VPSDE()
    t = torch.linspace(0, 1, 101, dtype=F64)
    alpha_bar = torch.exp(-(0.1 * t + (20 - 0.1) * t**2 / 2))  # U-ViT sde.VPSDE.cum_alpha
    assert torch.allclose(vp.alpha(t) ** 2, alpha_bar, rtol=1e-12)
    assert torch.allclose(vp.sigma(t) ** 2, 1 - alpha_bar, rtol=1e-10, atol=1e-15)
    assert torch.allclose(vp.beta(t), 0.1 + t * 19.9)
    assert vp.model_time(t).dtype == torch.float32 and torch.allclose(vp.model_time(t), (999 * t).float())
    assert torch.allclose(vp.from_model_time(999 * t), t)
    inner = t[1:]
    assert torch.allclose(vp.inverse_lambda(vp.lambda_(inner)), inner, rtol=1e-10)
    h = 1e-6  # beta = -2 d log(alpha) / dt
    mid = torch.linspace(0.01, 0.99, 17, dtype=F64)
    assert torch.allclose(-2 * (vp.log_alpha(mid + h) - vp.log_alpha(mid - h)) / (2 * h), vp.beta(mid), rtol=1e-6)
    assert vp.t_end == 1e-3 and vp.t_start == 1.0


@pytest.mark.parametrize("name", ["linear", "scaled_linear"])
def test_discrete_schedule_knots(name):
    sch = schedule(name)
    n = torch.arange(1000)
    t_n = sch.index_to_time(n)
    assert torch.allclose(sch.alpha(t_n) ** 2, torch.cumprod(1 - sch.betas, 0), rtol=1e-12)
    assert float(sch.alpha(0.0)) == 1.0 and float(sch.sigma(0.0)) == 0.0
    assert torch.equal(sch.model_time(t_n), n.float())  # DDIM's integer time input, float32
    t = torch.linspace(1e-3, 1, 777, dtype=F64)
    assert torch.allclose(sch.inverse_lambda(sch.lambda_(t)), t, rtol=1e-9)
    assert float(sch.lambda_(1.0)) > -5.1  # DPM-Solver's numerical_clip_alpha would be a no-op
    slope = -torch.log1p(-sch.betas) * 1000  # -2 d log(alpha)/dt on each segment
    assert torch.allclose(sch.beta(t_n), slope, rtol=1e-9)
    assert torch.allclose(sch.beta(t_n - 0.4e-3), slope, rtol=1e-9)
    if name == "linear":
        assert torch.allclose(sch.betas, torch.from_numpy(np.linspace(1e-4, 0.02, 1000)))
    else:
        assert torch.allclose(sch.betas, torch.from_numpy(np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2))
    uvit = DiscreteSchedule(sch.betas, time_offset=1)  # U-ViT discrete checkpoints: input n + 1 = N t
    assert torch.equal(uvit.model_time(t_n), (n + 1).float())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_training_inputs(name):
    sch = schedule(name)
    x0 = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    inp = diffusion_training_inputs(sch, x0, torch.Generator().manual_seed(1))
    again = diffusion_training_inputs(sch, x0, torch.Generator().manual_seed(1))
    assert torch.equal(inp.x_t, again.x_t) and torch.equal(inp.t, again.t)
    assert inp.model_t.dtype == torch.float32 and inp.model_t.shape == (4096,)
    a, s = sch.alpha(inp.t).float()[:, None], sch.sigma(inp.t).float()[:, None]
    assert torch.allclose(inp.x_t, a * x0 + s * inp.noise, atol=1e-6)
    assert torch.equal(inp.model_t, sch.model_time(inp.t))
    assert 0 <= float(inp.t.min()) and float(inp.t.max()) <= 1
    assert abs(float(inp.t.mean()) - 0.5) < 0.02  # uniform
    if name != "vp":  # integer step indices, all of 0..N-1 reachable
        assert torch.equal(inp.model_t, inp.model_t.round())
        small = DiscreteSchedule.linear(num_steps=10)
        idx = small.model_time(small.sample_train_time(2000, torch.Generator().manual_seed(2)))
        assert sorted(set(idx.round().long().tolist())) == list(range(10))


# ------------------------------------------------------------------------------------------------
# Samplers: pinned outputs of the official implementations (x_T = 0 and 1, float64)
# ------------------------------------------------------------------------------------------------

# Produced by running the official code (U-ViT dpm_solver_pytorch.py and dpm_solver_pp.py, LuChengTHU
# dpm_solver_pytorch.py, ermongroup/ddim generalized_steps, U-ViT sde.euler_maruyama) with
# gaussian_eps; the stochastic ones drew their noise from NoiseSource(0, [0, 1]).step(k).
OFFICIAL = {
    "dpm_solver-uvit-imagenet": [[1.495061241, -0.4967101286, 0.0, 2.996039407], [1.995314324, 0.5037626088, 2.00080735, 3.196165783]],
    "dpm_solver++-uvit-coco": [[1.447237587, -0.4654951946, 0.0, 2.956132554], [1.956281685, 0.5391866584, 1.988021321, 3.164107497]],
    "dpm_solver++-multistep2-linear": [[1.4940779, -0.4964643126, 0.0, 2.995058174], [2.107674113, 0.608773313, 2.070522666, 3.246485814]],
    "dpm_solver-singlestep2-linear": [[1.494644907, -0.4964527353, 0.0, 2.995648642], [2.048739317, 0.6124296523, 2.220538571, 3.216094338]],
    "ddim-uniform50-linear": [[1.494554959, -0.4962962064, 0.0, 2.995938329], [1.966994072, 0.4677830651, 1.940627487, 3.172143808]],
    "ddim-quad50-linear": [[1.47173752, -0.4811382743, 0.0, 2.977617584], [1.957011839, 0.4904443226, 1.932994201, 3.169773611]],
    "ddim-eta1-uniform50-linear-noise0": [[1.366058147, -0.9406157137, -3.029476869, 3.144067255], [2.160047836, -1.095479424, -3.501227468, 3.193519005]],
    "euler_maruyama-100-vp-noise0": [[0.8342002209, -0.9302186597, -5.595077473, 2.851973231], [1.900997422, -0.1233521744, 1.569687137, 3.353224301]],
    "dpm_solver-multistep3-vp": [[1.495209878, -0.4968341543, 0.0, 2.996179792], [1.972787277, 0.4582956053, 1.900809349, 3.181588486]],
    "dpm_solver++-multistep3-scaled_linear": [[1.447516597, -0.4653894076, 0.0, 2.956651715], [1.953835918, 0.5423917531, 1.993010678, 3.162091628]],
    "euler_maruyama-ode-100-vp": [[1.499847181, -0.4966865367, 0.0, 3.00672556], [1.997643545, 0.5033134633, 1.990831697, 3.200751351]],
}
OFFICIAL_RUNS = {
    "dpm_solver-uvit-imagenet": ("dpm_solver", "vp", 50, dict(t_end=1e-4)),
    "dpm_solver++-uvit-coco": ("dpm_solver++", "scaled_linear", 50, {}),
    "dpm_solver++-multistep2-linear": ("dpm_solver++", "linear", 20, dict(method="multistep", order=2)),
    "dpm_solver-singlestep2-linear": ("dpm_solver", "linear", 15, dict(order=2)),
    "dpm_solver-multistep3-vp": ("dpm_solver", "vp", 8, dict(method="multistep", order=3)),
    "dpm_solver++-multistep3-scaled_linear": ("dpm_solver++", "scaled_linear", 12,
                                              dict(method="multistep", order=3, skip="logSNR")),
    "ddim-uniform50-linear": ("ddim", "linear", 50, {}),
    "ddim-quad50-linear": ("ddim", "linear", 50, dict(skip="quad")),
    "ddim-eta1-uniform50-linear-noise0": ("ddim", "linear", 50, dict(eta=1.0)),
    "euler_maruyama-100-vp-noise0": ("euler_maruyama", "vp", 100, {}),
    "euler_maruyama-ode-100-vp": ("euler_maruyama", "vp", 100, dict(ode=True)),
}


@pytest.mark.parametrize("key", sorted(OFFICIAL))
def test_matches_official_implementation(key):
    name, sch_name, steps, options = OFFICIAL_RUNS[key]
    sch = schedule(sch_name)
    x = torch.stack([torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64)])
    out = SAMPLERS.get(name)(gaussian_eps(sch), sch, NoiseSource(0, [0, 1]), (4,), steps,
                             x_init=x, dtype=F64, **options)
    want = torch.tensor(OFFICIAL[key], dtype=F64)
    assert torch.allclose(out, want, rtol=1e-6, atol=1e-7), (out - want).abs().max()


# ------------------------------------------------------------------------------------------------
# Samplers: exact transport of the deterministic ones
# ------------------------------------------------------------------------------------------------

# (sampler, steps, options, tolerance): the tolerance is about twice the error measured when the
# samplers were written (worst dimension, the one with S = 0.2 and MU = 3).
DETERMINISTIC = [
    ("dpm_solver", 50, dict(order=3), 1e-3),
    ("dpm_solver", 20, dict(order=3), 2.5e-2),
    ("dpm_solver", 50, dict(order=2), 2.5e-2),
    ("dpm_solver", 50, dict(order=1), 0.1),
    ("dpm_solver", 50, dict(order=3, method="multistep"), 2e-3),
    ("dpm_solver", 50, dict(order=2, method="multistep", skip="time_uniform"), 0.1),
    ("dpm_solver++", 50, dict(order=3, skip="logSNR"), 1e-3),
    ("dpm_solver++", 50, {}, 6e-2),
    ("dpm_solver++", 50, dict(order=2, method="multistep", skip="logSNR"), 8e-3),
    ("ddim", 100, dict(skip="uniform"), 0.17),
    ("ddim", 100, dict(skip="quad"), 6e-2),
    ("euler_maruyama", 1000, dict(ode=True), 1.5e-2),
]


def _transport_error(name, sch, steps, options, scale=1.0):
    gain, offset = affine_of(name, sch, steps, scale, **options)
    t_from, t_to = time_range(name, sch, steps, options)
    want_gain, want_offset = exact_map(sch, t_from, t_to)
    return max(float((gain / want_gain - 1).abs().max()), float(((offset - want_offset) / S).abs().max()))


@pytest.mark.parametrize("sch_name", SCHEDULE_NAMES)
@pytest.mark.parametrize("name,steps,options,tol", DETERMINISTIC)
def test_deterministic_samplers_transport_exactly(name, steps, options, tol, sch_name):
    sch = schedule(sch_name)
    assert _transport_error(name, sch, steps, options) < tol
    assert _transport_error(name, sch, steps, options, scale=0.5) > 3 * tol  # a wrong predictor fails


@pytest.mark.parametrize("order", [1, 2, 3])
def test_dpm_solver_convergence_order(order):
    """Halving the step in lambda divides the error by about 2^order (DPM-Solver, Thm. 3.2)."""
    sch = VPSDE()
    e1, e2 = (_transport_error("dpm_solver", sch, n * order, dict(order=order, method="singlestep_fixed"))
              for n in (12, 24))
    assert 0.8 * 2**order < e1 / e2 < 1.6 * 2**order


# ------------------------------------------------------------------------------------------------
# Samplers: Monte-Carlo moments of 4096 samples of dimension 4, every registered sampler
# ------------------------------------------------------------------------------------------------

MONTE_CARLO = [  # (sampler, schedules, steps, options, discretisation tolerance relative to S)
    ("euler_maruyama", ("vp", "linear"), 1000, {}, 0.02),
    ("euler_maruyama", ("scaled_linear",), 500, {}, 0.03),
    ("ddim", ("linear", "scaled_linear"), 1000, dict(eta=1.0), 0.05),  # DDPM-like ancestral sampling
    # eta = 1 with skipped steps has a first-order bias: +14% std for S = 0.2 at 100 steps, 5.6% at 250
    ("ddim", ("vp",), 100, dict(eta=1.0), 0.2),
    ("ddim", ("vp", "linear", "scaled_linear"), 100, dict(skip="quad"), 0.03),
    ("dpm_solver", ("vp", "linear", "scaled_linear"), 20, {}, 0.02),
    ("dpm_solver", ("linear",), 21, dict(order=2), 0.1),
    ("dpm_solver", ("vp",), 30, dict(order=1), 0.1),
    ("dpm_solver++", ("vp", "linear", "scaled_linear"), 50, {}, 0.05),
    ("dpm_solver++", ("scaled_linear",), 20, dict(method="multistep", order=2, skip="logSNR"), 0.02),
]
MC_CASES = [(name, sch, steps, opt, tol) for name, schs, steps, opt, tol in MONTE_CARLO for sch in schs]


def _moment_errors(name, sch, steps, options, scale=1.0, n=4096):
    """Start from the exact marginal at the start time; z-scores of mean and std at the end time."""
    t_from, t_to = time_range(name, sch, steps, options)
    noise = NoiseSource(123, range(n))
    m0, r0 = marginal(sch, t_from)
    x_init = (m0 + r0 * noise.initial((4,), dtype=F64)).float()
    out = SAMPLERS.get(name)(gaussian_eps(sch, scale), sch, noise, (4,), steps, x_init=x_init, **options)
    m1, r1 = marginal(sch, t_to)
    out = out.double()
    mean_err = ((out.mean(0) - m1) / r1).abs()  # in units of the target std
    std_err = (out.std(0) / r1 - 1).abs()
    return mean_err, std_err


def test_every_registered_sampler_has_a_monte_carlo_check():
    assert {case[0] for case in MONTE_CARLO} == set(SAMPLERS.names())


@pytest.mark.parametrize("name,sch_name,steps,options,tol", MC_CASES)
def test_samples_match_the_data_distribution(name, sch_name, steps, options, tol):
    sch = schedule(sch_name)
    n = 4096
    mean_err, std_err = _moment_errors(name, sch, steps, options, n=n)
    mean_tol, std_tol = 4 / math.sqrt(n) + tol, 4 / math.sqrt(2 * n) + tol
    assert (mean_err < mean_tol).all(), mean_err
    assert (std_err < std_tol).all(), std_err
    wrong_mean, wrong_std = _moment_errors(name, sch, steps, options, scale=0.5, n=n)
    assert (wrong_mean > mean_tol).any() or (wrong_std > std_tol).any()


# ------------------------------------------------------------------------------------------------
# Samplers: calling convention
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,steps,options,nfe,n_steps", [
    ("euler_maruyama", 30, {}, 30, 30),
    ("ddim", 25, dict(eta=0.5), 25, 25),
    ("dpm_solver", 50, {}, 50, 17),
    ("dpm_solver", 48, {}, 48, 17),
    ("dpm_solver", 49, {}, 49, 17),
    ("dpm_solver", 21, dict(order=2), 21, 11),
    ("dpm_solver", 20, dict(order=3, method="multistep"), 20, 20),
    ("dpm_solver", 20, dict(order=3, method="singlestep_fixed"), 18, 6),
    ("dpm_solver++", 50, {}, 50, 17),
    ("dpm_solver++", 10, dict(denoise_to_zero=True), 11, 4),
])
def test_nfe_callback_and_progress(name, steps, options, nfe, n_steps):
    sch = VPSDE()
    calls, seen = [], []
    out = SAMPLERS.get(name)(gaussian_eps(sch, calls=calls), sch, NoiseSource(0, range(3)), (4,), steps,
                             progress=True, callback=lambda i, x, t: seen.append((i, x.shape, t)), **options)
    assert out.shape == (3, 4) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert len(calls) == nfe
    assert [s[0] for s in seen] == list(range(n_steps)) and all(s[1] == (3, 4) for s in seen)
    times = [s[2] for s in seen]
    assert all(a > b for a, b in zip(times, times[1:]))
    assert times[-1] == pytest.approx(0.0 if name in ("ddim", "euler_maruyama") else sch.t_end)


def test_sampler_result_does_not_depend_on_batch():
    sch = VPSDE()
    eps = gaussian_eps(sch)
    alone = SAMPLERS.get("euler_maruyama")(eps, sch, NoiseSource(5, [42]), (4,), 50)
    batch = SAMPLERS.get("euler_maruyama")(eps, sch, NoiseSource(5, [7, 8, 42, 9]), (4,), 50)
    assert torch.allclose(alone[0], batch[2], atol=1e-6)


def test_time_grids_follow_the_official_code():
    assert ddim_timesteps(1000, 50, "uniform") == list(range(0, 1000, 20))
    quad = ddim_timesteps(1000, 50, "quad")
    assert quad[:5] == [0, 0, 1, 2, 5] and quad[-1] == int(np.sqrt(800) ** 2) and len(quad) == 50
    assert singlestep_orders(50, 3) == [3] * 16 + [2]
    assert singlestep_orders(48, 3) == [3] * 15 + [2, 1]
    assert singlestep_orders(49, 3) == [3] * 16 + [1]
    assert singlestep_orders(21, 2) == [2] * 10 + [1]
    for steps in range(3, 40):
        assert sum(singlestep_orders(steps, 3)) == steps
    vp = VPSDE()
    grid = dpm_time_steps(vp, "logSNR", 1.0, 1e-4, 17)
    lam = vp.lambda_(torch.from_numpy(grid))
    assert grid[0] == pytest.approx(1.0) and grid[-1] == pytest.approx(1e-4)
    assert torch.allclose(lam[1:] - lam[:-1], (lam[-1] - lam[0]) / 17 * torch.ones(17, dtype=F64))


def test_registry_and_bad_options():
    assert SAMPLERS.names() == ["ddim", "dpm_solver", "dpm_solver++", "euler_maruyama"]
    assert SCHEDULES.names() == ["linear", "scaled_linear", "vp"]
    with pytest.raises(UnknownNameError, match="dpm_solver"):
        SAMPLERS.get("dpm_solve")
    sch, eps, noise = VPSDE(), gaussian_eps(VPSDE()), NoiseSource(0, [0])
    for name, options in [("dpm_solver", dict(method="adaptive")), ("dpm_solver", dict(skip="quad")),
                          ("dpm_solver", dict(order=4)), ("dpm_solver", dict(algorithm="ddim")),
                          ("dpm_solver", dict(t_end=0.0)), ("ddim", dict(skip="logSNR"))]:
        with pytest.raises(ValueError):
            SAMPLERS.get(name)(eps, sch, noise, (4,), 10, **options)
    with pytest.raises(ValueError):  # stochastic sampler without noise
        SAMPLERS.get("euler_maruyama")(eps, sch, None, (4,), 10, x_init=torch.zeros(1, 4))
