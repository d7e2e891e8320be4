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


@dataclass
class ExitRecord:
    """Exit blocks of every network call: one (B,) tensor per call, in call order."""

    exit_blocks: list[Tensor] = field(default_factory=list)  # block index each sample stopped after
    model_times: list[float] = field(default_factory=list)   # the network time of each call
    blocks_run: int = 0                                       # blocks actually executed, summed over samples

    def layer_ratio(self, num_exits: int) -> float:
        """Mean fraction of blocks used per sample and call (from the recorded exit blocks)."""
        if not self.exit_blocks:
            return float("nan")
        used = torch.cat(self.exit_blocks).double() + 1
        return float(used.mean() / num_exits)

    def per_call(self, num_exits: int) -> list[float]:
        """Layer ratio of each network call (one sampling step for single-evaluation samplers)."""
        return [float((e.double() + 1).mean() / num_exits) for e in self.exit_blocks]


class EarlyExitModel:
    """eps_fn(x, model_t) with early exit; records where every sample stopped at every call.

    threshold=None runs the full model (the method is never asked). `cond` is the class or
    text condition of the whole batch, if any.
    """

    def __init__(self, model, method, threshold: float | None = None, mode: str = "realised",
                 cond: Tensor | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown engine mode {mode!r}; valid: {', '.join(MODES)}")
        self.model, self.method, self.threshold, self.mode, self.cond = model, method, threshold, mode, cond
        self.backbone = model.backbone
        self.record = ExitRecord()

    @property
    def num_exits(self) -> int:
        return self.backbone.num_exits

    @torch.no_grad()
    def __call__(self, x: Tensor, model_t: Tensor) -> Tensor:
        return self.predict(x, model_t)

    def predict(self, x: Tensor, model_t: Tensor) -> Tensor:
        bb, last = self.backbone, self.backbone.num_exits - 1
        batch = x.shape[0]
        state = bb.prepare(x, model_t, self.cond)
        ctx = {"model_t": model_t}  # per-sample context a method may extend (batch-first tensors only)
        out = torch.empty_like(x)
        exit_block = torch.full((batch,), last, dtype=torch.long, device=x.device)
        active = torch.arange(batch, device=x.device)   # positions (in x) of the samples still running
        undecided = torch.ones(batch, dtype=torch.bool, device=x.device)  # simulate: not yet stopped
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            self.record.blocks_run += len(active)
            if i == last:
                rows = active if self.mode == "realised" else active[undecided]
                if len(rows):
                    pred = bb.head(state if self.mode == "realised" else select_state(state, undecided), i)
                    out[rows] = pred.to(out.dtype)
                break
            stop = None if self.threshold is None else self.method.decide(self.model, i, state, ctx, self.threshold)
            if stop is None:
                continue
            stop = stop.to(torch.bool)
            if self.mode == "simulate":
                stop = stop & undecided
                if stop.any():
                    out[active[stop]] = bb.head(select_state(state, stop), i).to(out.dtype)
                    exit_block[active[stop]] = i
                    undecided &= ~stop
                continue
            if stop.any():
                out[active[stop]] = bb.head(select_state(state, stop), i).to(out.dtype)
                exit_block[active[stop]] = i
                keep = ~stop
                active = active[keep]
                if len(active) == 0:
                    break
                state, ctx = select_state(state, keep), select_state(ctx, keep)
        self.record.exit_blocks.append(exit_block.cpu())
        self.record.model_times.append(float(model_t.float().mean()))
        return out
