"""The exit contract that every backbone implements (see DESIGN.md).

A backbone exposes its computation as a sequence of exit points:

    state = model.prepare(x, t, cond)          # embeddings, skip stacks, ...
    for i in range(model.num_exits):
        state = model.run_block(i, state)
        eps_i = model.head(state, i)           # the prediction if we stopped after block i
    model.hidden(state)                        # what an exit module reads

`state` is a plain dict. Every tensor in it (also inside lists and tuples) has the batch
as its first dimension, so the early-exit engine can drop the samples that exited with
`select_state`; values that are not tensors (counters, flags) are shared by all samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

State = dict[str, Any]


@dataclass(frozen=True)
class ExitInfo:
    """What an exit module needs to know about exit i (after timm's feature_info): the layout of the
    hidden state `hidden(state)` returns, its width, its per-sample shape, and whether the exit lies
    in the first half (U-ViT's in-blocks, the U-Net's down levels: a long-skip network that stops there
    skips its whole second half)."""
    layout: Literal["tokens", "map"]  # tokens: (B, L, D) patch tokens; map: (B, C, H, W) feature map
    width: int                        # D, or C_i
    hidden_shape: tuple[int, ...]     # per sample: (L, D) or (C_i, H_i, W_i)
    first_half: bool


@dataclass(frozen=True)
class OutputInfo:
    """The prediction every exit's head makes, (B, channels, size, size); `patch_size` is the side of a
    token's patch (1 for a map), so that an exit module over tokens can write a per-pixel map."""
    channels: int
    size: int
    patch_size: int = 1


class ExitBackbone(Protocol):
    """What the engine and the methods may rely on."""

    num_exits: int
    exit_layout: Literal["tokens", "map"]  # of every exit's hidden state (cheap: read in the deciding loop)
    first_half_exits: int                  # exits 0..first_half_exits-1 lie in the first half (cheap)
    exit_info: list[ExitInfo]              # one per exit (may run a batch-1 pass: read it when building)
    output_info: OutputInfo

    def prepare(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> State: ...

    def run_block(self, i: int, state: State) -> State: ...

    def hidden(self, state: State) -> Tensor: ...

    def head(self, state: State, i: int) -> Tensor: ...

    # optional: `head_keys`, the state entries `head` reads (the engine gathers only those for the
    # samples that exit); without it the whole state is gathered

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...

    def flops_per_part(self) -> dict[str, float]: ...


def _select(value: Any, keep: Tensor) -> Any:
    if isinstance(value, Tensor):
        return value[keep]
    if isinstance(value, (list, tuple)):
        return type(value)(_select(v, keep) for v in value)
    return value


def select_state(state: State, keep: Tensor, keys: tuple[str, ...] | None = None) -> State:
    """The state of the samples in `keep` (a bool mask or an index tensor over the batch); with `keys`,
    only those entries (what a head reads: an exiting sample's skip stack need not be copied)."""
    return {key: _select(value, keep) for key, value in state.items() if keys is None or key in keys}


def run_all_blocks(model: ExitBackbone, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
    """Full-depth prediction through the contract; must equal `model.forward`."""
    state = model.prepare(x, t, cond)
    for i in range(model.num_exits):
        state = model.run_block(i, state)
    return model.head(state, model.num_exits - 1)


def _sdpa_macs(inputs, outputs) -> float:
    """fvcore handle for scaled_dot_product_attention, which fvcore would skip: Q K^T and A V."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[j]) for j in range(3))  # (..., L, d), (..., S, d), (..., S, dv)
    batch = 1
    for n in q[:-2]:
        batch *= n
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def _flops_of(model: torch.nn.Module, fn, state: Any) -> float:
    """fvcore count of `fn(state)` in GMACs (fvcore calls one multiply-add a flop)."""
    from fvcore.nn import FlopCountAnalysis
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(state)
    where = [j for j, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]

    class _Part(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model  # registered, so tracing sees parameters rather than constants

        def forward(self, *tensors):
            filled = list(leaves)
            for j, tensor in zip(where, tensors):
                filled[j] = tensor
            out, _ = tree_flatten(fn(tree_unflatten(filled, spec)))
            return tuple(o for o in out if isinstance(o, Tensor))

    analysis = FlopCountAnalysis(_Part(), tuple(leaves[j] for j in where))
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis.total() / 1e9


@torch.no_grad()
def measure_flops_per_part(model: ExitBackbone, x: Tensor, t: Tensor, cond: Tensor | None = None) -> dict[str, float]:
    """GMACs of prepare, of each block and of each exit head, for the given (batch-1) input.

    The unit is fvcore's: one multiply-add counts as one "flop". Attention through
    scaled_dot_product_attention is counted (fvcore alone would skip it).
    """
    costs = {"prepare": _flops_of(model, lambda s: model.prepare(*s), (x, t, cond))}
    state = model.prepare(x, t, cond)
    for i in range(model.num_exits):
        costs[f"block_{i}"] = _flops_of(model, lambda s, i=i: model.run_block(i, s), state)
        state = model.run_block(i, state)
        costs[f"head_{i}"] = _flops_of(model, lambda s, i=i: model.head(s, i), state)
    return costs
