"""Every registered backbone honours the exit contract (backbones/contract.py, DESIGN.md).

The big sizes are built narrow (fewer channels) so the suite stays fast on two CPU cores, but with
their real structure: U-ViT keeps its 13 (S) or 21 (L) blocks, its patch size, its image size and
its label token; the DDIM U-Nets keep their levels and attention (CelebA's at 32x32 rather than 64).
"""
import warnings

import pytest
import torch

from backbones import BACKBONES
from backbones.contract import run_all_blocks, select_state

# Narrow versions of the big sizes; anything not listed is built as registered.
SMALL = {
    "uvit_s2_cifar10": dict(embed_dim=64, num_heads=2),
    "uvit_s4_celeba64": dict(embed_dim=64, num_heads=2),
    "uvit_l2_imagenet256": dict(embed_dim=64, num_heads=2),
    "uvit_s2_mscoco": dict(embed_dim=64, num_heads=2, clip_dim=32),  # 77 text tokens kept
    "ddim_cifar10": dict(ch=32),
    "ddim_celeba64": dict(ch=32, img_size=32),  # 5 levels kept (32 is a multiple of 2**4)
}
EXPECTED_EXITS = {"uvit_s2_cifar10": 13, "uvit_s4_celeba64": 13, "uvit_l2_imagenet256": 21, "uvit_s2_mscoco": 13, "uvit_tiny": 13,
                  "uvit_tiny_p4": 13, "ddim_cifar10": 9, "ddim_celeba64": 11, "ddim_tiny": 7}
BATCH = 3

_cache: dict = {}


def _build(name):
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = BACKBONES.get(name)(**SMALL.get(name, {})).eval()
    return _cache[name]


def _geometry(model):
    """(channels, size, num_classes) of the model's input."""
    if hasattr(model, "in_chans"):  # U-ViT
        return model.in_chans, model.img_size, model.num_classes
    return model.in_channels, model.resolution, -1


def _inputs(model, batch=BATCH, seed=1):
    channels, size, classes = _geometry(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.tensor([1.0, 421.0, 999.0, 37.0, 600.0][:batch])
    cond = torch.randint(0, classes, (batch,), generator=g) if classes > 0 else None
    if getattr(model, "clip_dim", None):  # text-conditioned: CLIP token features
        cond = torch.randn(batch, model.num_clip_token, model.clip_dim, generator=g)
    return x, t, cond


def _snapshot(value):
    """A deep copy of a state: tensors cloned, containers copied (identity kept aside)."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _batch_first(value, batch):
    if torch.is_tensor(value):
        return value.shape[0] == batch
    if isinstance(value, dict):
        return all(_batch_first(v, batch) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_batch_first(v, batch) for v in value)
    return True


NAMES = BACKBONES.names()


def test_every_backbone_is_covered():
    assert set(NAMES) >= set(EXPECTED_EXITS), "a backbone this file knows about is no longer registered"
    assert len(NAMES) >= 8


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_run_all_blocks_equals_forward(name):
    model = _build(name)
    if name in EXPECTED_EXITS:
        assert model.num_exits == EXPECTED_EXITS[name]
    x, t, cond = _inputs(model)
    full = model(x, t, cond)
    assert full.shape == x.shape
    assert torch.isfinite(full).all()
    torch.testing.assert_close(run_all_blocks(model, x, t, cond), full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_every_exit_head_has_the_output_shape(name):
    model = _build(name)
    x, t, cond = _inputs(model)
    state = model.prepare(x, t, cond)
    assert _batch_first(state, BATCH)
    for i in range(model.num_exits):
        state = model.run_block(i, state)
        assert _batch_first(state, BATCH), f"exit {i}: a state tensor is not batch-first"
        assert model.hidden(state).shape[0] == BATCH
        eps = model.head(state, i)
        assert eps.shape == x.shape, f"exit {i}"
        assert torch.isfinite(eps).all()


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_declared_exit_info_matches_the_hidden_states(name):
    model = _build(name)
    x, t, cond = _inputs(model)
    info, out = model.exit_info, model.output_info
    assert len(info) == model.num_exits and {i.layout for i in info} == {model.exit_layout}
    assert [i.first_half for i in info] == [k < model.first_half_exits for k in range(model.num_exits)]
    assert 0 < model.first_half_exits < model.num_exits // 2 + 1
    assert (out.channels, out.size, out.size) == tuple(x.shape[1:]) and out.size % out.patch_size == 0
    state = model.prepare(x, t, cond)
    for k in range(model.num_exits):
        state = model.run_block(k, state)
        hidden = model.hidden(state)
        assert tuple(hidden.shape[1:]) == info[k].hidden_shape, f"exit {k}"
        assert info[k].width == (hidden.shape[-1] if info[k].layout == "tokens" else hidden.shape[1])


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_run_block_does_not_mutate_its_input(name):
    model = _build(name)
    x, t, cond = _inputs(model)
    state = model.prepare(x, t, cond)
    for i in range(model.num_exits):
        before = _snapshot(state)
        containers = {k: (v, len(v)) for k, v in state.items() if isinstance(v, list)}
        new = model.run_block(i, state)
        assert new is not state
        assert _same(state, before), f"run_block({i}) changed its input state"
        for key, (obj, length) in containers.items():
            assert state[key] is obj and len(obj) == length, f"run_block({i}) changed the list {key!r}"
            assert new[key] is not obj, f"run_block({i}) returned the caller's list {key!r}"
        if i > 0:  # the old state (after block i-1) can still be read by its exit
            assert model.head(state, i - 1).shape == x.shape
        state = new


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_select_state_then_continue_gives_the_same_rows(name):
    model = _build(name)
    x, t, cond = _inputs(model, batch=4)
    full = model(x, t, cond)
    keep = torch.tensor([True, False, True, True])
    n = model.num_exits
    for split in sorted({1, n // 2 - 1, n // 2 + 1, n - 1}):  # inside the first half, the middle, the second half
        state = model.prepare(x, t, cond)
        for i in range(split):
            state = model.run_block(i, state)
        state = select_state(state, keep)
        assert _batch_first(state, 3)
        for i in range(split, n):
            state = model.run_block(i, state)
        torch.testing.assert_close(model.head(state, n - 1), full[keep], atol=1e-5, rtol=0)
    index = torch.tensor([3, 0])  # an index tensor works as well as a mask
    state = select_state(model.prepare(x, t, cond), index)
    for i in range(n):
        state = model.run_block(i, state)
    torch.testing.assert_close(model.head(state, n - 1), full[index], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_flops_per_part_keys(name):
    costs = _build(name).flops_per_part()
    n = _build(name).num_exits
    assert {"prepare", *(f"block_{i}" for i in range(n)), f"head_{n - 1}"} <= set(costs)
    assert all(costs[f"block_{i}"] > 0 for i in range(n))
    assert costs[f"head_{n - 1}"] > 0


def test_uvit_tiny_flops_count_attention():
    """Per-part costs add up to fvcore's plain count plus exactly the attention products it skips."""
    from fvcore.nn import FlopCountAnalysis

    model = _build("uvit_tiny")  # as registered (no overrides)
    costs = model.flops_per_part()
    n = model.num_exits
    assert n == 13
    assert set(costs) == {"prepare"} | {f"block_{i}" for i in range(n)} | {f"head_{i}" for i in range(n)}
    assert all(v > 0 for v in costs.values())
    heads = {costs[f"head_{i}"] for i in range(n)}
    assert len(heads) == 1  # one head shared by every exit

    x, t = torch.zeros(1, model.in_chans, model.img_size, model.img_size), torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FlopCountAnalysis(model, (x, t))
        plain.unsupported_ops_warnings(False)
        plain.uncalled_modules_warnings(False)
        plain_macs = plain.total()

    # geometry: L tokens ([time] + patches), H heads of width d; Q K^T and A V are L*L*d MACs each
    L = model.extras + (model.img_size // model.patch_size) ** 2
    H = model.in_blocks[0].attn.num_heads
    d = model.embed_dim // H
    assert (L, H, d) == (197, 4, 24)
    attention = n * (1 * H * L * L * d * 2)
    whole = costs["prepare"] + sum(costs[f"block_{i}"] for i in range(n)) + costs[f"head_{n - 1}"]
    assert round(whole * 1e9) - plain_macs == attention
    # every block holds one attention: a block's cost exceeds its linear layers by L*L*d*2*H
    mid = model.mid_block
    linear = L * (mid.attn.qkv.in_features * mid.attn.qkv.out_features
                  + mid.attn.proj.in_features * mid.attn.proj.out_features
                  + mid.mlp.fc1.in_features * mid.mlp.fc1.out_features
                  + mid.mlp.fc2.in_features * mid.mlp.fc2.out_features)
    norms = 2 * L * model.embed_dim * 5  # fvcore counts a layer norm as 5 ops per element
    assert round(costs[f"block_{n // 2}"] * 1e9) in {linear + H * L * L * d * 2 + norms,
                                                     linear + H * L * L * d * 2}
