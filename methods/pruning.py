"""Structural pruning after Diff-Pruning (Fang et al. 2023), then fine-tuning with L_simple.

After https://github.com/VainF/Diff-Pruning (ddpm_prune.py, --pruner diff-pruning), with
torch-pruning (imported only when pruning runs; not a dependency of the harness itself):

1. Taylor importance accumulated over timesteps: one batch of clean training images x0 and one
   fixed noise eps; for network times k = 0, 1, 2, ... the diffusion loss mse(eps_theta(x_k, k), eps)
   is back-propagated and its gradients summed, until the loss falls below `thr` times the largest
   loss seen (Diff-Pruning's script: thr = 0.05, batch 128; the step that crosses the threshold is
   included, as in ddpm_prune.py). Hparams `thr`, `calib_images`, `max_steps` (at most that many
   evaluations) and `stride` (every stride-th network time; 1 in Diff-Pruning). The score of a
   channel is Diff-Pruning's sum over its coupled weights of (w * dL/dw)^2 (|w * dL/dw| for norms).
2. Uniform channel pruning with ratio `ratio` (default 0.3, Diff-Pruning's CIFAR run) of the
   Conv2d and Linear layers except the output convs: the least important channels of every
   coupled group (torch-pruning's DependencyGraph) are removed. Channels that a GroupNorm
   normalises are pruned by the same count in each of its groups, so GroupNorm(32) stays valid:
   a group of size g loses round_half_up(ratio * g) channels (at most g - 1). With DDIM's
   GroupNorm(32) the achievable ratios are multiples of 1/g: ch 128 (the paper's configs, g = 4)
   loses 1 in 4 at ratio 0.3, ddim_tiny's 32-channel level (g = 1) cannot be pruned, its
   64-channel levels (g = 2) lose half.
3. Fine-tuning: the harness trains the pruned model with L_simple after `prepare`.

What is pruned on each backbone:

- DDIM U-Net: all conv channels (residual, skip and time-embedding widths included) except the
  image-channel outputs (conv_out and the exit heads' convs). Self-attention is pruned by our own
  code with the same score: torch-pruning does not trace the bmm contraction of q and k (it puts
  q, k and v in separate groups and would remove different channels from q and k), so q, k, v and
  proj_out's input lose one shared set of inner channels. The block's softmax scale int(c)^-0.5
  then follows the pruned width, as the official code computes it from the tensor.
- U-ViT: the MLP hidden width (fc1 out / fc2 in, through torch-pruning) and the attention head
  dimension (our code: the same dims of q, k and v in each head, the same count in every head,
  the number of heads kept; the attention scale stays the constructor's). torch-pruning's own
  num_heads support does not follow U-ViT's attention (einops rearrange, then qkv[0], qkv[1],
  qkv[2]): it maps the 3 D qkv outputs onto proj's D inputs and fails. The residual width D is
  not pruned: it runs through pos_embed, the sinusoidal time token (not a layer), the token
  concatenations and the long skips, so U-ViT's block parameters shrink by about r at `ratio` r,
  not by 1 - (1 - r)^2 as a fully pruned network's would.

Saving and loading: a pruned model's state dict has the pruned shapes, and `extras.pruning.pruned`
is set. Our checkpoints load with weights_only=True into a freshly built, unpruned model, so before
load_state_dict bench.checkpoint.load_state_into calls `fit_to_weights` of every extras module:
ours resizes each Linear / Conv2d / GroupNorm / LayerNorm of the backbone to the checkpoint's shapes.
The widths are thus re-created from the weights themselves; no code is pickled.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from methods import METHODS
from methods.base import DiffusionModel
from methods.baseline import Baseline
from methods.common import resolve_hparams

DEFAULTS = {"ratio": 0.3, "thr": 0.05, "calib_images": 128, "max_steps": 1000, "stride": 1}


def round_half_up(x: float) -> int:
    """floor(x + 1/2), with a little slack so that a float just below k + 1/2 by rounding error goes up."""
    return int(math.floor(x + 0.5 + 1e-9))


# ------------------------------------------------------------------------------------------------
# Re-creating pruned shapes from a state dict
# ------------------------------------------------------------------------------------------------


def _resize_param(module: nn.Module, name: str, shape: torch.Size) -> None:
    old = getattr(module, name)
    if old is None or old.shape == shape:
        return
    setattr(module, name, nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device),
                                       requires_grad=old.requires_grad))


def fit_backbone_to_weights(backbone: nn.Module, weights: dict[str, Tensor], prefix: str = "backbone.") -> int:
    """Resize Linear, Conv2d, GroupNorm and LayerNorm layers to the shapes in `weights`; returns how many.

    Values are left uninitialised: load_state_dict fills them next.
    """
    changed = 0
    for name, module in backbone.named_modules():
        key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
        if key not in weights or not isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            continue
        shape = weights[key].shape
        if module.weight is None or module.weight.shape == shape:
            continue
        _resize_param(module, "weight", shape)
        bias_key = key[:-len("weight")] + "bias"
        if getattr(module, "bias", None) is not None and bias_key in weights:
            _resize_param(module, "bias", weights[bias_key].shape)
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = int(shape[0]), int(shape[1])
        elif isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = int(shape[0]), int(shape[1]) * module.groups
        elif isinstance(module, nn.GroupNorm):
            if shape[0] % module.num_groups:
                raise ValueError(f"{key}: {shape[0]} channels do not split into {module.num_groups} groups")
            module.num_channels = int(shape[0])
        else:
            module.normalized_shape = (int(shape[0]),)
        changed += 1
    if changed and hasattr(backbone, "_flops"):
        backbone._flops = None  # measured costs belong to the old shapes
    return changed


class PruningState(nn.Module):
    """What a checkpoint needs to rebuild a pruned model: a flag (the shapes are in the weights)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("pruned", torch.zeros((), dtype=torch.bool))
        self.register_buffer("ratio", torch.zeros((), dtype=torch.float32))

    def fit_to_weights(self, model: DiffusionModel, weights: dict[str, Tensor]) -> None:
        """Before load_state_dict: give the backbone the pruned widths of `weights` (if they are pruned)."""
        flag = weights.get("extras.pruning.pruned")
        if flag is not None and bool(flag):
            fit_backbone_to_weights(model.backbone, weights)


# ------------------------------------------------------------------------------------------------
# Step 1: Taylor importance accumulated over timesteps
# ------------------------------------------------------------------------------------------------


def accumulate_gradients(model: DiffusionModel, images: Tensor, schedule, thr: float, max_steps: int,
                         generator: torch.Generator | None = None, stride: int = 1,
                         cond: Tensor | None = None) -> list[float]:
    """Sum the gradients of mse(eps_theta(x_k, k), eps) over network times k = 0, s, 2s, ... (Diff-Pruning: s = 1).

    At most `max_steps` evaluations. Stops after the first k whose loss is below thr * max loss (that
    step's gradient included); returns the losses. The model is in eval mode meanwhile (no dropout),
    as in Diff-Pruning. Network time k + time_offset is mapped back to the schedule's t.
    """
    was_training = model.training
    model.eval()
    noise = torch.randn(images.shape, generator=generator).to(images.device)
    offset = float(getattr(schedule, "time_offset", 0))
    times = range(0, int(getattr(schedule, "num_steps", 1000)), stride)[:max_steps]  # network times k
    losses, loss_max = [], 0.0
    model.zero_grad(set_to_none=True)
    for k in times:
        model_t = torch.full((images.shape[0],), k + offset, dtype=torch.float32, device=images.device)
        t = schedule.from_model_time(model_t.cpu().double())  # on the CPU, as in training
        x_t = schedule.add_noise(images, t, noise)
        loss = F.mse_loss(model(x_t, model_t, cond), noise)
        loss.backward()
        value = loss.item()
        losses.append(value)
        loss_max = max(loss_max, value)
        if value < thr * loss_max:
            break
    model.train(was_training)
    return losses


def _sq_taylor(weight: Tensor) -> Tensor:
    """(w * dL/dw)^2 elementwise (zero where no gradient reached the weight)."""
    grad = weight.grad if weight.grad is not None else torch.zeros_like(weight)
    return (weight.detach().float() * grad.float()).pow(2)


def group_importance(DG, group) -> Tensor:
    """Diff-Pruning's Taylor score of each channel of a torch-pruning group, in the root's channel space."""
    n = len(group[0].idxs)
    scores = torch.zeros(n, dtype=torch.float64)
    for i, (dep, idxs) in enumerate(group):
        layer, root_idxs = dep.target.module, group[i].root_idxs
        if root_idxs is None or any(r is None for r in root_idxs):
            continue
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            s = _sq_taylor(layer.weight)
            if DG.is_out_channel_pruning_fn(dep.handler):
                local = s.flatten(1).sum(1)[idxs]
            else:
                local = s.transpose(0, 1).flatten(1).sum(1)[idxs]
        elif isinstance(layer, (nn.GroupNorm, nn.LayerNorm)) and layer.weight is not None:
            local = _sq_taylor(layer.weight).sqrt()[idxs]  # |w * dw|, as Diff-Pruning scores norm layers
        else:
            continue
        scores.scatter_add_(0, torch.as_tensor(root_idxs, dtype=torch.long), local.double().cpu())
    return scores


def lowest_per_chunk(scores: Tensor, chunks: int, ratio: float) -> list[int]:
    """Indices of the round_half_up(ratio * size) lowest scores in each of `chunks` equal chunks."""
    size = scores.numel() // chunks
    n = min(size - 1, round_half_up(ratio * size))
    if n <= 0:
        return []
    order = scores.view(chunks, size).argsort(dim=1, stable=True)[:, :n]
    return sorted((order + torch.arange(chunks)[:, None] * size).flatten().tolist())


def _channel_chunks(group) -> int:
    """GroupNorm groups that the group's channels pass through (1 if none)."""
    return max([dep.target.module.num_groups for dep, _ in group if isinstance(dep.target.module, nn.GroupNorm)],
               default=1)


# ------------------------------------------------------------------------------------------------
# Step 2: pruning the backbone
# ------------------------------------------------------------------------------------------------


def _attention_plan(backbone: nn.Module, ratio: float) -> list[tuple]:
    """(out-layers, in-layer, pruned inner indices) for every attention, scored before any pruning."""
    plan = []
    for module in backbone.modules():
        if hasattr(module, "qkv") and hasattr(module, "num_heads"):  # U-ViT: fused qkv, rows (K H D)
            heads = module.num_heads
            dim = module.qkv.out_features // (3 * heads)
            s = _sq_taylor(module.qkv.weight).sum(1).view(3, heads, dim).sum(0)
            s = s + _sq_taylor(module.proj.weight).sum(0).view(heads, dim)
            per_head = lowest_per_chunk(s.flatten().double().cpu(), heads, ratio)  # h * dim + d
            rows = [k * heads * dim + j for k in range(3) for j in per_head]
            plan.append(([(module.qkv, rows)], (module.proj, per_head)))
        elif all(hasattr(module, a) for a in ("q", "k", "v", "proj_out")):  # DDIM: one head, 1x1 convs
            s = sum(_sq_taylor(getattr(module, a).weight).flatten(1).sum(1) for a in ("q", "k", "v"))
            s = s + _sq_taylor(module.proj_out.weight).transpose(0, 1).flatten(1).sum(1)
            idxs = lowest_per_chunk(s.double().cpu(), 1, ratio)
            plan.append(([(module.q, idxs), (module.k, idxs), (module.v, idxs)], (module.proj_out, idxs)))
    return plan


def _ignored_layers(backbone: nn.Module) -> list[nn.Module]:
    """Layers whose output channels torch-pruning must not prune (see the module docstring)."""
    ignored = []
    if hasattr(backbone, "patch_embed"):  # U-ViT: the residual width and the head
        ignored += [backbone.patch_embed.proj, backbone.decoder_pred]
        ignored += [m for m in (backbone.final_layer,) if isinstance(m, nn.Conv2d)]
        for block in backbone.blocks:
            ignored.append(block.attn.qkv)
            if block.skip_linear is not None:
                ignored.append(block.skip_linear)
        ignored += [m for m in backbone.time_embed.modules() if isinstance(m, nn.Linear)]
        if getattr(backbone, "context_embed", None) is not None:  # text tokens join the residual stream
            ignored.append(backbone.context_embed)
    elif hasattr(backbone, "conv_out"):  # DDIM U-Net: image-channel outputs
        ignored.append(backbone.conv_out)
        if backbone.exit_heads is not None:
            ignored += [head.conv for head in backbone.exit_heads]
    else:
        raise TypeError(f"pruning: no pruning rules for {type(backbone).__name__}")
    for module in backbone.modules():  # attention is pruned by _attention_plan
        if all(hasattr(module, a) for a in ("q", "k", "v", "proj_out")):
            ignored += [module.q, module.k, module.v]
    return ignored


def _all_exits(backbone: nn.Module, inputs: tuple) -> list[Tensor]:
    """Every exit's prediction through the contract, so that the traced graph includes the exit heads."""
    state = backbone.prepare(*inputs)
    preds = []
    for i in range(backbone.num_exits):
        state = backbone.run_block(i, state)
        preds.append(backbone.head(state, i))
    return preds


def prune_backbone(backbone: nn.Module, ratio: float, example_inputs: tuple) -> dict[str, int]:
    """Prune `backbone` in place by `ratio` with the gradients it holds; returns parameter counts."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ImportError("the pruning method needs torch-pruning (tested with 1.6.1): "
                          "pip install torch-pruning") from None

    before = sum(p.numel() for p in backbone.parameters())
    attention = _attention_plan(backbone, ratio)
    params = [(backbone.pos_embed, 2)] if hasattr(backbone, "pos_embed") else None  # U-ViT: never pruned (residual)
    DG = tp.DependencyGraph().build_dependency(backbone, example_inputs=example_inputs, forward_fn=_all_exits,
                                               unwrapped_parameters=params)
    groups = []
    for group in DG.get_all_groups(ignored_layers=_ignored_layers(backbone),
                                   root_module_types=[nn.Conv2d, nn.Linear]):
        chunks = _channel_chunks(group)
        if len(group[0].idxs) % chunks:
            continue  # cannot keep the GroupNorm valid; leave these channels alone
        idxs = lowest_per_chunk(group_importance(DG, group), chunks, ratio)
        if idxs:
            groups.append((group, idxs))
    for group, idxs in groups:  # every score was computed on the unpruned model
        group = DG.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, idxs)
        if DG.check_pruning_group(group):
            group.prune()
    for outs, (in_layer, idxs) in attention:
        if not idxs:
            continue
        for layer, rows in outs:
            (tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv_out_channels)(layer, rows)
        (tp.prune_linear_in_channels if isinstance(in_layer, nn.Linear) else tp.prune_conv_in_channels)(in_layer, idxs)
    if hasattr(backbone, "_flops"):
        backbone._flops = None
    return {"params_before": before, "params_after": sum(p.numel() for p in backbone.parameters())}


# ------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------


@METHODS.register("pruning", help="Diff-Pruning: Taylor importance over timesteps, uniform channel pruning "
                                  "(ratio, default 0.3) via torch-pruning, then fine-tuning with L_simple")
class Pruning(Baseline):
    """A structurally pruned backbone, fine-tuned with L_simple; every sample runs every block."""

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        hp = resolve_hparams("pruning", self.hparams, DEFAULTS)
        self.ratio = float(hp["ratio"])
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"pruning: ratio must be in [0, 1), got {self.ratio}")
        self.thr = float(hp["thr"])
        self.prepare_images = int(hp["calib_images"])  # train.py draws this many images for prepare
        if self.prepare_images < 1:  # 0 would skip the pruning and fine-tune an unpruned model as "pruning"
            raise ValueError(f"pruning: calib_images must be >= 1, got {hp['calib_images']}")
        self.max_steps = int(hp["max_steps"])
        self.stride = int(hp["stride"])
        if self.stride < 1 or self.max_steps < 1:
            raise ValueError(f"pruning: stride and max_steps must be >= 1, got {self.stride}, {self.max_steps}")
        self.report: dict = {}

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        return nn.ModuleDict({"pruning": PruningState()})

    def prepare(self, model: DiffusionModel, images: Tensor | list[Tensor], schedule,
                generator: torch.Generator | None = None, cond: Tensor | None = None) -> dict:
        """Prune `model` in place once, before fine-tuning.

        `images`: clean training images in [-1, 1] (N, C, H, W), or a list of such batches (joined);
        Diff-Pruning uses one batch of 128. `cond`: their class labels or text features, for a
        conditional model. A model that is already pruned (say, initialised from a pruned checkpoint)
        is left alone.
        """
        if isinstance(images, (list, tuple)):
            images = torch.cat(list(images))
        state = model.extras["pruning"]
        if bool(state.pruned):
            self.report = {"skipped": "already pruned"}
            return self.report
        if generator is None:  # train.py passes one seeded from the run seed
            generator = torch.Generator().manual_seed(0)
        with torch.autocast(images.device.type, enabled=False):
            losses = accumulate_gradients(model, images.float(), schedule, self.thr, self.max_steps, generator,
                                          self.stride, cond)
            example = (images[:1].float(), torch.zeros(1, device=images.device), None if cond is None else cond[:1])
            counts = prune_backbone(model.backbone, self.ratio, example)
        model.zero_grad(set_to_none=True)
        state.pruned.fill_(True)
        state.ratio.fill_(self.ratio)
        self.report = {**counts, "calibration_steps": len(losses), "loss_max": max(losses), "loss_last": losses[-1]}
        return self.report
