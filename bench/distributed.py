"""Data-parallel training on Ray Train: `train.num_workers` processes share each step's batch.

    bench train --profile tiny --set train.num_workers=2          (two CPU processes, gloo)
    bench train --profile paper --set train.num_workers=8 --address HOST:6379   (eight GPUs, nccl)

Each worker runs the same training loop as one process (bench.train._train) on its contiguous share
of the step's global batch. Every random draw of a step (t, the noise, flips, label dropout) is made
for the whole global batch from the step's generator and then sliced, so the workers together see
exactly what one process would; the gradients are averaged across workers after every backward
pass, so every worker takes the same optimizer step and holds the same weights and EMA. Two
workers at half the batch each therefore give, to float tolerance, the weights of one worker at the
full batch (tests/test_distributed.py) for every loss that is a mean over samples.

Why the gradients are averaged by hand rather than by torch's DistributedDataParallel wrapper: the
methods' losses call the backbone's parts (blocks, exits, heads) directly, not the wrapped module's
forward, which DDP's reducer relies on to know what to synchronise. One flat all-reduce after
backward makes no assumption about how the loss reached the parameters.

Exact for every loss that is a mean over the batch's samples (L_simple, BERxiT, CALM, static,
pruning's fine-tune: measured differences of about 1e-8). Two things are per worker, as in any
data-parallel run: dropout masks (the DDIM U-Net's; drawn from the global RNG seeded by step and
rank), and batch statistics inside a loss: DeeDiff's official L_UAL weights its exits by the
batch-mean confidence (AdaDiff sde.py), which each worker takes over its own share, as the official
multi-GPU training does (after 4 steps of a tiny model the exit modules differ by about 1e-3 relative
from one process). So that no such run is mistaken for another, a worker count above 1 is part of the
config hash (bench.config.config_hash): N workers make a run folder of their own, and resume only
with N workers.

Only rank 0 writes: the checkpoints (atomically, as in one process), the loss log and the progress
bar. The driver (the `bench train` process) holds the run folder's lock for the whole run; on a
cluster the runs folder must be on a filesystem every node shares, as for sweeps.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from bench.errors import DeviceError, UserError


class World:
    """This process's place among the training workers: rank `rank` of `size` (one process: 0 of 1)."""

    def __init__(self, rank: int = 0, size: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.size = rank, size
        self.device = torch.device(device)  # where collective buffers live (nccl takes only CUDA tensors)

    @classmethod
    def current(cls, device: torch.device | str = "cpu") -> "World":
        """The torch.distributed group this process belongs to (Ray Train set it up), or one process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, batch_size: int) -> tuple[int, int]:
        """The rows [lo, hi) of a global batch that this worker trains on."""
        if batch_size % self.size:
            raise UserError(f"train.batch_size={batch_size} does not split evenly over train.num_workers="
                            f"{self.size} workers; use a batch size divisible by the worker count")
        per = batch_size // self.size
        return self.rank * per, (self.rank + 1) * per

    def average_gradients(self, model: nn.Module) -> None:
        """Replace every gradient by its mean over the workers, in one flat all-reduce. A parameter that
        got no gradient on any worker keeps none (AdamW then skips it, as in one process)."""
        if self.size == 1:
            return
        import torch.distributed as dist

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([torch.cat([g.reshape(-1).float() for g in grads]), has_grad])
        dist.all_reduce(flat)
        flat /= self.size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n
        for p, seen in zip(params, flat[offset:].tolist()):
            if seen == 0:
                p.grad = None

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over the workers (the logged loss is the global batch's)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        out = value.detach().float().clone()
        dist.all_reduce(out)
        return out / self.size

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any worker (a time budget ends every worker at the same step)."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        out = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
        return bool(out.item())

    def same_everywhere(self, value: int) -> bool:
        """Whether every worker holds the same whole number (its model's parameter count, say)."""
        if self.size == 1:
            return True
        import torch.distributed as dist

        low = torch.tensor([value], dtype=torch.float64, device=self.device)
        high = low.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return low.item() == high.item()

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def worker_resources(cfg: dict, cluster: dict, device: str, echo=print) -> dict:
    """CPUs and GPUs per worker: train.cpus_per_worker; one GPU each when the run is on a GPU."""
    workers = cfg["train"]["num_workers"]
    cpus = cfg["train"]["cpus_per_worker"]
    use_gpu = device.startswith("cuda") or (device == "auto" and cluster["gpus"] >= workers)
    if device.startswith("cuda") and cluster["gpus"] < workers:
        raise DeviceError(f"train.num_workers={workers} workers with --device {device} need {workers} GPUs; the "
                          f"Ray cluster has {cluster['gpus']:g}")
    if device == "auto" and 0 < cluster["gpus"] < workers:
        echo(f"warning: train.num_workers={workers} but the Ray cluster has {cluster['gpus']:g} GPUs; the workers "
             f"train on CPUs (gloo). Use at most as many workers as GPUs, or --device cpu to say so")
    return {"cpu": cpus, "gpu": 1 if use_gpu else 0}


def train_data_parallel(cfg: dict, run_dir: Path, stop_at: int | None, progress: bool, *,
                        address: str | None = None, echo=print) -> Path:
    """Train the run in `run_dir` with train.num_workers Ray Train workers; returns its checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from bench.ray_runtime import ray_runtime, ray_storage

    workers = cfg["train"]["num_workers"]
    with ray_runtime(address, echo) as cluster:
        res = worker_resources(cfg, cluster, cfg["run"]["device"], echo)
        if address is None and workers * res["cpu"] > cluster["cpus"]:
            raise UserError(f"train.num_workers={workers} workers of train.cpus_per_worker={res['cpu']:g} CPUs need "
                            f"{workers * res['cpu']:g} CPUs; this machine offers Ray {cluster['cpus']:g}")
        echo(f"training on {workers} Ray Train workers ({res['cpu']:g} CPU and {res['gpu']} GPU each, "
             f"{'nccl' if res['gpu'] else 'gloo'})")
        loop_config = {"cfg": cfg, "run_dir": str(run_dir.resolve()), "stop_at": stop_at, "progress": progress,
                       "cwd": os.getcwd(), "threads": max(1, int(res["cpu"]))}
        trainer = TorchTrainer(
            _worker_loop, train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if res["gpu"] else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=bool(res["gpu"]),
                                                   resources_per_worker={"CPU": res["cpu"], **(
                                                       {"GPU": 1} if res["gpu"] else {})}),
            run_config=ray.train.RunConfig(name=f"train-{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                           storage_path=ray_storage(cfg),
                                           failure_config=ray.train.FailureConfig(max_failures=0)))
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise _worker_error(err) from None
    final = run_dir / "final.pt"
    return final if final.exists() else run_dir / "last.pt"


def _worker_error(err: Exception) -> Exception:
    """The first worker's own error when it is one the user can act on (a diverged loss, bad data),
    else a UserError that says where the workers' tracebacks are."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        if isinstance(cause, UserError):
            return cause
        inner = getattr(cause, "cause", None) or getattr(cause, "__cause__", None)
        if isinstance(inner, UserError):
            return inner
    return UserError(f"data-parallel training failed: {str(err).strip().splitlines()[-1] if str(err).strip() else err!r}"
                     f" (the workers' tracebacks are printed above)")


def _worker_loop(config: dict) -> None:
    """One Ray Train worker: the training loop of bench.train on this worker's share of each batch."""
    from bench.train import _train

    if os.path.isdir(config["cwd"]):
        os.chdir(config["cwd"])  # relative paths in the config (datasets, runs) mean what they meant to the driver
    torch.set_num_threads(config["threads"])
    device = _worker_device()
    world = World.current(device)
    _train(config["cfg"], Path(config["run_dir"]), config["stop_at"], config["progress"] and world.is_main,
           world=world, device=device)


def _worker_device() -> torch.device:
    import ray.train.torch

    device = ray.train.torch.get_device()
    return device if isinstance(device, torch.device) else torch.device(device)
