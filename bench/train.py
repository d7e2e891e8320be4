"""Training: AdamW with linear warm-up, EMA, clipping, bf16 on a GPU, resumable checkpoints.

Every random draw of step s (the batch order of its epoch, t, the noise, flips, dropout) is
seeded from (run seed, s), so a run that is interrupted and resumed from its last checkpoint
ends with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import csv
import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bench.checkpoint import (atomic_save, check_identity, checkpoint_dir, load_checkpoint, load_state_into,
                              load_weights_into)
from bench.conditioning import build_conditioning
from bench.config import config_hash, resolve_for
from bench.distributed import World
from bench.errors import DataError, RunBusyError, UserError
from bench.setup import build_model, build_schedule, build_train_dataset, prepare_data, resolve_device
from methods import build_method


class TrainingDiverged(UserError, FloatingPointError):
    """The loss became NaN or infinite."""


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of indices for steps start..end-1: a fresh permutation per epoch, seeded by (seed, epoch).
    `share` (lo, hi): only those rows of each batch, a data-parallel worker's part (bench.distributed)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, start: int, end: int,
                 share: tuple[int, int] | None = None):
        if n_items < batch_size:
            raise DataError(f"the dataset has {n_items} images, fewer than train.batch_size={batch_size}; "
                            f"lower train.batch_size or use more images")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.start, self.end = start, end
        self.share = share or (0, batch_size)
        self.per_epoch = n_items // batch_size  # drop the last partial batch

    def __len__(self) -> int:
        return max(0, self.end - self.start)

    def __iter__(self):
        epoch, perm = None, None
        for step in range(self.start, self.end):
            if step // self.per_epoch != epoch:
                epoch = step // self.per_epoch
                perm = torch.randperm(self.n_items, generator=_step_generator(self.seed, epoch, salt=1))
            offset = (step % self.per_epoch) * self.batch_size
            lo, hi = self.share
            yield perm[offset + lo:offset + hi].tolist()


def preload(dataset, num_workers: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the whole dataset once into uint8 (N, C, H, W) on `device`; batches are then indexing."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(dataset, batch_size=500, num_workers=num_workers)
    images, labels = [], []
    latent = is_latent(dataset)
    for x, y in tqdm(loader, desc="loading images", leave=False, disable=len(dataset) < 20_000):
        # exact for images (items are v / 127.5 - 1); latents are kept as they are
        images.append(x.float() if latent else ((x + 1.0) * 127.5).round().to(torch.uint8))
        labels.append(torch.as_tensor(y))
    return torch.cat(images).to(device), torch.cat(labels).to(device)


def is_latent(dataset) -> bool:
    """Whether items are autoencoder latents rather than 8-bit images."""
    info = getattr(dataset, "info", None)
    return bool(getattr(info, "latent", False))


def _as_model_input(batch: torch.Tensor) -> torch.Tensor:
    """A preloaded batch back to model input: uint8 images to [-1, 1]; latents unchanged."""
    return batch.float() / 127.5 - 1.0 if batch.dtype == torch.uint8 else batch


def calibration_batch(dataset, n: int, seed: int, device: torch.device, conditioning=None):
    """n training images in [-1, 1] drawn with the run seed, and their conditions (None for an
    unconditional model), for a method's `prepare` (pruning's importance)."""
    order = torch.randperm(len(dataset), generator=_step_generator(seed, 0, salt=2))[:n]
    items = [dataset[int(i)] for i in order]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).float().to(device)
    if conditioning is None:
        return images, None
    labels = torch.stack([torch.as_tensor(y) for _, y in items])
    return images, conditioning.training(labels, torch.Generator().manual_seed(seed), device)


def learning_rate(cfg_train: dict, step: int) -> float:
    """Linear warm-up over warmup_steps, then constant (U-ViT's schedule)."""
    warmup = cfg_train["warmup_steps"]
    return cfg_train["lr"] * (min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)


def ema_ramp_decay(decay: float, step: int) -> float:
    """U-ViT's ramp min(decay, (1+s)/(10+s)): a fresh model's first iterates are soon forgotten."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, step: int, ramped: set[str] | None = None) -> None:
    """EMA of the weights. Parameters named in `ramped` (None: all) use the ramped decay; the others
    use `decay` from step 0, so that a fine-tune's EMA starts from, and stays close to, the weights
    it was initialised with (the official DeeDiff code copies the pretrained model into its EMA)."""
    groups = {True: ([], []), False: ([], [])}
    for (name, p_ema), p in zip(ema.named_parameters(), model.parameters()):
        ema_list, model_list = groups[ramped is None or name in ramped]
        ema_list.append(p_ema)
        model_list.append(p.detach())
    for use_ramp, (ema_list, model_list) in groups.items():
        if ema_list:
            d = ema_ramp_decay(decay, step) if use_ramp else decay
            torch._foreach_lerp_(ema_list, model_list, 1.0 - d)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def ramped_parameters(model: nn.Module, loaded: set[str], rule: str) -> set[str]:
    """Which parameters the EMA ramps (train.ema_ramp): `fresh`, those not loaded from model.init_from
    (all of them when training from scratch); `all`; `none` (the official DeeDiff fine-tune)."""
    names = {name for name, _ in model.named_parameters()}
    if rule == "all":
        return names
    if rule == "none":
        return set()
    return names - loaded


def parameter_groups(model: nn.Module, t_cfg: dict) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and position embeddings; the method's own
    modules (model.extras: UEMs, exit predictors) at train.extras_lr_mult times the learning rate."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        no_decay = name.endswith("pos_embed") or p.ndim < 2
        groups.setdefault((name.startswith("extras."), no_decay), []).append(p)
    return [{"params": params, "weight_decay": 0.0 if no_decay else t_cfg["weight_decay"],
             "lr_mult": t_cfg["extras_lr_mult"] if extras else 1.0}
            for (extras, no_decay), params in sorted(groups.items())]


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def weights_config(cfg: dict) -> dict:
    """The config whose trained checkpoint a run of `cfg` evaluates: `cfg` itself, or, for a method that
    evaluates another method's weights (`weights_from`: static exits of DeeDiff), that method's run,
    resolved with the same profile layers and overrides (bench.config.resolve_for)."""
    source = build_method(cfg["run"]["method"], cfg["method"]).weights_from
    return cfg if source is None else resolve_for(cfg, source)


def train(cfg: dict, *, stop_at: int | None = None, progress: bool | None = None, address: str | None = None) -> Path:
    """Train (or resume) the run that `cfg` describes; returns its final checkpoint.

    `stop_at` ends the call after that many steps in all, leaving a resumable checkpoint
    (used to test resumption). A finished run with the same resolved config is reused.
    A method that evaluates another method's weights trains (or reuses) that method's run.
    With train.num_workers > 1 the steps run data-parallel on Ray Train (bench.distributed), on a
    private local Ray runtime or on the cluster at `address`.
    """
    source = weights_config(cfg)
    if source is not cfg:
        return train(source, stop_at=stop_at, progress=progress, address=address)
    run_dir = checkpoint_dir(cfg)
    if (run_dir / "final.pt").exists():
        return run_dir / "final.pt"
    if cfg["train"]["num_workers"] == 1:  # no such device: stop before anything is written (workers check their own)
        resolve_device(cfg["run"]["device"])
    if address is not None and cfg["train"]["num_workers"] == 1:
        raise UserError(f"--address {address} joins a Ray cluster for data-parallel training, but train.num_workers "
                        f"is 1 (one process, no Ray); set --set train.num_workers=N, or leave --address out")
    run_dir.mkdir(parents=True, exist_ok=True)
    with _run_lock(run_dir):
        if (run_dir / "final.pt").exists():  # finished by another trainer since the check above
            return run_dir / "final.pt"
        if cfg["train"]["num_workers"] > 1:
            from bench.distributed import train_data_parallel

            show = cfg["train"]["progress"] if progress is None else progress
            return train_data_parallel(cfg, run_dir, stop_at, show, address=address)
        return _train(cfg, run_dir, stop_at, progress)


@contextmanager
def _run_lock(run_dir: Path):
    """One trainer per run folder: a second `bench train` of the same configuration stops with a clear
    error instead of training alongside (the lock is released when the process ends, however it ends)."""
    with open(run_dir / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise RunBusyError(f"{run_dir} is being trained by {holder}; wait for it to finish (its checkpoint is "
                               f"then reused) or stop it first") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _train(cfg: dict, run_dir: Path, stop_at: int | None, progress: bool | None, *,
           world: World | None = None, device: torch.device | None = None) -> Path:
    """The training loop of `train`, run while holding the run folder's lock, in one process or as one
    of `world.size` data-parallel workers (bench.distributed: rows lo..hi of every batch; rank 0 writes)."""
    t_cfg, seed = cfg["train"], cfg["run"]["seed"]
    final, last = run_dir / "final.pt", run_dir / "last.pt"
    world = world or World()
    device = device or resolve_device(cfg["run"]["device"])
    lo, hi = world.share(t_cfg["batch_size"])

    if not world.is_main:
        world.barrier()  # rank 0 prepares (a stand-in) and downloads (data.download) first, alone
    prepare_data(cfg)
    dataset = build_train_dataset(cfg)
    if world.is_main:
        world.barrier()
    conditioning = build_conditioning(cfg)
    schedule = build_schedule(cfg)
    method = build_method(cfg["run"]["method"], cfg["method"])
    method.diffusion_schedule = schedule
    torch.manual_seed(seed)  # the initial weights, too, follow from the run seed
    model = build_model(cfg, method).to(device)
    ema = build_model(cfg, method).to(device).requires_grad_(False)
    state = load_checkpoint(last) if last.exists() else None
    loaded: set[str] = set()  # state-dict keys that came from model.init_from
    if state is not None:
        check_identity(state, cfg, last)
        load_state_into(model, state["model"])
        load_state_into(ema, state["ema"])
        start = state["step"]
        loaded = set(state.get("loaded_from_init", []))
    else:
        start = 0
        if cfg["model"]["init_from"] and not method.from_scratch:
            # another method's modules in the file (a DeeDiff checkpoint as a static model's start) are left out
            loaded = load_weights_into(model, cfg["model"]["init_from"], drop_extras=True)
        if method.prepare_images:  # a change of the model before the first step (pruning), made once
            images, cond = calibration_batch(dataset, method.prepare_images, seed, device, conditioning)
            extra = {} if cond is None else {"cond": cond}  # methods for unconditional models need not take it
            method.prepare(model, images, schedule, _step_generator(seed, 0, salt=3), **extra)
            if not world.same_everywhere(sum(p.numel() for p in model.parameters())):
                raise UserError(f"method {cfg['run']['method']}: its preparation (pruning) chose different structures "
                                f"on different workers (ties broken differently); train it with train.num_workers=1")
        load_state_into(ema, model.state_dict())
    # the optimizer is built after any change of structure, so that it holds the final parameters; on a
    # GPU its fused kernel (one launch for all parameters); TF32 matmuls while training (_tf32)
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(parameter_groups(model, t_cfg), lr=t_cfg["lr"], betas=tuple(t_cfg["betas"]),
                                  **({"fused": True} if cuda else {}))
    ramped = ramped_parameters(model, loaded, t_cfg["ema_ramp"])
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])

    log_path = run_dir / "loss.csv"
    if world.is_main:
        _truncate_log(log_path, start)
    joint = t_cfg["steps"]  # steps of the method's own objective; then the exit modules' calibration
    total = joint + (t_cfg["exit_calibration_steps"] if has_extras(model) else 0)
    end = total if stop_at is None else min(stop_at, total)
    sampler = StepBatchSampler(len(dataset), t_cfg["batch_size"], seed, start, end, share=(lo, hi))
    if cfg["data"]["preload"]:
        images, labels = preload(dataset, cfg["data"]["num_workers"], device)
        loader = ((_as_model_input(images[idx]), labels[idx]) for idx in map(torch.tensor, sampler))
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg["data"]["num_workers"])

    started = time.perf_counter()
    out_of_time = False
    show = t_cfg["progress"] if progress is None else progress
    bar = _progress(show and world.is_main, start, total, f"train {cfg['run']['method']} on {cfg['run']['dataset']}")
    model.train()
    tick, images_since = time.perf_counter(), 0
    deadline = time.perf_counter() + t_cfg["max_seconds"] if t_cfg["max_seconds"] > 0 else float("inf")
    with _tf32(cuda), open(log_path if world.is_main else os.devnull, "a", newline="") as log_file:
        log = csv.writer(log_file)
        for step, (x0, label) in zip(range(start, end), loader):
            if step >= joint and (step == joint or step == start):  # entering (or resuming) the calibration
                begin_exit_calibration(model, ema)
            gen = _step_generator(seed, step)
            # dropout and anything else on the global RNG; each worker its own masks (one process: as before)
            torch.manual_seed((seed * 1_000_003 + step) * world.size + world.rank)
            # every draw is made for the whole batch and sliced, so that workers see what one process would
            batch = t_cfg["batch_size"]
            if cfg["data"]["flip"]:
                flip = (torch.rand(batch, generator=gen) < 0.5)[lo:hi]
                x0 = torch.where(flip[:, None, None, None].to(x0.device), x0.flip(-1), x0)
            t = schedule.sample_train_time(batch, generator=gen)[lo:hi]
            noise = torch.randn((batch, *x0.shape[1:]), generator=gen)[lo:hi]
            x0, noise = x0.to(device), noise.to(device)
            x_t = schedule.add_noise(x0, t, noise)
            model_t = schedule.model_time(t).to(device)
            cond = None if conditioning is None else conditioning.training(label, gen, device, rows=(lo, batch))

            for group in optimizer.param_groups:
                group["lr"] = learning_rate(t_cfg, step) * group["lr_mult"]
            with _autocast(device, t_cfg["precision"]):
                loss, logs = method.loss(model, x_t, model_t, noise, cond)
            loss_all = world.mean(loss.detach())  # the whole batch's: every worker stops at the same step
            if not torch.isfinite(loss_all):
                saved = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
                raise TrainingDiverged(  # steps counted from 1, as in loss.csv
                    f"loss is {loss_all.item()} at step {step + 1} (lr {learning_rate(t_cfg, step):.2e}); lower train.lr, "
                    f"raise train.warmup_steps or set train.grad_clip ({saved}; delete {run_dir} to start over "
                    f"with other settings, which make a new run folder anyway)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            world.average_gradients(model)
            if t_cfg["grad_clip"] > 0:
                nn.utils.clip_grad_norm_(model.parameters(), t_cfg["grad_clip"])
            optimizer.step()
            update_ema(ema, model, t_cfg["ema_decay"], step, ramped)
            if step >= joint:  # calibrated exit modules are used as they are, on the EMA backbone they were fitted to
                ema.extras.load_state_dict(model.extras.state_dict())

            images_since += x0.shape[0] * world.size
            done = step + 1
            if done % t_cfg["log_every"] == 0 or done == end:
                elapsed = time.perf_counter() - tick
                rate = images_since / max(elapsed, 1e-9)
                log.writerow([done, f"{loss_all.item():.6f}", f"{learning_rate(t_cfg, step):.3e}", f"{rate:.1f}"])
                log_file.flush()
                bar.set_postfix(loss=f"{loss_all.item():.4f}", img_s=f"{rate:.0f}")
                tick, images_since = time.perf_counter(), 0
            bar.update(1)
            out_of_time = deadline < float("inf") and world.any(time.perf_counter() > deadline)
            if world.is_main and (done % t_cfg["ckpt_every"] == 0 or done == end or out_of_time):
                _save_training_state(last, cfg, model, ema, optimizer, done, loaded)
            if out_of_time:  # a time budget ends the run here; the checkpoint says how far it got
                end = done
                break
    bar.close()

    if end < total and not out_of_time:
        return last
    if not world.is_main:
        return final
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "step": end,
                 "seconds": round(time.perf_counter() - started, 1), "workers": world.size, "config": cfg,
                 "config_hash": config_hash(cfg)}, final)
    last.unlink(missing_ok=True)
    return final


@contextmanager
def _tf32(enabled: bool):
    """TF32 matmuls while training on a GPU (for what bf16 autocast leaves in fp32), restored afterwards,
    so that sampling in the same process (bench run) does not depend on whether this call trained."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if enabled:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def has_extras(model: nn.Module) -> bool:
    """Whether a method attached modules with parameters (UEMs, exit predictors) to the backbone."""
    return any(True for _ in model.extras.parameters())


def begin_exit_calibration(model: nn.Module, ema: nn.Module) -> None:
    """Calibration of the exit modules (train.exit_calibration_steps): the backbone becomes the EMA
    backbone that evaluation uses, frozen, and only the method's modules (UEMs, exit predictors) train
    on, with the method's own loss. Why: an exit module learns the errors of the backbone it reads
    while training; in a fine-tune much shorter than the EMA's horizon the evaluated EMA backbone lags
    the trained one, so the modules would judge exits the evaluated model does not have."""
    model.backbone.load_state_dict(ema.backbone.state_dict())
    model.backbone.requires_grad_(False)
    model.backbone.eval()  # as evaluation runs it (the DDIM U-Net's dropout off)


def _save_training_state(path: Path, cfg: dict, model, ema, optimizer, step: int, loaded: set[str]) -> None:
    atomic_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "config": cfg, "config_hash": config_hash(cfg),
                 "loaded_from_init": sorted(loaded)}, path)


def _truncate_log(path: Path, step: int) -> None:
    """Start a log, or drop rows written after the checkpoint we resume from."""
    header = ["step", "loss", "lr", "images_per_s"]
    rows = []
    if path.exists() and step > 0:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if r and r[0] != "step" and int(r[0]) <= step]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _progress(show: bool, initial: int, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not show, unit="step", dynamic_ncols=True)
