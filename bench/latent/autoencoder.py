"""The image autoencoder of latent diffusion: images 3 x 256 x 256 in [-1, 1] <-> latents 4 x 32 x 32.

U-ViT's ImageNet-256 and MS-COCO models run on the latents of the Stable Diffusion autoencoder (the
KL-f8 first stage of github CompVis/stable-diffusion, converted in U-ViT's libs/autoencoder.py):
``z = scale * posterior`` with scale 0.18215 (ImageNet; U-ViT's mscoco config uses 0.23010), and
``x = decoder(z / scale)``. Here the same model class comes from diffusers (``AutoencoderKL``):

- ``"random:tiny"``: a small AutoencoderKL (4 latent channels, 8x downsampling, channel widths
  4/8/16/16) initialised from a fixed seed; the same weights on every machine.
  It is NOT the Stable Diffusion autoencoder: its latents and decodings carry no image knowledge,
  and every result row built on it says so (``LatentCodec.label``).
- a local directory in diffusers' layout (``config.json`` + ``diffusion_pytorch_model.safetensors``,
  or a ``vae/`` subfolder of a pipeline folder);
- a model-hub id such as ``stabilityai/sd-vae-ft-ema`` (the KL-f8 encoder unchanged, the decoder
  fine-tuned: its latents are those of U-ViT's autoencoder), or ``repo:subfolder`` such as
  ``CompVis/stable-diffusion-v1-4:vae`` (the original KL-f8 decoder too); it needs the hub.

Encoding keeps the posterior mean (deterministic, one latent per image); U-ViT stores the
posterior moments and draws ``mean + std * noise`` at every training step (libs/autoencoder.py,
``sample``). ``posterior="sample"`` draws one fixed sample per image instead.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from bench.errors import UserError

SD_SCALE = 0.18215  # U-ViT libs/autoencoder.py scale_factor (ImageNet configs)
COCO_SCALE = 0.23010  # U-ViT configs/mscoco_uvit_small.py autoencoder.scale_factor
DOWNSAMPLE = 8  # KL-f8: 256 x 256 -> 32 x 32
LATENT_CHANNELS = 4
TINY_SEED = 20240607
TINY_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 3 downsamplings: f = 8
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(4, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=256,
    scaling_factor=SD_SCALE,
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w./-]+)?$")
RANDOM_PREFIX = "random:"


class SpecError(UserError, ValueError):
    """A model spec that names nothing loadable (unknown random size, missing folder, bad hub id)."""


def _fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the state dict (names, shapes, float32 bytes): what a layout records to check that
    decoding uses the same weights that encoded."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def split_spec(spec: str) -> tuple[str, str, str | None]:
    """(kind, location, subfolder): kind "random" | "local" | "hub"."""
    if spec.startswith(RANDOM_PREFIX):
        return "random", spec[len(RANDOM_PREFIX):], None
    local = Path(os.path.expanduser(spec))
    if local.exists():
        if not local.is_dir():
            raise SpecError(f"{spec!r}: a local model must be a directory (config.json and weights)")
        return "local", str(local.resolve()), None
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        repo, _, sub = spec.partition(":")
        return "hub", repo, sub or None
    raise SpecError(f"{spec!r} is not a local directory, not a model-hub id (owner/name[:subfolder]) "
                    f"and not {RANDOM_PREFIX}tiny")


def hub_error(spec: str, err: Exception) -> SpecError:
    return SpecError(f"could not load {spec!r} from the model hub ({type(err).__name__}: {err}). On a "
                     "machine that cannot reach huggingface.co, download the model elsewhere "
                     "(save_pretrained or `hf download`) and give its local directory (HF_HUB_OFFLINE=1 "
                     "skips the retries)")


class LatentCodec:
    """Encode images to scaled latents and decode them back, batched and without gradients."""

    def __init__(self, vae, *, spec: str, scale: float, label: str, random_init: bool,
                 posterior: str = "mean", batch_size: int = 32, seed: int = 0):
        if posterior not in ("mean", "sample"):
            raise ValueError(f"posterior must be mean or sample, not {posterior!r}")
        self.vae = vae.eval().requires_grad_(False)
        self.spec, self.scale, self.label, self.random_init = spec, float(scale), label, random_init
        self.posterior, self.batch_size, self.seed = posterior, batch_size, seed
        self._fingerprint: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.vae)
        return self._fingerprint

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "LatentCodec":
        self.vae.to(*(a for a in (device, dtype) if a is not None))
        return self

    def describe(self) -> dict:
        """What a layout's meta.json records about the autoencoder."""
        return {"spec": self.spec, "label": self.label, "random_init": self.random_init,
                "scale": self.scale, "posterior": self.posterior, "fingerprint": self.fingerprint,
                "class": type(self.vae).__name__, "config": _plain(dict(self.vae.config))}

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """float images B x 3 x H x W in [-1, 1] -> latents B x 4 x H/8 x W/8 (times ``scale``), float32,
        on the input's device."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images B x 3 x H x W, got {tuple(images.shape)}")
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i:i + self.batch_size].to(self.device, self.dtype)
            dist = self.vae.encode(x).latent_dist
            z = dist.mean if self.posterior == "mean" else dist.mean + dist.std * torch.randn(
                dist.mean.shape, generator=generator, device="cpu").to(dist.mean)
            out.append((z.float() * self.scale).to(images.device))
        return torch.cat(out) if out else images.new_zeros((0, LATENT_CHANNELS, 0, 0))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents B x 4 x h x w (scaled) -> images B x 3 x 8h x 8w in [-1, 1], float32, on the input's device."""
        if latents.dim() != 4:
            raise ValueError(f"expected latents B x C x h x w, got {tuple(latents.shape)}")
        out = []
        for i in range(0, len(latents), self.batch_size):
            z = latents[i:i + self.batch_size].to(self.device, self.dtype) / self.scale
            out.append(self.vae.decode(z).sample.float().clamp_(-1, 1).to(latents.device))
        return torch.cat(out) if out else latents.new_zeros((0, 3, 0, 0))

    def __repr__(self) -> str:
        return f"LatentCodec({self.label!r}, scale={self.scale}, posterior={self.posterior!r})"


def _plain(value):
    """A JSON-friendly copy of a config value (tuples -> lists, unknown objects -> str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def tiny_autoencoder():
    """The ``random:tiny`` AutoencoderKL: fixed config, weights drawn from a fixed seed (CPU generator,
    so every machine gets the same numbers)."""
    from diffusers import AutoencoderKL

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        vae = AutoencoderKL(**TINY_CONFIG)
    finally:
        torch.random.set_rng_state(state)
    return vae


def load_autoencoder(spec: str, *, scale: float | None = None, posterior: str = "mean",
                     device: str | torch.device = "cpu", batch_size: int = 32) -> LatentCodec:
    """The autoencoder ``spec`` names ("random:tiny", a local diffusers directory, or a hub id
    ``owner/name[:subfolder]``) as a LatentCodec.

    ``scale``: the latent scale; None takes the model config's ``scaling_factor`` (0.18215 for the
    Stable Diffusion autoencoders and for random:tiny). Weights load from safetensors only (no pickle).
    """
    kind, where, sub = split_spec(spec)
    if kind == "random":
        if where != "tiny":
            raise SpecError(f"unknown random autoencoder {spec!r}; valid: {RANDOM_PREFIX}tiny")
        vae = tiny_autoencoder()
        label = "random-init AutoencoderKL tiny (NOT the SD autoencoder)"
    else:
        from diffusers import AutoencoderKL

        folder = Path(where)
        if kind == "local" and not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            sub = "vae"  # a whole pipeline folder: its autoencoder
        kwargs = {"use_safetensors": True, "low_cpu_mem_usage": False, **({"subfolder": sub} if sub else {})}
        try:
            vae = AutoencoderKL.from_pretrained(where, **kwargs)
        except (OSError, EnvironmentError, ValueError) as err:
            if kind == "hub":
                raise hub_error(spec, err) from err
            raise SpecError(f"could not load an AutoencoderKL from {where!r}"
                            f"{f' (subfolder {sub})' if sub else ''}: {err}. It needs config.json and "
                            "diffusion_pytorch_model.safetensors (pickled .bin weights are refused)") from err
        label = f"AutoencoderKL {where}{f':{sub}' if sub else ''}"
    s = float(scale if scale is not None else vae.config.get("scaling_factor", SD_SCALE))
    return LatentCodec(vae, spec=spec, scale=s, label=label, random_init=kind == "random",
                       posterior=posterior, batch_size=batch_size).to(device)


def latent_codec(name: str, path=None, device: str | torch.device = "cpu"):
    """The LatentCodec that encoded dataset ``name``'s layout (same spec, scale and posterior), checked
    against the recorded weight fingerprint so that samples decode with the autoencoder the data came from."""
    from bench.data import layout_meta
    from bench.data.latents import layout_path
    from bench.data.layout import LayoutError

    ae = layout_meta(name, path)["autoencoder"]
    codec = load_autoencoder(ae["spec"], scale=ae["scale"], posterior=ae.get("posterior", "mean"), device=device)
    if codec.fingerprint != ae["fingerprint"]:
        raise LayoutError(f"dataset {name!r}: the autoencoder {ae['spec']!r} loaded now has other weights "
                          f"than the one that encoded {layout_path(name, path)} (fingerprint "
                          f"{codec.fingerprint[:12]} != {ae['fingerprint'][:12]})")
    return codec
