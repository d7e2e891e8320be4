"""Run a backbone block by block over the samples that are still active.

After block i the method says, per sample, whether to stop. In the `realised` mode the samples
that stop get their prediction from `head(state, i)` and leave the batch, so the blocks after i
really run on fewer samples; in the `simulate` mode every sample runs every block and only the
exit block is recorded (its output is still the prediction at that exit). The samplers see an
EarlyExitModel as eps_fn(x, model_t).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from backbones.contract import select_state

MODES = ("realised", "simulate")
# Classifier-free guidance runs every sample twice (conditional and unconditional halves of one batch).
# Both halves of a sample must stop at the same block, so that eps_c + s (eps_c - eps_u) combines
# predictions of the same depth; the rule says whose decision counts:
#   both: the pair stops when the method would stop both halves (never exits on the weaker half's word)
#   cond: the conditional half decides, the unconditional half follows
#   any:  the pair stops as soon as either half would
GUIDANCE_EXITS = ("both", "cond", "any")


@dataclass
class ExitRecord:
    """Exit blocks of every network call: one (B,) tensor per call, in call order.

    The engine adds each call's record on the device (`add`), so that recording costs no host sync;
    reading `exit_blocks` or `model_times` moves what is pending to the host, once.
    """

    blocks_run: int = 0                                      # blocks actually executed, summed over samples
    _exits: list[Tensor] = field(default_factory=list)      # block index each sample stopped after
    _times: list = field(default_factory=list)              # the network time of each call

    def add(self, exit_block: Tensor, model_time: Tensor) -> None:
        self._exits.append(exit_block)
        self._times.append(model_time.float().mean())

    @property
    def exit_blocks(self) -> list[Tensor]:
        self._exits = [e.cpu() for e in self._exits]
        return self._exits

    @property
    def model_times(self) -> list[float]:
        self._times = [float(t) for t in self._times]
        return self._times

    def layer_ratio(self, num_exits: int) -> float:
        """Mean fraction of blocks used per sample and call (from the recorded exit blocks)."""
        if not self._exits:
            return float("nan")
        used = torch.cat(self.exit_blocks).double() + 1
        return float(used.mean() / num_exits)

    def per_call(self, num_exits: int) -> list[float]:
        """Layer ratio of each network call (one sampling step for single-evaluation samplers)."""
        return [float((e.double() + 1).mean() / num_exits) for e in self.exit_blocks]


class EarlyExitModel:
    """eps_fn(x, model_t) with early exit; records where every sample stopped at every call.

    threshold=None runs the full model (the method is never asked). `cond` is the class labels (B,)
    or text features (B, 77, D) of the samples in the batch, if any. With `guidance_scale` set and
    `uncond` (the null label, or the empty caption's features) the prediction is U-ViT's classifier-free
    guidance eps_c + scale * (eps_c - eps_u), from one batch of 2B; `guidance_exit` (GUIDANCE_EXITS)
    says how the two halves of a sample share one exit block. The record holds one exit per sample.
    """

    def __init__(self, model, method, threshold: float | None = None, mode: str = "realised",
                 cond: Tensor | None = None, uncond: Tensor | None = None, guidance_scale: float | None = None,
                 guidance_exit: str = "both"):
        if mode not in MODES:
            raise ValueError(f"unknown engine mode {mode!r}; valid: {', '.join(MODES)}")
        if guidance_exit not in GUIDANCE_EXITS:
            raise ValueError(f"unknown guidance_exit {guidance_exit!r}; valid: {', '.join(GUIDANCE_EXITS)}")
        if guidance_scale and uncond is None:
            raise ValueError("guidance needs the unconditional input (null label or empty-caption features)")
        self.model, self.method, self.threshold, self.mode, self.cond = model, method, threshold, mode, cond
        self.uncond, self.guidance_scale, self.guidance_exit = uncond, guidance_scale, guidance_exit
        self.backbone = model.backbone
        self.record = ExitRecord()

    @property
    def guided(self) -> bool:
        return bool(self.guidance_scale) and self.cond is not None

    @property
    def num_exits(self) -> int:
        return self.backbone.num_exits

    @torch.no_grad()
    def __call__(self, x: Tensor, model_t: Tensor) -> Tensor:
        return self.predict(x, model_t)

    def predict(self, x: Tensor, model_t: Tensor) -> Tensor:
        if not self.guided:
            return self._run(x, model_t, self.cond, paired=False)
        batch = x.shape[0]
        uncond = self.uncond.to(self.cond.device).expand(batch, *self.cond.shape[1:]).to(self.cond.dtype)
        t = model_t.expand(batch) if model_t.dim() == 0 else model_t
        out = self._run(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.cond, uncond]), paired=True)
        eps_c, eps_u = out[:batch], out[batch:]
        return eps_c + self.guidance_scale * (eps_c - eps_u)  # U-ViT's convention: scale 0 = no guidance

    def _pair(self, stop: Tensor) -> Tensor:
        """One decision for both halves: active samples are [conditional..., unconditional...] in the
        same order, because every removal so far was symmetric."""
        half = len(stop) // 2
        c, u = stop[:half], stop[half:]
        pair = c & u if self.guidance_exit == "both" else c if self.guidance_exit == "cond" else c | u
        return torch.cat([pair, pair])

    def _run(self, x: Tensor, model_t: Tensor, cond: Tensor | None, paired: bool) -> Tensor:
        """Block by block over the active samples. Bookkeeping costs one host sync per block where the
        method decides (how many stop); samples leave by index gathers, and an exiting sample's state is
        gathered only as far as the head reads it (the backbone's `head_keys`). Where every active sample
        ends at once (the last block, or all of them stop) the head's output is written without gathers."""
        bb, last = self.backbone, self.backbone.num_exits - 1
        batch = x.shape[0]
        state = bb.prepare(x, model_t, cond)
        ctx = {"model_t": model_t}  # per-sample context a method may extend (batch-first tensors only)
        out = None           # the prediction; allocated when the first samples leave before the others
        exit_block = torch.full((batch,), last, dtype=torch.long, device=x.device)
        active = None        # positions (in x) of the samples still running; None: all of them, in order
        undecided = None     # simulate: the samples not yet stopped (bool (B,)); None: all of them
        head_keys = getattr(bb, "head_keys", None)
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            self.record.blocks_run += batch if active is None else len(active)
            if i == last:
                if out is None:  # nobody left early: the head's output is the output
                    out = bb.head(state, i).to(x.dtype)
                elif self.mode == "realised":
                    out[active] = bb.head(state, i).to(out.dtype)
                else:  # simulate: every sample ran every block; those not yet stopped take the last head
                    rows = undecided.nonzero().squeeze(1)
                    if len(rows):
                        out[rows] = bb.head(select_state(state, rows, head_keys), i).to(out.dtype)
                break
            stop = None if self.threshold is None else self.method.decide(self.model, i, state, ctx, self.threshold)
            if stop is None:
                continue
            stop = stop.to(torch.bool)
            if paired:
                stop = self._pair(stop)
            if undecided is not None:
                stop = stop & undecided
            n_stop = int(stop.sum())  # the one host sync of this block
            if n_stop == 0:
                continue
            if n_stop == len(stop) and self.mode == "realised":  # every active sample stops here
                if out is None:
                    out = bb.head(state, i).to(x.dtype)
                    exit_block.fill_(i)
                else:
                    out[active] = bb.head(state, i).to(out.dtype)
                    exit_block[active] = i
                break
            # stable order: the samples that go on first, then those that stop, each in batch order
            order = torch.argsort(stop.to(torch.int8), stable=True)
            leaving, staying = order[len(stop) - n_stop:], order[:len(stop) - n_stop]
            rows = leaving if active is None else active[leaving]
            if out is None:
                out = torch.empty_like(x)
            out[rows] = bb.head(select_state(state, leaving, head_keys), i).to(out.dtype)
            exit_block[rows] = i
            if self.mode == "simulate":
                undecided = ~stop if undecided is None else undecided & ~stop
                continue
            active = staying if active is None else active[staying]
            state, ctx = select_state(state, staying), select_state(ctx, staying)
        if out.shape != x.shape:  # the fast paths return the head's own tensor: a wrong head would pass unseen
            raise RuntimeError(f"the backbone's head returned {tuple(out.shape)} for an input of {tuple(x.shape)}; "
                               "an exit's prediction must have the input's shape")
        self.record.add(exit_block[:batch // 2 if paired else batch], model_t)
        return out
