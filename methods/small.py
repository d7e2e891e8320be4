"""A shallow backbone trained from scratch with L_simple (the paper's "small model", Table 4).

The paper compares DeeDiff with a 7-layer U-ViT trained from scratch. Here the backbone is built
shallower through `backbone_overrides` (the configuration's `model.kwargs` still win):

- U-ViT: depth = hparam `depth` (default 6) -> 3 in-blocks, the mid-block, 3 out-blocks = 7 blocks,
  long skips kept.
- DDIM U-Net: one resolution level fewer (the last entry of ch_mult dropped, hparam `drop_levels`,
  default 1) and half the res blocks per level (hparam `num_res_blocks`, default
  max(1, num_res_blocks // 2)). For the CIFAR-10 config that is ch_mult (1, 2, 2), 1 res block:
  11 of 22 res blocks and 7 of 9 exits (the paper's 7/13 of U-ViT is 54%); for ddim_tiny
  (already 1 res block) ch_mult (1, 2): 5 exits, 8 of 11 res blocks.

"From scratch": the method sets `from_scratch`, and training ignores `model.init_from` for it
(a full-depth checkpoint does not fit a shallow model). It never exits early.
"""
from __future__ import annotations

from backbones.ddim_unet import CELEBA64, CIFAR10, TINY
from methods import METHODS
from methods.baseline import Baseline
from methods.common import resolve_hparams

DDIM_CONFIGS = {"ddim_cifar10": CIFAR10, "ddim_celeba64": CELEBA64, "ddim_tiny": TINY}
DEFAULTS = {"depth": 6, "drop_levels": 1, "num_res_blocks": None}


@METHODS.register("small", help="shallow model from scratch, L_simple (Table 4): U-ViT depth 6 = 7 blocks; "
                                "DDIM U-Net one level fewer, half the res blocks per level")
class SmallModel(Baseline):
    """A shallow backbone trained from scratch with L_simple; every sample runs every block."""

    from_scratch = True  # training does not load model.init_from

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        self.hp = resolve_hparams("small", self.hparams, DEFAULTS)

    def backbone_overrides(self, backbone_name: str) -> dict:
        if backbone_name.startswith("uvit"):
            depth = int(self.hp["depth"])
            if depth < 2 or depth % 2:
                raise ValueError(f"small: U-ViT depth must be even and >= 2 (depth // 2 in- and out-blocks), "
                                 f"got {depth}")
            return {"depth": depth}
        if backbone_name in DDIM_CONFIGS:
            base = DDIM_CONFIGS[backbone_name]
            drop = int(self.hp["drop_levels"])
            ch_mult = tuple(base["ch_mult"])
            if not 0 <= drop < len(ch_mult):
                raise ValueError(f"small: drop_levels must be in 0..{len(ch_mult) - 1} for {backbone_name}, got {drop}")
            blocks = self.hp["num_res_blocks"]
            blocks = max(1, base["num_res_blocks"] // 2) if blocks is None else int(blocks)
            return {"ch_mult": ch_mult[:len(ch_mult) - drop], "num_res_blocks": blocks}
        raise ValueError(f"small: no shallow counterpart defined for backbone {backbone_name!r} "
                         f"(known: uvit_*, {', '.join(sorted(DDIM_CONFIGS))})")
