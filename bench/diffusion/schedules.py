"""Noise schedules of VP type: q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I), t in [0, 1].

One interface for the continuous VP-SDE of U-ViT (CIFAR-10, CelebA, ImageNet-256 latents) and the
discrete schedules of DDIM (linear betas) and latent models (scaled-linear betas), so that samplers
and training never branch on the schedule. Time t is always the continuous DPM-Solver time; a
discrete schedule places its step n = 0..N-1 at t_n = (n + 1) / N, as DPM-Solver's
NoiseScheduleVP('discrete') does (https://github.com/LuChengTHU/dpm-solver, dpm_solver_pytorch.py).
`model_time(t)` converts t to what the network was trained on.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

Tensor = torch.Tensor


def _f64(t) -> Tensor:
    """A float64 tensor view of a float or a tensor (kept on its device)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.as_tensor(t, dtype=torch.float64)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear f(x) through increasing knots xp, extended linearly beyond both ends."""
    xp, fp = xp.to(x.device), fp.to(x.device)
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


class Schedule:
    """Common interface; subclasses define log_alpha, inverse_lambda, beta, the time maps and t sampling."""

    t_start: float = 1.0  # samplers start at t = T = 1
    t_end: float  # default end time of ODE solvers (DPM-Solver's recommended epsilon)
    num_steps: int  # N: the discrete grid t_n = (n + 1) / N that DDIM walks on

    def log_alpha(self, t) -> Tensor:
        raise NotImplementedError

    def alpha(self, t) -> Tensor:
        """Mean coefficient alpha_t = sqrt(alpha_bar_t)."""
        return torch.exp(self.log_alpha(t))

    def sigma(self, t) -> Tensor:
        """Standard deviation sigma_t = sqrt(1 - alpha_t^2)."""
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t) -> Tensor:
        """Half log-SNR lambda_t = log(alpha_t / sigma_t) (DPM-Solver, Lu et al. 2022, sec. 3.1)."""
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(-torch.expm1(2.0 * la))

    def inverse_lambda(self, lam) -> Tensor:
        raise NotImplementedError

    def beta(self, t) -> Tensor:
        """beta(t) = -2 d log(alpha_t)/dt, the VP-SDE's g(t)^2 (Song et al. 2021, eq. 11)."""
        raise NotImplementedError

    def model_time(self, t) -> Tensor:
        """The network's float32 time input at schedule time t."""
        raise NotImplementedError

    def from_model_time(self, tau) -> Tensor:
        raise NotImplementedError

    def sample_train_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        raise NotImplementedError

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = alpha_t x_0 + sigma_t eps, with one t per sample (DDPM eq. 4)."""
        view = (-1,) + (1,) * (x0.dim() - 1)
        a = self.alpha(t).to(x0.device, x0.dtype).view(view)
        s = self.sigma(t).to(x0.device, x0.dtype).view(view)
        return a * x0 + s * noise


class VPSDE(Schedule):
    """U-ViT's continuous VP-SDE: beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1].

    After https://github.com/baofff/U-ViT/blob/main/sde.py (VPSDE, ScoreModel.predict).
    """

    t_end = 1e-3  # sde.euler_maruyama's eps; DPM-Solver's default 1 / total_N
    num_steps = 1000  # DPM-Solver's total_N for the 'linear' schedule; DDIM's virtual grid

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def __repr__(self) -> str:
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max})"

    def log_alpha(self, t) -> Tensor:
        # log alpha_t = -1/2 int_0^t beta = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2
        t = _f64(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def inverse_lambda(self, lam) -> Tensor:
        # Solve (b1 - b0) t^2 / 4 + b0 t / 2 = L with L = log(1 + e^{-2 lam}) / 2 = -log alpha_t,
        # in the cancellation-free form t = 4 (b1 - b0) L / ((b1 - b0) (b0 + sqrt(b0^2 + 4 (b1 - b0) L))).
        lam = _f64(lam)
        d = self.beta_max - self.beta_min
        four_dl = 2.0 * d * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return four_dl / (torch.sqrt(self.beta_min**2 + four_dl) + self.beta_min) / d

    def beta(self, t) -> Tensor:
        return self.beta_min + _f64(t) * (self.beta_max - self.beta_min)

    def model_time(self, t) -> Tensor:
        """U-ViT feeds t * 999 to the network (sde.py, ScoreModel.predict); float32."""
        return (_f64(t) * 999.0).to(torch.float32)

    def from_model_time(self, tau) -> Tensor:
        return _f64(tau) / 999.0

    def sample_train_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """t ~ U(0, 1) with no floor, as U-ViT's SDE.sample (t_init = 0) draws it."""
        gen_device = generator.device if generator is not None else device
        t = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64)
        return t.to(device) if device is not None else t


class DiscreteSchedule(Schedule):
    """Discrete betas beta_0..beta_{N-1}; alpha_bar_n = prod_{i<=n} (1 - beta_i) sits at t_n = (n + 1) / N.

    log alpha_t is the piecewise-linear interpolation of the knots (t_n, log sqrt(alpha_bar_n)), as in
    DPM-Solver's NoiseScheduleVP('discrete'); we add the knot (0, 0) (alpha_bar_{-1} = 1, DDIM's
    compute_alpha), which changes nothing on [1/N, 1], where DPM-Solver lives. DPM-Solver also cuts
    trailing steps whose lambda is below -5.1 (numerical_clip_alpha); that never happens for the
    linear and scaled-linear factories (lambda_1 = -5.06 and -2.68), so it is not implemented.
    The network time is the step index n, plus `time_offset`: 0 for DDIM's convention (and
    DPM-Solver's model_wrapper, 1000 (t - 1/N) = n when N = 1000), 1 for U-ViT's discrete
    checkpoints, trained on n + 1 in 1..N (train_ldm_discrete.py: nnet(x, t_continuous * N)).
    """

    def __init__(self, betas, time_offset: int = 0):
        betas = torch.as_tensor(betas, dtype=torch.float64).reshape(-1).cpu()
        if not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must lie in (0, 1)")
        self.betas = betas
        self.num_steps = betas.numel()
        self.time_offset = int(time_offset)
        self.t_end = 1.0 / self.num_steps
        log_alphas = 0.5 * torch.cumsum(torch.log1p(-betas), dim=0)  # log sqrt(alpha_bar_n)
        self.alphas_cumprod = torch.exp(2.0 * log_alphas)
        self.t_knots = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        self.log_alpha_knots = torch.cat([torch.zeros(1, dtype=torch.float64), log_alphas])

    @classmethod
    def linear(cls, beta_start: float = 1e-4, beta_end: float = 0.02, num_steps: int = 1000,
               time_offset: int = 0) -> "DiscreteSchedule":
        """DDPM/DDIM betas: linspace(beta_start, beta_end, N) (ermongroup/ddim, get_beta_schedule 'linear')."""
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64), time_offset)

    @classmethod
    def scaled_linear(cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_steps: int = 1000,
                      time_offset: int = 0) -> "DiscreteSchedule":
        """Latent-diffusion betas: linspace(sqrt(b0), sqrt(b1), N)^2 (U-ViT's stable_diffusion_beta_schedule)."""
        root = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=torch.float64)
        return cls(root**2, time_offset)

    def __repr__(self) -> str:
        return (f"DiscreteSchedule(N={self.num_steps}, beta_0={self.betas[0].item():.6g}, "
                f"beta_N-1={self.betas[-1].item():.6g}, time_offset={self.time_offset})")

    def log_alpha(self, t) -> Tensor:
        t = _f64(t)
        return _interp(t.reshape(-1), self.t_knots, self.log_alpha_knots).reshape(t.shape)

    def inverse_lambda(self, lam) -> Tensor:
        lam = _f64(lam)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        flat = _interp(log_alpha.reshape(-1), self.log_alpha_knots.flip(0), self.t_knots.flip(0))
        return flat.reshape(lam.shape)

    def beta(self, t) -> Tensor:
        """-2 x the slope of log alpha on the segment ending at t: -N log(1 - beta_n) on (t_{n-1}, t_n]."""
        t = _f64(t)
        n = self.num_steps
        seg = (torch.ceil(t * n - 1e-9) - 1).clamp(0, n - 1).long()
        slope = (self.log_alpha_knots[1:] - self.log_alpha_knots[:-1]).to(t.device) * n
        return -2.0 * slope[seg]

    def model_time(self, t) -> Tensor:
        """Step index n = N t - 1 (fractional between grid points), plus time_offset; float32."""
        return (_f64(t) * self.num_steps - 1.0 + self.time_offset).to(torch.float32)

    def from_model_time(self, tau) -> Tensor:
        return (_f64(tau) + 1.0 - self.time_offset) / self.num_steps

    def index_to_time(self, n) -> Tensor:
        """t_n = (n + 1) / N; n = -1 gives t = 0 (alpha = 1)."""
        return (_f64(n) + 1.0) / self.num_steps

    def sample_train_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """n ~ U{0, ..., N-1}, returned as t_n = (n + 1) / N (U-ViT's Schedule.sample draws n + 1 in 1..N)."""
        gen_device = generator.device if generator is not None else device
        n = torch.randint(0, self.num_steps, (batch,), generator=generator, device=gen_device)
        t = self.index_to_time(n)
        return t.to(device) if device is not None else t


class TrainingInputs(NamedTuple):
    """What one training step feeds the network; the loss is mse(eps_hat(x_t, model_t), noise)."""

    x_t: Tensor  # (B, ...) noised data, dtype of x0
    model_t: Tensor  # (B,) float32 network time input
    noise: Tensor  # (B, ...) the eps target
    t: Tensor  # (B,) float64 schedule time in [0, 1], for per-timestep statistics


def diffusion_training_inputs(schedule: Schedule, x0: Tensor,
                              generator: torch.Generator | None = None) -> TrainingInputs:
    """Draw t and eps for L_simple (DDPM eq. 14; U-ViT sde.LSimple with pred='noise_pred')."""
    t = schedule.sample_train_time(x0.shape[0], generator, device=x0.device)
    gen_device = generator.device if generator is not None else x0.device
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = schedule.add_noise(x0, t, noise)
    return TrainingInputs(x_t, schedule.model_time(t), noise, t)
