"""U-ViT (Bao et al., "All are worth words: a ViT backbone for diffusion models", CVPR 2023).

A re-implementation that keeps the official constructor arguments, `forward(x, timesteps, y)`
and state-dict keys, so official checkpoints load with `strict=True`
(https://github.com/baofff/U-ViT/blob/main/libs/uvit.py). On top of the plain model it
implements the exit contract of backbones/contract.py: the 13 (or 21) blocks are the exits
and every exit is read by the backbone's own head, as DeeDiff does.
"""
from __future__ import annotations

import math
from functools import partial

import einops
import torch
from torch import Tensor, nn

from backbones import BACKBONES
from backbones.contract import ExitInfo, OutputInfo, State, measure_flops_per_part


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) time inputs: (B,) -> (B, dim), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), in U-ViT's (p1 p2 C) order."""
    return einops.rearrange(images, "B C (h p1) (w p2) -> B (h w) (p1 p2 C)", p1=patch_size, p2=patch_size)


def unpatchify(tokens: Tensor, channels: int, patch_size: int) -> Tensor:
    """(B, L, p*p*C) -> (B, C, H, W) for a square grid of L patches."""
    side = math.isqrt(int(tokens.shape[1]))
    if side * side != int(tokens.shape[1]) or patch_size**2 * channels != int(tokens.shape[2]):
        raise ValueError(f"cannot unpatchify tokens of shape {tuple(tokens.shape)} into {channels} channels")
    return einops.rearrange(tokens, "B (h w) (p1 p2 C) -> B C (h p1) (w p2)", h=side, p1=patch_size, p2=patch_size)


class Attention(nn.Module):
    """Multi-head self-attention; one fused qkv projection (no bias by default)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: float | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = einops.rearrange(self.qkv(x), "B L (K H D) -> K B H L D", K=3, H=self.num_heads)
        # The official "flash" path casts q, k, v to float32; we keep the input dtype so that
        # bf16 autocast on a GPU stays fast. In float32 the two are the same computation.
        x = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.scale)
        return self.proj(einops.rearrange(x, "B H L D -> B L (H D)"))


class Mlp(nn.Module):
    """Two-layer perceptron D -> hidden -> D with GELU (timm's Mlp; keys fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; out-blocks first fuse the long skip: skip_linear([x, skip])."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, norm_layer=nn.LayerNorm, skip: bool = False):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (B, L, 2D) -> (B, L, D)
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class PatchEmbed(nn.Module):
    """Image to patch tokens with a conv of kernel = stride = patch size."""

    def __init__(self, patch_size: int, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"image size {tuple(x.shape[2:])} is not a multiple of patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, L, D)


class UViT(nn.Module):
    """U-ViT: all inputs as tokens, long skips between shallow and deep blocks."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 qk_scale: float | None = None, norm_layer=nn.LayerNorm, mlp_time_embed: bool = False,
                 num_classes: int = -1, use_checkpoint: bool = False, conv: bool = True, skip: bool = True,
                 clip_dim: int | None = None, num_clip_token: int = 77):
        super().__init__()
        if clip_dim and num_classes > 0:
            raise ValueError("a U-ViT is conditioned on class labels (num_classes) or on text (clip_dim), not both")
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.clip_dim = clip_dim  # text-conditioned U-ViT (libs/uvit_t2i.py) when set
        self.num_clip_token = num_clip_token
        self.in_chans = in_chans
        self.img_size = img_size
        self.patch_size = patch_size
        self.use_checkpoint = use_checkpoint  # accepted for config compatibility; not used here

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = nn.Sequential(
            nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim),
        ) if mlp_time_embed else nn.Identity()
        if clip_dim:
            self.context_embed = nn.Linear(clip_dim, embed_dim)  # CLIP token features -> tokens
            self.extras = 1 + num_clip_token  # [time token][text tokens][patches]
        elif num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras = 2  # [label token][time token][patches]
        else:
            self.extras = 1  # [time token][patches]
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        block = partial(Block, dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        qk_scale=qk_scale, norm_layer=norm_layer)
        self.in_blocks = nn.ModuleList([block() for _ in range(depth // 2)])
        self.mid_block = block()
        self.out_blocks = nn.ModuleList([block(skip=skip) for _ in range(depth // 2)])

        self.norm = norm_layer(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)
        self._flops: dict[str, float] | None = None

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.zeros_(m.bias)
            nn.init.ones_(m.weight)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    # ---- the exit contract -------------------------------------------------------------

    @property
    def blocks(self) -> list[Block]:
        """All blocks in execution order: in-blocks, mid-block, out-blocks."""
        return [*self.in_blocks, self.mid_block, *self.out_blocks]

    @property
    def num_exits(self) -> int:
        return len(self.in_blocks) + 1 + len(self.out_blocks)

    exit_layout = "tokens"

    @property
    def first_half_exits(self) -> int:
        return len(self.in_blocks)

    @property
    def exit_info(self) -> list[ExitInfo]:
        """Patch tokens (L, D) at every exit; the in-blocks are the first half."""
        tokens = (self.img_size // self.patch_size) ** 2
        return [ExitInfo("tokens", self.embed_dim, (tokens, self.embed_dim), i < self.first_half_exits)
                for i in range(self.num_exits)]

    @property
    def output_info(self) -> OutputInfo:
        return OutputInfo(self.in_chans, self.img_size, self.patch_size)

    def prepare(self, x: Tensor, timesteps: Tensor, cond: Tensor | None = None) -> State:
        """Tokens [label][time][patches] (text model: [time][context][patches]) plus position embedding;
        an empty skip stack. `cond`: class labels (B,) or CLIP token features (B, num_clip_token, clip_dim)."""
        tokens = self.patch_embed(x)  # (B, L, D)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim)).unsqueeze(1)  # (B, 1, D)
        if self.clip_dim:
            if cond is None or cond.dim() != 3:
                raise ValueError(f"this U-ViT is text-conditioned: cond must be (B, {self.num_clip_token}, "
                                 f"{self.clip_dim}) CLIP features, got {None if cond is None else tuple(cond.shape)}")
            context = self.context_embed(cond.to(tokens.dtype))  # (B, 77, D)
            return {"x": torch.cat((time_token, context, tokens), dim=1) + self.pos_embed, "skips": []}
        tokens = torch.cat((time_token, tokens), dim=1)
        if cond is not None:
            if self.num_classes <= 0:
                raise ValueError("this U-ViT is unconditional (num_classes=-1) but a label was given")
            tokens = torch.cat((self.label_emb(cond).unsqueeze(1), tokens), dim=1)
        return {"x": tokens + self.pos_embed, "skips": []}

    def run_block(self, i: int, state: State) -> State:
        """Block i; in-blocks push their output on the skip stack, out-blocks pop (last in, first out)."""
        n_in = len(self.in_blocks)
        x, skips = state["x"], state["skips"]
        if i < n_in:
            x = self.in_blocks[i](x)
            return {"x": x, "skips": [*skips, x]}
        if i == n_in:
            return {"x": self.mid_block(x), "skips": list(skips)}
        return {"x": self.out_blocks[i - n_in - 1](x, skips[-1]), "skips": list(skips[:-1])}

    def hidden(self, state: State) -> Tensor:
        """The patch tokens (B, L, D), without the time and label tokens (a view: one narrow, as this is
        read after every block where a method decides)."""
        x = state["x"]
        return x.narrow(1, self.extras, x.shape[1] - self.extras)

    head_keys = ("x",)  # what `head` reads of the state (the engine gathers only this for exits)

    def head(self, state: State, i: int | None = None) -> Tensor:
        """The backbone's own head, shared by every exit: norm, decoder_pred, unpatchify, final conv."""
        x = self.decoder_pred(self.norm(state["x"]))  # (B, extras + L, p*p*C)
        x = unpatchify(x[:, self.extras:, :], self.in_chans, self.patch_size)
        return self.final_layer(x)

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        state = self.prepare(x, timesteps, y)
        for i in range(self.num_exits):
            state = self.run_block(i, state)
        return self.head(state)

    def flops_per_part(self) -> dict[str, float]:
        """fvcore GMACs of prepare, each block and each head for one image (cached)."""
        if self._flops is None:
            p = next(self.parameters())
            x = torch.zeros(1, self.in_chans, self.img_size, self.img_size, device=p.device, dtype=p.dtype)
            t = torch.zeros(1, device=p.device)
            y = torch.zeros(1, dtype=torch.long, device=p.device) if self.num_classes > 0 else None
            if self.clip_dim:
                y = torch.zeros(1, self.num_clip_token, self.clip_dim, device=p.device, dtype=p.dtype)
            self._flops = measure_flops_per_part(self, x, t, y)
        return self._flops


# ---- named sizes ----------------------------------------------------------------------

def _uvit(defaults: dict, img_size: int | None = None, channels: int | None = None,
          num_classes: int | None = None, **overrides) -> UViT:
    kwargs = dict(defaults)
    if img_size is not None:
        kwargs["img_size"] = img_size
    if channels is not None:
        kwargs["in_chans"] = channels
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    kwargs.update(overrides)
    return UViT(**kwargs)


_SMALL = dict(embed_dim=512, depth=12, num_heads=8, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_LARGE = dict(embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_TINY = dict(depth=12, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)  # 13 blocks, long skips kept

BACKBONES.register("uvit_s2_cifar10", help="U-ViT-S/2, CIFAR-10 32x32 (44.3M params, paper)")(
    partial(_uvit, dict(img_size=32, patch_size=2, in_chans=3, **_SMALL)))
BACKBONES.register("uvit_s4_celeba64", help="U-ViT-S/4, CelebA 64x64 (paper)")(
    partial(_uvit, dict(img_size=64, patch_size=4, in_chans=3, **_SMALL)))
BACKBONES.register("uvit_l2_imagenet256", help="U-ViT-L/2, ImageNet-256 latents 32x32x4, 1001 labels (paper)")(
    partial(_uvit, dict(img_size=32, patch_size=2, in_chans=4, num_classes=1001, **_LARGE)))
BACKBONES.register("uvit_s2_mscoco", help="U-ViT-S/2 text-to-image, MS-COCO latents 32x32x4, 77 CLIP tokens "
                                           "(uvit_t2i, paper)")(
    partial(_uvit, dict(img_size=32, patch_size=2, in_chans=4, clip_dim=768, num_clip_token=77, **_SMALL)))
BACKBONES.register("uvit_tiny", help="CPU U-ViT: 13 blocks, width 96, patch 2 (28x28 MNIST default)")(
    partial(_uvit, dict(img_size=28, patch_size=2, in_chans=1, embed_dim=96, num_heads=4, **_TINY)))
BACKBONES.register("uvit_tiny_p4", help="CPU U-ViT: 13 blocks, width 128, patch 4 (4x fewer tokens)")(
    partial(_uvit, dict(img_size=28, patch_size=4, in_chans=1, embed_dim=128, num_heads=4, **_TINY)))
