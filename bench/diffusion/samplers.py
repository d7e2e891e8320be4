"""Samplers that see the network only as eps_fn(x, model_t) -> eps: Euler-Maruyama, DPM-Solver(++), DDIM.

Shared call signature:

    sample(eps_fn, schedule, noise, shape, steps, *, progress=False, callback=None,
           device=None, dtype=torch.float32, x_init=None, **options) -> x_0

- eps_fn(x, model_t): the noise prediction; model_t is a 1-D float32 tensor of network time inputs,
  one per sample (schedule.model_time of the current t). Early exit lives inside eps_fn.
- noise: a NoiseSource for the batch (initial x_T and per-step noise of stochastic samplers);
  may be None when x_init is given and the sampler is deterministic.
- shape: the per-sample shape; steps: the number of network evaluations (NFE).
- callback(step, x, t): called after every sampling step with the new x and the float time t it
  has reached, so that later code can record trajectories.
All time grids are computed in float64 on the CPU, and schedule coefficients enter as Python floats.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from tqdm.auto import tqdm

from bench.config import ConfigError

from .noise import NoiseSource
from .schedules import Schedule

Tensor = torch.Tensor
EpsFn = Callable[[Tensor, Tensor], Tensor]


class _Run:
    """Bookkeeping shared by all samplers: x_T, eps calls (counted), noise, progress and callbacks."""

    def __init__(self, eps_fn: EpsFn, schedule: Schedule, noise: NoiseSource | None, shape: Sequence[int],
                 device, dtype: torch.dtype, x_init: Tensor | None, callback, progress: bool, desc: str):
        self.eps_fn, self.schedule, self.noise = eps_fn, schedule, noise
        self.shape, self.dtype, self.callback = tuple(shape), dtype, callback
        self.progress, self.desc, self.nfe = progress, desc, 0
        if x_init is not None:
            self.device = torch.device(device) if device is not None else x_init.device
            self.x = x_init.to(self.device, dtype)
        elif noise is not None:
            self.device = torch.device(device) if device is not None else torch.device("cpu")
            self.x = noise.initial(self.shape, self.device, dtype)
        else:
            raise ValueError("need a NoiseSource or x_init")
        if noise is not None and len(noise) != self.x.shape[0]:
            raise ValueError(f"NoiseSource has {len(noise)} samples, x has {self.x.shape[0]}")

    def f(self, fn, t: float) -> float:
        """A schedule function at one time, as a Python float."""
        return float(fn(torch.tensor(t, dtype=torch.float64)))

    def eps(self, x: Tensor, t: float) -> Tensor:
        self.nfe += 1
        model_t = torch.full((x.shape[0],), self.f(self.schedule.model_time, t),
                             device=x.device, dtype=torch.float32)
        return self.eps_fn(x, model_t)

    def z(self, k: int) -> Tensor:
        if self.noise is None:
            raise ValueError("this sampler is stochastic: pass a NoiseSource")
        return self.noise.step(k, self.shape, self.x.device, self.dtype)

    def steps(self, n: int):
        return tqdm(range(n), disable=not self.progress, desc=self.desc, leave=False)

    def done(self, step: int, x: Tensor, t: float) -> None:
        if self.callback is not None:
            self.callback(step, x, t)


# ----------------------------------------------------------------------------------------------
# Euler-Maruyama on the reverse VP-SDE (U-ViT's sde.euler_maruyama)
# https://github.com/baofff/U-ViT/blob/main/sde.py
# ----------------------------------------------------------------------------------------------

def euler_maruyama(eps_fn: EpsFn, schedule: Schedule, noise: NoiseSource | None, shape: Sequence[int],
                   steps: int, *, progress: bool = False, callback=None, device=None,
                   dtype: torch.dtype = torch.float32, x_init: Tensor | None = None,
                   t_end: float = 1e-3, ode: bool = False) -> Tensor:
    """Euler-Maruyama for dx = [f - g^2 score] dt + g dw (Song et al. 2021, eq. 6); steps = NFE.

    Grid [0] + linspace(t_end, 1, steps), walked from 1 to 0; the drift is evaluated at the upper
    end t of each interval; score = -eps / sigma_t; no noise on the last step (to t = 0).
    ode=True drops the noise and halves the score term (probability-flow ODE, eq. 13), as U-ViT's
    'euler_maruyama_ode'. On a DiscreteSchedule, beta(t) is the slope of its interpolated log alpha.
    """
    run = _Run(eps_fn, schedule, noise, shape, device, dtype, x_init, callback, progress, "euler_maruyama")
    grid = np.append(0.0, np.linspace(t_end, schedule.t_start, steps))
    x = run.x
    for i in run.steps(steps):
        t, s = float(grid[steps - i]), float(grid[steps - 1 - i])
        dt = s - t  # < 0
        beta, sigma = run.f(schedule.beta, t), run.f(schedule.sigma, t)
        eps = run.eps(x, t)
        # drift = f(x, t) - g^2 score = -beta x / 2 + beta eps / sigma   (SDE)
        #        f(x, t) - g^2 score / 2                                  (ODE)
        score_weight = (0.5 if ode else 1.0) * beta / sigma
        x = x + (-0.5 * beta * dt) * x + (score_weight * dt) * eps
        if not ode and s != 0:
            x = x + math.sqrt(beta) * math.sqrt(-dt) * run.z(i)
        run.done(i, x, s)
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022, "DPM-Solver", Algorithms 1-2) and DPM-Solver++ (Lu et al. 2022b,
# Algorithms 1-2, data prediction). Formulas after https://github.com/LuChengTHU/dpm-solver
# (dpm_solver_pytorch.py, solver_type 'dpmsolver'). One implementation serves both: with model
# output m = eps, a = alpha, c = sigma, H = h; with m = x0, a = sigma, c = alpha, H = -h.
# ----------------------------------------------------------------------------------------------

def dpm_time_steps(schedule: Schedule, skip: str, t_T: float, t_0: float, n: int) -> np.ndarray:
    """n + 1 times from t_T down to t_0: 'logSNR' (uniform lambda), 'time_uniform', 'time_quadratic'."""
    if skip == "logSNR":
        lam = torch.linspace(float(schedule.lambda_(t_T)), float(schedule.lambda_(t_0)), n + 1,
                             dtype=torch.float64)
        return schedule.inverse_lambda(lam).numpy()
    if skip == "time_uniform":
        return np.linspace(t_T, t_0, n + 1)
    if skip == "time_quadratic":
        return np.linspace(math.sqrt(t_T), math.sqrt(t_0), n + 1) ** 2
    raise ConfigError(f"sample.options: unknown skip type {skip!r}; use 'logSNR', 'time_uniform' or 'time_quadratic'")


def singlestep_orders(steps: int, order: int) -> list[int]:
    """The orders of singlestep DPM-Solver with NFE = steps ("DPM-Solver-fast" for order 3)."""
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - 1 - (steps % 3 == 0)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ConfigError("sample.options: order must be 1, 2 or 3")


class _DPM:
    """The update rules; times are floats, model values m are tensors."""

    def __init__(self, run: _Run, data_prediction: bool):
        self.run, self.pp = run, data_prediction
        ns = run.schedule
        self.lam = lambda t: run.f(ns.lambda_, t)
        self.inv = lambda lam: run.f(ns.inverse_lambda, lam)
        self.a = lambda t: run.f(ns.sigma if self.pp else ns.alpha, t)
        self.c = lambda t: run.f(ns.alpha if self.pp else ns.sigma, t)

    def model(self, x: Tensor, t: float) -> Tensor:
        eps = self.run.eps(x, t)
        if not self.pp:
            return eps
        ns = self.run.schedule
        return (x - self.run.f(ns.sigma, t) * eps) / self.run.f(ns.alpha, t)  # x0 prediction

    def H(self, s: float, t: float) -> float:
        h = self.lam(t) - self.lam(s)
        return -h if self.pp else h

    def singlestep(self, x: Tensor, s: float, t: float, order: int, r1: float, r2: float) -> Tensor:
        """One step of DPM-Solver-1/2/3 (DPM-Solver eq. 3.7, Alg. 1 and 2; ++ Alg. 1)."""
        H, a, c = self.H(s, t), self.a, self.c
        m_s = self.model(x, s)
        base = (a(t) / a(s)) * x - (c(t) * math.expm1(H)) * m_s
        if order == 1:
            return base
        lam_s, h = self.lam(s), self.lam(t) - self.lam(s)
        s1 = self.inv(lam_s + r1 * h)
        u1 = (a(s1) / a(s)) * x - (c(s1) * math.expm1(r1 * H)) * m_s
        m_s1 = self.model(u1, s1)
        if order == 2:
            return base - (0.5 / r1) * (c(t) * math.expm1(H)) * (m_s1 - m_s)
        s2 = self.inv(lam_s + r2 * h)
        phi_22 = math.expm1(r2 * H) / (r2 * H) - 1.0
        u2 = ((a(s2) / a(s)) * x - (c(s2) * math.expm1(r2 * H)) * m_s
              - (r2 / r1) * (c(s2) * phi_22) * (m_s1 - m_s))
        m_s2 = self.model(u2, s2)
        phi_2 = math.expm1(H) / H - 1.0
        return base - (1.0 / r2) * (c(t) * phi_2) * (m_s2 - m_s)

    def multistep(self, x: Tensor, ms: list[Tensor], ts: list[float], t: float, order: int) -> Tensor:
        """Multistep DPM-Solver(++)-1/2/3 from ts[-1] to t with the last `order` model values."""
        a, c = self.a, self.c
        t0, m0 = ts[-1], ms[-1]
        H = self.H(t0, t)
        x_t = (a(t) / a(t0)) * x - (c(t) * math.expm1(H)) * m0
        if order == 1:
            return x_t
        h = self.lam(t) - self.lam(t0)
        r0 = (self.lam(t0) - self.lam(ts[-2])) / h
        d1_0 = (m0 - ms[-2]) / r0
        if order == 2:
            return x_t - 0.5 * (c(t) * math.expm1(H)) * d1_0
        r1 = (self.lam(ts[-2]) - self.lam(ts[-3])) / h
        d1_1 = (ms[-2] - ms[-3]) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = math.expm1(H) / H - 1.0
        phi_3 = phi_2 / H - 0.5
        return x_t - (c(t) * phi_2) * d1 - (c(t) * phi_3) * d2


def dpm_solver(eps_fn: EpsFn, schedule: Schedule, noise: NoiseSource | None, shape: Sequence[int],
               steps: int, *, progress: bool = False, callback=None, device=None,
               dtype: torch.dtype = torch.float32, x_init: Tensor | None = None,
               order: int = 3, method: str = "singlestep", skip: str = "logSNR",
               algorithm: str = "dpmsolver", t_start: float | None = None, t_end: float | None = None,
               lower_order_final: bool = True, denoise_to_zero: bool = False) -> Tensor:
    """DPM-Solver; defaults are U-ViT's 'fast' variant (singlestep, order 3 then 2/1, logSNR grid).

    method: 'singlestep' (NFE = steps; orders from `singlestep_orders`), 'singlestep_fixed'
    (steps // order steps of one order) or 'multistep' (NFE = steps; the first steps use lower
    orders; with lower_order_final and steps < 10 the last ones too). algorithm: 'dpmsolver' (noise
    prediction) or 'dpmsolver++' (data prediction). t_end defaults to schedule.t_end (1e-3 for the
    VP-SDE, 1/N for a discrete schedule); U-ViT samples ImageNet with t_end=1e-4.
    callback(step, x, t) runs after every solver step (a singlestep step of order k costs k NFE).
    """
    if algorithm not in ("dpmsolver", "dpmsolver++"):
        raise ConfigError(f"sample.options: unknown algorithm {algorithm!r}; use 'dpmsolver' or 'dpmsolver++'")
    if order not in (1, 2, 3):
        raise ConfigError("sample.options: order must be 1, 2 or 3")
    t_T = schedule.t_start if t_start is None else float(t_start)
    t_0 = schedule.t_end if t_end is None else float(t_end)
    if not 0 < t_0 < t_T:
        raise ConfigError(f"sample.options: need 0 < t_end < t_start, got {t_0}, {t_T}")
    run = _Run(eps_fn, schedule, noise, shape, device, dtype, x_init, callback, progress, algorithm)
    solver = _DPM(run, algorithm == "dpmsolver++")
    x = run.x
    if method in ("singlestep", "singlestep_fixed"):
        if method == "singlestep":
            orders = singlestep_orders(steps, order)
            if skip == "logSNR":  # K outer steps uniform in lambda (reproduces the DPM-Solver paper)
                outer = dpm_time_steps(schedule, skip, t_T, t_0, len(orders))
            else:  # the NFE-point grid, taking `order` points per step
                outer = dpm_time_steps(schedule, skip, t_T, t_0, steps)[np.cumsum([0] + orders)]
        elif method == "singlestep_fixed":
            orders = [order] * (steps // order)
            outer = dpm_time_steps(schedule, skip, t_T, t_0, len(orders))
        for i in run.steps(len(orders)):
            s, t, k = float(outer[i]), float(outer[i + 1]), orders[i]
            inner = [solver.lam(float(u)) for u in dpm_time_steps(schedule, skip, s, t, k)]
            h = inner[-1] - inner[0]
            r1 = (inner[1] - inner[0]) / h if k >= 2 else 0.0
            r2 = (inner[2] - inner[0]) / h if k >= 3 else 0.0
            x = solver.singlestep(x, s, t, k, r1, r2)
            run.done(i, x, t)
    elif method == "multistep":
        if steps < order:
            raise ConfigError("sample.options: multistep needs steps >= order")
        grid = [float(u) for u in dpm_time_steps(schedule, skip, t_T, t_0, steps)]
        ts, ms = [grid[0]], [solver.model(x, grid[0])]
        for step in run.steps(steps):
            n = step + 1  # index of the time reached
            k = min(order, n)
            if lower_order_final and steps < 10:
                k = min(k, steps + 1 - n)
            x = solver.multistep(x, ms, ts, grid[n], k)
            ts, ms = (ts + [grid[n]])[-order:], ms[-(order - 1):] if order > 1 else []
            if n < steps:
                ms = ms + [solver.model(x, grid[n])]
            run.done(step, x, grid[n])
    else:
        raise ConfigError(f"sample.options: unknown method {method!r}; use 'singlestep', 'singlestep_fixed' or 'multistep'")
    if denoise_to_zero:  # x0 prediction at t_0 (one more NFE)
        eps = run.eps(x, t_0)
        x = (x - run.f(schedule.sigma, t_0) * eps) / run.f(schedule.alpha, t_0)
    return x


def dpm_solver_pp(eps_fn: EpsFn, schedule: Schedule, noise: NoiseSource | None, shape: Sequence[int],
                  steps: int, **options) -> Tensor:
    """DPM-Solver++ (data prediction); defaults are U-ViT's MS-COCO sampler: singlestep order 3, time-uniform.

    U-ViT's train_t2i_discrete.py calls dpm_solver_pp.DPM_Solver(predict_x0=True).sample(steps=50,
    eps=1/N, T=1) with method 'fast', order 3, skip 'time_uniform'. Pass method='multistep', order=2
    for the guided-sampling recommendation of the official code. Options as in `dpm_solver`.
    """
    options.setdefault("skip", "time_uniform")
    return dpm_solver(eps_fn, schedule, noise, shape, steps, algorithm="dpmsolver++", **options)


# ----------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, "Denoising diffusion implicit models", eq. 12)
# https://github.com/ermongroup/ddim (runners/diffusion.py sample_image, functions/denoising.py)
# ----------------------------------------------------------------------------------------------

def ddim_timesteps(num_steps: int, steps: int, skip: str = "uniform") -> list[int]:
    """DDIM's index sequence: 'uniform' range(0, N, N // S); 'quad' int(linspace(0, sqrt(0.8 N), S)^2).

    As in the official code, 'quad' repeats small indices when S > ~0.8 N^(1/2) (e.g. 0, 0 for S = 50);
    a repeated index is an identity step that still costs a network evaluation.
    """
    if skip == "uniform":
        return list(range(0, num_steps, num_steps // steps))
    if skip == "quad":
        return [int(s) for s in np.linspace(0, np.sqrt(num_steps * 0.8), steps) ** 2]
    raise ConfigError(f"sample.options: unknown skip type {skip!r}; use 'uniform' or 'quad'")


def ddim(eps_fn: EpsFn, schedule: Schedule, noise: NoiseSource | None, shape: Sequence[int],
         steps: int, *, progress: bool = False, callback=None, device=None,
         dtype: torch.dtype = torch.float32, x_init: Tensor | None = None,
         eta: float = 0.0, skip: str = "uniform") -> Tensor:
    """DDIM generalized_steps: x_{t-1} = sqrt(a') x0_hat + sqrt(1 - a' - c1^2) eps + c1 z.

    Index n sits at t = (n + 1) / N and the final step goes to n = -1 (t = 0, alpha = 1). With the
    VP-SDE this is a uniform grid on continuous time with N = 1000 virtual steps; the network then
    sees model_time(t) = 999 t. c1 = eta sqrt((1 - a/a') (1 - a') / (1 - a)); eta = 1 is DDPM-like.
    Uniform skip walks n = N - N // S, ..., 0, so sampling starts just below t = 1 (official).
    """
    run = _Run(eps_fn, schedule, noise, shape, device, dtype, x_init, callback, progress, "ddim")
    seq = ddim_timesteps(schedule.num_steps, steps, skip)
    seq_next = [-1] + seq[:-1]
    pairs = list(zip(reversed(seq), reversed(seq_next)))
    x = run.x
    for k in run.steps(len(pairs)):
        n, n_next = pairs[k]
        t, t_next = (n + 1) / schedule.num_steps, (n_next + 1) / schedule.num_steps
        a, a_next = run.f(schedule.alpha, t) ** 2, run.f(schedule.alpha, t_next) ** 2  # alpha_bar
        var, var_next = run.f(schedule.sigma, t) ** 2, run.f(schedule.sigma, t_next) ** 2  # 1 - alpha_bar
        eps = run.eps(x, t)
        x0 = (x - math.sqrt(var) * eps) / math.sqrt(a)
        c1 = eta * math.sqrt(max((1.0 - a / a_next) * var_next / var, 0.0))
        c2 = math.sqrt(max(var_next - c1**2, 0.0))
        x = math.sqrt(a_next) * x0 + c2 * eps
        if c1 > 0:
            x = x + c1 * run.z(k)
        run.done(k, x, t_next)
    return x
