"""Per-sample noise keyed by (run seed, global sample index, stream), independent of batching.

Every Gaussian number is a pure function of (seed, index, stream, element): a counter-based
generator (the idea of Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") built
from the SplitMix64 finaliser (Steele, Lea & Flood 2014) and the Box-Muller transform. So sample
i receives the same initial noise and the same per-step noise whether it is drawn alone, in a
batch of 8 at any position, on the CPU or on a GPU (integer hashing is exact everywhere; the
float64 Box-Muller step may differ by one float32 ulp between devices), and step k can be drawn
without drawing steps 0..k-1 first. Stream 0 is the initial noise x_T; stream k + 1 is the noise
of sampling step k.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 that has the same bits."""
    c &= _MASK64
    return c - (1 << 64) if c >= (1 << 63) else c


_GAMMA = _i64(0x9E3779B97F4A7C15)  # SplitMix64's increment (odd, golden ratio)
_GAMMA_STREAM = _i64(0xD1B54A32D192ED03)  # a second odd constant for the stream counter
_MUL1 = _i64(0xBF58476D1CE4E5B9)
_MUL2 = _i64(0x94D049BB133111EB)


def _srl(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors; multiplication wraps modulo 2^64."""
    z = (z ^ _srl(z, 30)) * _MUL1
    z = (z ^ _srl(z, 27)) * _MUL2
    return z ^ _srl(z, 31)


def _mix_int(z: int) -> int:
    """The same finaliser on a Python int (reference for tests and for the seed key)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class NoiseSource:
    """Standard-normal noise for a batch of samples named by their global indices."""

    def __init__(self, seed: int, indices: Sequence[int] | torch.Tensor):
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1).cpu()
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError("sample indices must be >= 0")
        self.seed = int(seed)
        self.indices = idx
        self._seed_key = _i64(_mix_int(self.seed + 0x2545F4914F6CDD1D))
        self._keys: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def range(cls, seed: int, start: int, count: int) -> "NoiseSource":
        """Samples start, start + 1, ..., start + count - 1 of the run."""
        return cls(seed, torch.arange(start, start + count))

    def __len__(self) -> int:
        return self.indices.numel()

    def subset(self, which: torch.Tensor | Sequence[int]) -> "NoiseSource":
        """The same run's noise for a sub-batch (positions or a boolean mask into this batch)."""
        which = torch.as_tensor(which).cpu()
        return NoiseSource(self.seed, self.indices[which])

    def _sample_keys(self, device: torch.device) -> torch.Tensor:
        if device not in self._keys:  # one key per sample, cached per device
            idx = self.indices.to(device)
            self._keys[device] = _mix(self._seed_key + idx * _GAMMA)
        return self._keys[device]

    def normal(self, stream: int, shape: Sequence[int], device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) standard normals of one stream; element j of sample i depends only on (seed, i, stream, j)."""
        if stream < 0:
            raise ValueError("stream must be >= 0")
        device = torch.device(device) if device is not None else torch.device("cpu")
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        pairs = (numel + 1) // 2
        key = _mix(self._sample_keys(device) + _i64((stream + 1) * _GAMMA_STREAM))  # (B,)
        counter = torch.arange(1, pairs + 1, device=device, dtype=torch.int64) * _GAMMA
        bits = _mix(key[:, None] + counter[None, :])  # (B, pairs): SplitMix64 stream of `key`
        # Box-Muller on two 32-bit uniforms in (0, 1); cos and sin give elements 2m and 2m + 1.
        u1 = (_srl(bits, 32).to(torch.float64) + 0.5) * 2.0 ** -32
        u2 = ((bits & 0xFFFFFFFF).to(torch.float64) + 0.5) * 2.0 ** -32
        radius = torch.sqrt(-2.0 * torch.log(u1))
        angle = (2.0 * math.pi) * u2
        z = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
        return z.reshape(len(self), 2 * pairs)[:, :numel].to(dtype).reshape(len(self), *shape)

    def initial(self, shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x_T for every sample: (B, *shape)."""
        return self.normal(0, shape, device, dtype)

    def step(self, k: int, shape: Sequence[int], device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The fresh noise z of sampling step k (k = 0 is the first step taken from t = T)."""
        if k < 0:
            raise ValueError("step index must be >= 0")
        return self.normal(k + 1, shape, device, dtype)
