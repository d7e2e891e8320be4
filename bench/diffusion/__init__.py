"""Diffusion processes: noise schedules, samplers and per-sample noise.

A sampler sees the network only as eps_fn(x, model_t); early exit lives inside eps_fn. Samplers
share one call signature (see samplers.py) and are looked up by name in SAMPLERS; schedules by name
in SCHEDULES.
"""
from __future__ import annotations

from bench.registry import Registry

from . import samplers
from .noise import NoiseSource
from .samplers import ddim, ddim_timesteps, dpm_solver, dpm_solver_pp, dpm_time_steps, euler_maruyama
from .schedules import DiscreteSchedule, Schedule, TrainingInputs, VPSDE, diffusion_training_inputs

SAMPLERS: Registry = Registry("sampler")
SAMPLERS.register("euler_maruyama")(samplers.euler_maruyama)
SAMPLERS.register("dpm_solver")(samplers.dpm_solver)
SAMPLERS.register("dpm_solver++")(samplers.dpm_solver_pp)
SAMPLERS.register("ddim")(samplers.ddim)

SCHEDULES: Registry = Registry("schedule")
SCHEDULES.register("vp", help="U-ViT's continuous VP-SDE, beta linear 0.1 -> 20 on t in [0, 1]")(VPSDE)
SCHEDULES.register("linear", help="DDIM's discrete linear betas 1e-4 -> 0.02, N = 1000")(DiscreteSchedule.linear)
SCHEDULES.register("scaled_linear", help="latent models' betas linspace(sqrt 0.00085, sqrt 0.012, 1000)^2")(
    DiscreteSchedule.scaled_linear)

__all__ = [
    "SAMPLERS", "SCHEDULES", "NoiseSource", "Schedule", "VPSDE", "DiscreteSchedule", "TrainingInputs",
    "diffusion_training_inputs", "euler_maruyama", "dpm_solver", "dpm_solver_pp", "ddim",
    "ddim_timesteps", "dpm_time_steps",
]
