"""The DDIM U-Net (Song et al. 2021; the DDPM model of Ho et al. 2020), with the exit contract.

A re-implementation of the official model, github.com/ermongroup/ddim, models/diffusion.py
(https://github.com/ermongroup/ddim/blob/main/models/diffusion.py). Module names give exactly the
official state-dict keys, so official checkpoints load with `strict=True` when `exit_heads=False`.

Exits are resolution blocks, in the order the official forward runs them:

    exit 0 .. L-1      down level i: its res blocks (+ attention), then its downsample
    exit L             middle: block_1, attn_1, block_2
    exit L+1 .. 2L     up level L-1 .. 0: res blocks on concatenated skips (+ attention), upsample

with L = len(ch_mult). The last exit reads the official output path (norm_out, swish, conv_out);
an earlier exit brings its feature map to the output resolution and reads it with a light
per-exit head (DeeDiff, Table 6: "interpolation, then a light head").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones import BACKBONES
from backbones.contract import ExitInfo, OutputInfo, State, measure_flops_per_part

GROUPS = 32  # GroupNorm groups of the official model; every channel count must be a multiple


# ------------------------------------------------------------------------------------------------
# Layers (official: get_timestep_embedding, nonlinearity, Normalize, Upsample, Downsample,
# ResnetBlock, AttnBlock)
# ------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of the (integer) timestep, as in DDPM / tensor2tensor: [sin, cos]."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    args = t.float()[:, None] * freqs.to(t.device)[None, :]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # (B, 2*half)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb  # (B, dim)


def swish(x: Tensor) -> Tensor:
    """x * sigmoid(x), written as the official code writes it (bit-identical outputs)."""
    return x * torch.sigmoid(x)


def normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm(32) with the official eps."""
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric (right/bottom) zero padding, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))  # (B, C, H/2, W/2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """norm-swish-conv, + projected time embedding, norm-swish-dropout-conv, + (1x1-projected) input."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels, self.use_conv_shortcut = in_channels, out_channels, conv_shortcut
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, Cout, H, W)
        h = h + self.temb_proj(swish(temb))[:, :, None, None]  # temb: (B, 4ch)
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)  # (B, C, H, W) each
        b, c, h, w = q.shape
        # explicit bmm as in the official code (fvcore counts bmm; outputs stay bit-identical)
        attn = torch.bmm(q.reshape(b, c, h * w).permute(0, 2, 1), k.reshape(b, c, h * w))  # (B, HW_q, HW_k)
        attn = F.softmax(attn * (int(c) ** (-0.5)), dim=2)
        out = torch.bmm(v.reshape(b, c, h * w), attn.permute(0, 2, 1))  # (B, C, HW_q)
        return x + self.proj_out(out.reshape(b, c, h, w))


class ExitHead(nn.Module):
    """Light head of an early exit: GroupNorm, swish, 3x3 conv to the output channels."""

    def __init__(self, channels: int, out_ch: int):
        super().__init__()
        self.norm = normalize(channels)
        self.conv = nn.Conv2d(channels, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, h: Tensor) -> Tensor:
        return self.conv(swish(self.norm(h)))  # (B, out_ch, H, W)


# ------------------------------------------------------------------------------------------------
# The U-Net (official: Model)
# ------------------------------------------------------------------------------------------------


class DDIMUNet(nn.Module):
    """The official DDIM/DDPM U-Net; `forward(x, t)` predicts the noise eps."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: tuple[int, ...], num_res_blocks: int,
                 attn_resolutions: tuple[int, ...], dropout: float, in_channels: int, resolution: int,
                 resamp_with_conv: bool = True, exit_heads: bool = False):
        super().__init__()
        ch_mult = tuple(ch_mult)
        if any((ch * m) % GROUPS for m in ch_mult):
            raise ValueError(f"ch * ch_mult must be multiples of {GROUPS} (GroupNorm); got ch={ch}, ch_mult={ch_mult}")
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} must be divisible by 2**(len(ch_mult)-1) = "
                             f"{2 ** (len(ch_mult) - 1)} so that the skips of the up path fit")
        self.ch, self.temb_ch, self.out_ch = ch, 4 * ch, out_ch
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.num_exits = 2 * len(ch_mult) + 1

        # timestep embedding: sinusoid(ch) -> Linear -> swish -> Linear
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, self.temb_ch), nn.Linear(self.temb_ch, self.temb_ch)])

        # downsampling
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        curr_res, in_ch_mult = resolution, (1,) + ch_mult
        exit_channels = []  # channels of the feature map after each exit
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = block, attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)
            exit_channels.append(block_in)

        # middle
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                       temb_channels=self.temb_ch, dropout=dropout)
        exit_channels.append(block_in)

        # upsampling: built from the lowest resolution up, stored so that up[i] is level i
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = skip_in = ch * ch_mult[i_level]
            for i_block in range(num_res_blocks + 1):
                if i_block == num_res_blocks:
                    skip_in = ch * in_ch_mult[i_level]
                block.append(ResnetBlock(in_channels=block_in + skip_in, out_channels=block_out,
                                         temb_channels=self.temb_ch, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = block, attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            self.up.insert(0, up)  # prepend: up[i_level]
            exit_channels.append(block_in)

        # end
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

        # early-exit heads, one per exit but the last (which is the official output path)
        self.exit_channels = tuple(exit_channels)
        if exit_heads:
            self.exit_heads = nn.ModuleList(ExitHead(c, out_ch) for c in exit_channels[:-1])
        else:
            self.exit_heads = None
        self._flops: dict[str, float] | None = None

    # -- the exit contract ----------------------------------------------------------------------

    exit_layout = "map"

    @property
    def first_half_exits(self) -> int:
        return self.num_resolutions

    @property
    def exit_info(self) -> list[ExitInfo]:
        """Feature maps (C_i, H_i, W_i), from one batch-1 pass (so that a pruned model reports its own
        widths); the down levels are the first half."""
        p = next(self.parameters())
        x = torch.zeros(1, self.in_channels, self.resolution, self.resolution, device=p.device, dtype=p.dtype)
        shapes, training = [], self.training
        # in eval mode and on a forked RNG: asking must not draw dropout masks (a method's modules are
        # initialised right after, from the same global RNG) nor change the mode
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            self.eval()
            try:
                state = self.prepare(x, torch.zeros(1, device=p.device))
                for i in range(self.num_exits):
                    state = self.run_block(i, state)
                    shapes.append(tuple(self.hidden(state).shape[1:]))
            finally:
                self.train(training)
        return [ExitInfo("map", shape[0], shape, i < self.first_half_exits) for i, shape in enumerate(shapes)]

    @property
    def output_info(self) -> OutputInfo:
        return OutputInfo(self.out_ch, self.resolution)

    def prepare(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> State:
        """Time embedding and the first skip: {"temb": (B, 4ch), "hs": [(B, ch, H, W)], "h": hs[-1]}."""
        if cond is not None:
            raise ValueError("the DDIM U-Net is unconditional: cond must be None")
        if x.shape[2] != self.resolution or x.shape[3] != self.resolution:
            raise ValueError(f"expected a {self.resolution}x{self.resolution} input, got {tuple(x.shape)}")
        t = t.reshape(1).expand(x.shape[0]) if t.dim() == 0 else t  # a scalar t serves the whole batch
        temb = timestep_embedding(t, self.ch)  # (B, ch)
        temb = self.temb.dense[1](swish(self.temb.dense[0](temb)))  # (B, 4ch)
        h = self.conv_in(x)  # (B, ch, H, W)
        return {"temb": temb, "hs": [h], "h": h}

    def run_block(self, i: int, state: State) -> State:
        """Run exit block i; returns a new state (the input state and its list are left as they are)."""
        temb, hs = state["temb"], list(state["hs"])  # a new list: the caller's is never touched
        L = self.num_resolutions
        if i < L:  # down level i: push every block output (and the downsampled map) as a skip
            level = self.down[i]
            for i_block in range(self.num_res_blocks):
                h = level.block[i_block](hs[-1], temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
                hs.append(h)
            if i != L - 1:
                hs.append(level.downsample(hs[-1]))
            h = hs[-1]
        elif i == L:  # middle: res, attn, res at the lowest resolution
            h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        elif i < self.num_exits:  # up level L-1 .. 0: each block eats one skip (last in, first out)
            i_level = self.num_exits - 1 - i
            level, h = self.up[i_level], state["h"]
            for i_block in range(self.num_res_blocks + 1):
                h = level.block[i_block](torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        else:
            raise IndexError(f"block {i} out of range: the model has {self.num_exits} exits")
        return {"temb": temb, "hs": hs, "h": h}

    def hidden(self, state: State) -> Tensor:
        """The current feature map (B, C, H', W')."""
        return state["h"]

    head_keys = ("h",)  # what `head` reads of the state (the engine gathers only this for exits)

    def head(self, state: State, i: int) -> Tensor:
        """The noise prediction (B, out_ch, H, W) if computation stops after block i."""
        h = state["h"]
        if i == self.num_exits - 1:  # the official output path
            return self.conv_out(swish(self.norm_out(h)))
        if self.exit_heads is None:
            raise RuntimeError(f"exit {i} has no head: build the model with exit_heads=True "
                               f"(only the last exit, {self.num_exits - 1}, reads the official output path)")
        if h.shape[-1] != self.resolution:
            # nearest, as the U-Net's own Upsample does: every scale here is an exact power of 2, so
            # each coarse cell is copied, no values are invented; the head's 3x3 conv smooths the edges
            h = F.interpolate(h, size=(self.resolution, self.resolution), mode="nearest")
        return self.exit_heads[i](h)  # (B, out_ch, H, W)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The full model: eps (B, out_ch, H, W); the same code path as running every block."""
        state = self.prepare(x, t, cond)
        for i in range(self.num_exits):
            state = self.run_block(i, state)
        return self.head(state, self.num_exits - 1)

    def flops_per_part(self) -> dict[str, float]:
        """GMACs (fvcore) of prepare, each block and each head, at batch 1; measured once, cached."""
        if self._flops is None:
            p = next(self.parameters())
            x = torch.zeros(1, self.in_channels, self.resolution, self.resolution, device=p.device, dtype=p.dtype)
            t = torch.zeros(1, device=p.device)
            if self.exit_heads is not None:
                self._flops = measure_flops_per_part(self, x, t)
            else:  # only the last exit has a head
                last = f"head_{self.num_exits - 1}"
                costs = measure_flops_per_part(_FinalHeadOnly(self), x, t)
                self._flops = {k: v for k, v in costs.items() if not k.startswith("head_") or k == last}
        return dict(self._flops)


class _FinalHeadOnly(nn.Module):
    """A model without exit heads as seen by the FLOP counter: early heads cost nothing (dropped)."""

    def __init__(self, model: DDIMUNet):
        super().__init__()
        self.model, self.num_exits = model, model.num_exits  # registered: tracing sees parameters

    def prepare(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> State:
        return self.model.prepare(x, t, cond)

    def run_block(self, i: int, state: State) -> State:
        return self.model.run_block(i, state)

    def head(self, state: State, i: int) -> Tensor:
        return self.model.head(state, i) if i == self.num_exits - 1 else state["h"][:, :0]


# ------------------------------------------------------------------------------------------------
# Named sizes (official configs/cifar10.yml and configs/celeba.yml; a CPU-sized one for MNIST)
# ------------------------------------------------------------------------------------------------

CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1,
               resolution=32, in_channels=3, resamp_with_conv=True)
CELEBA64 = dict(CIFAR10, ch_mult=(1, 2, 2, 2, 4), resolution=64)
TINY = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(14,), dropout=0.1,
            resolution=28, in_channels=1, resamp_with_conv=True)


def _build(config: dict, img_size: int | None, channels: int | None, num_classes: int | None,
           overrides: dict) -> DDIMUNet:
    """A DDIMUNet from a named config, the dataset geometry and constructor overrides."""
    if num_classes is not None:
        raise ValueError(f"the DDIM U-Net is unconditional; got num_classes={num_classes} (pass None)")
    kwargs = dict(config, exit_heads=True)
    if img_size is not None:
        kwargs["resolution"] = img_size
    if channels is not None:
        kwargs["in_channels"] = channels
    kwargs["out_ch"] = kwargs["in_channels"]
    kwargs.update(overrides)
    return DDIMUNet(**kwargs)


@BACKBONES.register("ddim_cifar10", help="DDIM U-Net, official CIFAR-10 config (35.7M params), 32x32x3")
def ddim_cifar10(img_size: int | None = None, channels: int | None = None, num_classes: int | None = None,
                 **overrides) -> DDIMUNet:
    return _build(CIFAR10, img_size, channels, num_classes, overrides)


@BACKBONES.register("ddim_celeba64", help="DDIM U-Net, official CelebA config (78.7M params), 64x64x3")
def ddim_celeba64(img_size: int | None = None, channels: int | None = None, num_classes: int | None = None,
                  **overrides) -> DDIMUNet:
    return _build(CELEBA64, img_size, channels, num_classes, overrides)


@BACKBONES.register("ddim_tiny", help="DDIM U-Net, CPU size (ch 32, 3 levels, 1.1M params), 28x28x1")
def ddim_tiny(img_size: int | None = None, channels: int | None = None, num_classes: int | None = None,
              **overrides) -> DDIMUNet:
    return _build(TINY, img_size, channels, num_classes, overrides)
