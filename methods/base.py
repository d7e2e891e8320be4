"""The method plugin interface (DESIGN.md): attach, loss, decide, and every other hook the harness
calls, each declared here with a default, so that a plugin overrides what it needs and nothing is
probed for with hasattr."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Method:
    """Base of every method plugin. Subclasses register themselves in methods.METHODS."""

    def __init__(self, hparams: dict | None = None):
        self.hparams = dict(hparams or {})

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        """The modules this method adds to the backbone (none by default)."""
        return nn.ModuleDict()

    def loss(self, model: "DiffusionModel", x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The training objective for one batch; returns the loss and numbers to log."""
        raise NotImplementedError

    # The exit signal: what `decide` compares with the threshold, and in which direction.
    signal = "none"
    threshold_range: tuple[float, float] | None = None
    default_thresholds: tuple[float, ...] = ()

    # Whether the objective trains the backbone's exit heads (the DDIM U-Net's per-exit heads): a
    # checkpoint of a method that does not holds them at their random initialisation.
    trains_exits = False

    # A method that evaluates another method's trained weights names it here (static exits of the
    # DeeDiff checkpoint, paper Table 5); training then trains (or reuses) that method's checkpoint.
    weights_from: str | None = None

    # The operating point of `bench run` (methods.<name>.threshold); build_method sets it, the plugin
    # only reads it. None: full depth.
    threshold: float | None = None

    # The diffusion schedule of the run (alpha_t, sigma_t), set by training (and `bench perf`) before
    # the first loss, for an objective that depends on the noise level beyond the network's time input.
    diffusion_schedule = None

    # Training ignores model.init_from for a model trained from scratch (the small model, Table 4).
    from_scratch = False

    # > 0: training draws this many clean training images and calls `prepare` once, before the first
    # step and before the optimizer is built (pruning changes the structure there).
    prepare_images = 0

    # Whether threshold_range still awaits the backbone (static's fixed schedule learns the depth in
    # `attach`); the range is then checked again once the model is built.
    range_pending = False

    def prepare(self, model: "DiffusionModel", images: Tensor | list[Tensor], schedule,
                generator: torch.Generator | None = None, cond: Tensor | None = None) -> None:
        """A one-off change of the model before training (only called when prepare_images > 0)."""

    def uncertainty_maps(self, model: "DiffusionModel", x_t: Tensor, model_t: Tensor,
                         cond: Tensor | None = None) -> list[Tensor] | None:
        """Each exit's per-pixel uncertainty map for one full pass (paper Fig. 4); None: the method
        has no such maps, and evaluation stores none."""
        return None

    def decide_gmacs(self, model: "DiffusionModel") -> list[float] | None:
        """GMACs per sample that `decide` adds after each block (counted in a row's GFLOPs); None:
        deciding costs nothing worth counting (or the method never decides)."""
        return None

    def row_options(self) -> dict:
        """Resolved hyper-parameters that result rows record in place of the configured ones (a null
        default that means something, e.g. static's `weights`)."""
        return {}

    def backbone_overrides(self, backbone_name: str) -> dict:
        """Constructor overrides this method needs (the small model changes the depth)."""
        return {}

    def decide(self, model: "DiffusionModel", i: int, state: dict, ctx: dict, threshold: float) -> Tensor | None:
        """Per sample (a bool (B,) tensor), whether to stop after block i; None: do not stop here.

        `ctx` holds per-sample tensors for this network call ("model_t" and whatever the method
        keeps there, e.g. the previous hidden state); the engine drops exited samples from it.
        """
        return None


class DiffusionModel(nn.Module):
    """A backbone plus the modules a method attached to it; what training saves and loads."""

    def __init__(self, backbone: nn.Module, extras: nn.ModuleDict | None = None):
        super().__init__()
        self.backbone = backbone
        self.extras = extras if extras is not None else nn.ModuleDict()

    def forward(self, x: Tensor, model_t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.backbone(x, model_t, cond)
