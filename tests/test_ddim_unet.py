"""The DDIM U-Net: official sizes and state-dict keys, and the exit contract."""
import pytest
import torch

from backbones import BACKBONES
from backbones.contract import run_all_blocks, select_state
from backbones.ddim_unet import DDIMUNet

# Counted on the official Model (ermongroup/ddim, models/diffusion.py) with configs/cifar10.yml and
# configs/celeba.yml; Diff-Pruning reports them rounded as 35.7M and 78.7M.
OFFICIAL_PARAMS = {"ddim_cifar10": (35_746_307, 328), "ddim_celeba64": (78_700_803, 390)}

# A sample of the official CIFAR-10 state dict: key -> shape.
OFFICIAL_CIFAR10_KEYS = {
    "temb.dense.0.weight": (512, 128),
    "temb.dense.1.bias": (512,),
    "conv_in.weight": (128, 3, 3, 3),
    "down.0.block.0.norm1.weight": (128,),
    "down.0.block.1.conv2.weight": (128, 128, 3, 3),
    "down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "down.1.attn.1.q.weight": (256, 256, 1, 1),
    "down.1.attn.0.proj_out.bias": (256,),
    "down.2.downsample.conv.weight": (256, 256, 3, 3),
    "down.3.block.1.temb_proj.weight": (256, 512),
    "mid.block_1.conv1.weight": (256, 256, 3, 3),
    "mid.attn_1.k.weight": (256, 256, 1, 1),
    "mid.block_2.norm2.bias": (256,),
    "up.3.block.0.conv1.weight": (256, 512, 3, 3),
    "up.3.block.2.nin_shortcut.weight": (256, 512, 1, 1),
    "up.1.attn.2.v.weight": (256, 256, 1, 1),
    "up.1.upsample.conv.weight": (256, 256, 3, 3),
    "up.0.block.2.conv1.weight": (128, 256, 3, 3),
    "norm_out.weight": (128,),
    "conv_out.weight": (3, 128, 3, 3),
}


def _meta(name, **kwargs):
    with torch.device("meta"):  # no memory, no init cost: shapes and names only
        return BACKBONES.get(name)(**kwargs)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return BACKBONES.get("ddim_tiny")().eval()


@pytest.fixture(scope="module")
def plain():
    torch.manual_seed(1)
    return BACKBONES.get("ddim_tiny")(exit_heads=False).eval()


def _inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 28, 28, generator=g), torch.tensor([0, 421, 999, 7][:batch])


# -- official sizes and keys -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_count(name):
    model = _meta(name, exit_heads=False)
    params, keys = OFFICIAL_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.state_dict()) == keys


def test_tiny_size():
    model = _meta("ddim_tiny", exit_heads=False)
    assert sum(p.numel() for p in model.parameters()) == 1_112_801
    assert model.num_exits == 7


@pytest.mark.parametrize("name,levels", [("ddim_cifar10", 4), ("ddim_celeba64", 5), ("ddim_tiny", 3)])
def test_num_exits_and_heads(name, levels):
    model = _meta(name)
    assert model.num_exits == 2 * levels + 1
    assert len(model.exit_heads) == model.num_exits - 1  # the last exit uses norm_out / conv_out


def test_official_keys_and_shapes():
    sd = _meta("ddim_cifar10", exit_heads=False).state_dict()
    for key, shape in OFFICIAL_CIFAR10_KEYS.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("exit_heads") for k in sd)
    assert set(_meta("ddim_cifar10").state_dict()) - set(sd) == {
        k for k in _meta("ddim_cifar10").state_dict() if k.startswith("exit_heads.")}


def test_strict_load_and_exit_head_model_loads_plain_checkpoint(plain):
    src = plain
    dst = BACKBONES.get("ddim_tiny")(exit_heads=False).eval()
    dst.load_state_dict(src.state_dict(), strict=True)
    x, t = _inputs()
    with torch.no_grad():
        assert torch.equal(src(x, t), dst(x, t))
    # an exit-head model takes a plain (official) checkpoint; only its heads stay missing
    heads = BACKBONES.get("ddim_tiny")().eval()
    result = heads.load_state_dict(src.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("exit_heads.") for k in result.missing_keys)
    with torch.no_grad():
        assert torch.equal(heads(x, t), src(x, t))


# -- the exit contract -------------------------------------------------------------------------------


@torch.no_grad()
def test_run_all_blocks_equals_forward_and_head_shapes(tiny):
    x, t = _inputs()
    full = tiny(x, t)
    assert full.shape == x.shape
    assert torch.allclose(run_all_blocks(tiny, x, t), full, atol=1e-6, rtol=0)
    state = tiny.prepare(x, t)
    for i in range(tiny.num_exits):
        state = tiny.run_block(i, state)
        assert tiny.hidden(state).shape[:2] == (3, tiny.exit_channels[i])
        assert tiny.head(state, i).shape == x.shape
    assert state["hs"] == []  # the up path consumed every skip


@torch.no_grad()
def test_state_is_batch_first_and_selectable(tiny):
    x, t = _inputs(batch=4)
    keep = torch.tensor([True, False, True, True])
    state = tiny.prepare(x, t)
    for i in range(3):  # into the middle of the network, then drop a sample
        state = tiny.run_block(i, state)
    for v in [state["temb"], state["h"], *state["hs"]]:
        assert v.shape[0] == 4
    state = select_state(state, keep)
    for i in range(3, tiny.num_exits):
        state = tiny.run_block(i, state)
    out = tiny.head(state, tiny.num_exits - 1)
    assert torch.allclose(out, tiny(x[keep], t[keep]), atol=1e-5, rtol=0)


@torch.no_grad()
def test_run_block_does_not_mutate_its_input(tiny):
    x, t = _inputs()
    state = tiny.prepare(x, t)
    for i in range(tiny.num_exits):
        hs, snapshot = state["hs"], {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}
        skips = [s.clone() for s in hs]
        new = tiny.run_block(i, state)
        assert new is not state and new["hs"] is not hs
        assert state["hs"] is hs and len(hs) == len(skips)
        assert all(torch.equal(a, b) for a, b in zip(hs, skips))
        assert all(torch.equal(state[k], v) for k, v in snapshot.items())
        state = new


def test_scalar_t_serves_the_batch(tiny):
    x, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(tiny(x, torch.tensor(250)), tiny(x, torch.full((3,), 250)))


def test_exit_heads_train():
    torch.manual_seed(0)
    model = BACKBONES.get("ddim_tiny")()
    x, t = _inputs(batch=2)
    state, loss = model.prepare(x, t), 0.0
    for i in range(model.num_exits):
        state = model.run_block(i, state)
        loss = loss + model.head(state, i).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in model.exit_heads.parameters())


# -- errors -----------------------------------------------------------------------------------------


def test_errors(tiny, plain):
    x, t = _inputs()
    with pytest.raises(ValueError, match="unconditional"):
        tiny(x, t, cond=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        BACKBONES.get("ddim_tiny")(num_classes=10)
    with pytest.raises(ValueError, match="28x28"):
        tiny(torch.zeros(1, 1, 32, 32), t[:1])
    with pytest.raises(ValueError, match="GroupNorm"):
        BACKBONES.get("ddim_tiny")(ch=48)
    with pytest.raises(ValueError, match="divisible"):
        BACKBONES.get("ddim_tiny")(img_size=30)
    with torch.no_grad():
        state = plain.run_block(0, plain.prepare(x, t))
        with pytest.raises(RuntimeError, match="exit_heads=True"):
            plain.head(state, 0)
        with pytest.raises(IndexError):
            plain.run_block(plain.num_exits, state)


def test_geometry_overrides():
    model = _meta("ddim_cifar10", img_size=64, channels=1)
    assert (model.resolution, model.in_channels, model.out_ch) == (64, 1, 1)
    assert isinstance(model, DDIMUNet)


# -- cost ---------------------------------------------------------------------------------------------


def test_flops_per_part(tiny, plain):
    costs = tiny.flops_per_part()
    n = tiny.num_exits
    assert set(costs) == {"prepare"} | {f"block_{i}" for i in range(n)} | {f"head_{i}" for i in range(n)}
    assert all(v > 0 for v in costs.values())
    assert tiny.flops_per_part() == costs  # cached
    plain_costs = plain.flops_per_part()
    assert set(plain_costs) == {"prepare", f"head_{n - 1}"} | {f"block_{i}" for i in range(n)}
    assert plain_costs[f"head_{n - 1}"] == costs[f"head_{n - 1}"]
