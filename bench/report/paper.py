"""The DeeDiff paper's published numbers, for `bench report --paper`.

Source: Tang et al., "DeeDiff: Dynamic Uncertainty-Aware Early Exiting for Accelerating Diffusion
Model Generation", Table 1 (CIFAR-10, CelebA 64, ImageNet 256, MS-COCO) and Table 3 (ablations on
CelebA), exactly as /work/shared/REFERENCE.md ("Headline numbers" and "Other tables") states them.
Only numbers REFERENCE.md states are here; every other paper cell reads "not in REFERENCE.md".
The paper's FIDs use 50k samples (MS-COCO: U-ViT's protocol uses 30k) on GPUs, and its GFLOPs are
about twice fvcore's multiply-adds that our `gflops` column holds (REFERENCE.md, "Known pitfalls").
"""
from __future__ import annotations

# (row key, dataset) -> {"fid", "reduction" (fraction of layers removed), "gflops"}; absent = not stated.
PAPER: dict[tuple[str, str], dict[str, float]] = {
    # Table 1: FID / layer reduction / GFLOPs
    ("uvit", "cifar10"): {"fid": 3.11, "reduction": 0.0, "gflops": 22.86},
    ("uvit", "celeba"): {"fid": 2.87, "reduction": 0.0, "gflops": 23.01},
    ("uvit", "imagenet256"): {"fid": 3.4, "reduction": 0.0, "gflops": 142.2},
    ("uvit", "mscoco"): {"fid": 5.95, "reduction": 0.0, "gflops": 25.04},
    ("bertxit", "cifar10"): {"fid": 20.5, "reduction": 0.205, "gflops": 18.18},
    ("bertxit", "celeba"): {"fid": 31.01, "reduction": 0.185, "gflops": 18.79},
    ("bertxit", "imagenet256"): {"fid": 23.5, "reduction": 0.178, "gflops": 116.89},
    ("bertxit", "mscoco"): {"fid": 18.9, "reduction": 0.100, "gflops": 22.53},
    ("calm", "cifar10"): {"fid": 20.0, "reduction": 0.205, "gflops": 18.18},
    ("calm", "celeba"): {"fid": 25.3, "reduction": 0.205, "gflops": 18.33},
    ("calm", "imagenet256"): {"fid": 21.4, "reduction": 0.193, "gflops": 114.76},
    ("calm", "mscoco"): {"fid": 17.0, "reduction": 0.154, "gflops": 21.18},
    ("static", "celeba"): {"fid": 5.04, "reduction": 0.3209},
    ("deediff_full", "cifar10"): {"fid": 2.7},
    ("deediff_full", "celeba"): {"fid": 2.63},
    ("deediff_full", "imagenet256"): {"fid": 3.61},
    ("deediff_full", "mscoco"): {"fid": 6.12},
    ("deediff", "cifar10"): {"fid": 3.7, "reduction": 0.477, "gflops": 11.97},
    ("deediff", "celeba"): {"fid": 3.9, "reduction": 0.462, "gflops": 12.48},
    ("deediff", "imagenet256"): {"fid": 4.5, "reduction": 0.452, "gflops": 77.88},
    ("deediff", "mscoco"): {"fid": 7.40, "reduction": 0.436, "gflops": 14.12},
    # Table 1's 100-step comparison (the pruning numbers are Diff-Pruning's, on its DDPM U-Net)
    ("pruning100", "cifar10"): {"fid": 5.29, "reduction": 0.442},
    ("pruning100", "celeba"): {"fid": 6.24, "reduction": 0.443},
    ("deediff100", "cifar10"): {"fid": 4.12, "reduction": 0.477},
    ("deediff100", "celeba"): {"fid": 4.67, "reduction": 0.462},
    # Table 3: ablations on CelebA (the DeeDiff reference row is Table 1's CelebA row)
    ("ablation_no_ua", "celeba"): {"fid": 14.5, "reduction": 0.20},
    ("ablation_shared", "celeba"): {"fid": 5.7, "reduction": 0.417},
    ("ablation_dpm", "celeba"): {"fid": 3.9, "reduction": 0.423},
}
PAPER["ablation_ref", "celeba"] = PAPER["deediff", "celeba"]

NOT_STATED = "not in REFERENCE.md"
# Tables whose numbers REFERENCE.md only summarises in words: shown as a note under the table.
SUMMARIES = {
    "6": "paper (REFERENCE.md): early exit on the DDIM U-Net saves about 40% of the layers for about +0.8 FID "
         "at 50 and 100 steps; per-cell numbers are not in REFERENCE.md.",
}
PAPER_NOTE = ("Paper columns: the DeeDiff paper's numbers as REFERENCE.md lists them (FID of 50k samples, "
              "MS-COCO 30k in U-ViT's protocol; GPUs; its GFLOPs are about 2x fvcore's multiply-adds in our "
              "GMACs column). '" + NOT_STATED + "': REFERENCE.md gives no number for that cell.")


def paper_numbers(key: str | None, dataset: str) -> dict[str, float] | None:
    """The paper's numbers for a row and dataset, or None where REFERENCE.md states none."""
    return PAPER.get((key, dataset)) if key else None
