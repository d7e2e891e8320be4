"""Latent diffusion data: the image autoencoder, the caption encoder, and ``bench prepare``.

    >>> codec = load_autoencoder("random:tiny")            # or a local folder, or "stabilityai/sd-vae-ft-ema"
    >>> z = codec.encode(images)                           # B x 3 x 256 x 256 in [-1, 1] -> B x 4 x 32 x 32
    >>> text = load_text_encoder("random:tiny")            # or "openai/clip-vit-large-patch14"
    >>> c = text.encode(["a photo of a cat"])              # 1 x 77 x D
    >>> prepare("imagenet256", "/data/ILSVRC2012/train", "data/imagenet256")

diffusers and transformers are imported only when a model is built. Reading prepared layouts as
datasets is ``bench.data`` (``imagenet256``, ``mscoco``).
"""
from .autoencoder import COCO_SCALE, SD_SCALE, LatentCodec, SpecError, load_autoencoder
from bench.data.layout import LayoutError, is_finished, read_meta, verify_layout
from .text import TextEncoder, load_text_encoder


def prepare(dataset, source, out, **options):
    """See ``bench.latent.command.prepare``."""
    from .command import prepare as _prepare

    return _prepare(dataset, source, out, **options)


def prepare_standin(dataset, out_dir, n=None, **options):
    """See ``bench.latent.standin.prepare_standin``."""
    from .standin import STANDIN_DEFAULTS, prepare_standin as _prepare_standin

    return _prepare_standin(dataset, out_dir, STANDIN_DEFAULTS["n"] if n is None else n, **options)


__all__ = ["LatentCodec", "TextEncoder", "load_autoencoder", "load_text_encoder", "prepare", "prepare_standin",
           "SD_SCALE", "COCO_SCALE", "SpecError", "LayoutError", "is_finished", "read_meta", "verify_layout"]
