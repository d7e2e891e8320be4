"""Diffusion backbones that implement the exit contract (backbones/contract.py).

Named sizes are one-line factories registered in BACKBONES. Every factory takes the image
geometry of the dataset (`img_size`, `channels`, and `num_classes` where the backbone is
class-conditional) plus any constructor keyword to override.
"""
from bench.registry import Registry

BACKBONES: Registry = Registry("backbone")

from backbones import ddim_unet, uvit  # noqa: E402,F401  (importing registers the sizes)


def build_backbone(name: str, **kwargs):
    """Instantiate the registered size `name`."""
    return BACKBONES.get(name)(**kwargs)
