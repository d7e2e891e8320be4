"""U-ViT: official sizes, state-dict keys, and the official algorithm (REFERENCE.md, U-ViT section).

The reference forward below is written from the description of github.com/baofff/U-ViT
(libs/uvit.py) with plain tensor operations; it reads the module's weights but none of its code.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from backbones import BACKBONES
from backbones.uvit import UViT, timestep_embedding

# Counted on the official model; the paper lists the same sizes.
OFFICIAL_PARAMS = {"uvit_s2_cifar10": 44_255_328, "uvit_l2_imagenet256": 286_763_172}

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias",
              "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def _meta(name, **kwargs):
    with torch.device("meta"):  # shapes and names only: no memory, no init cost
        return BACKBONES.get(name)(**kwargs)


def official_keys(depth: int, conditional: bool) -> set[str]:
    """Every state-dict key of the official U-ViT (mlp_time_embed=False, conv=True, skip=True)."""
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "decoder_pred.weight", "decoder_pred.bias", "final_layer.weight", "final_layer.bias"}
    for i in range(depth // 2):
        keys |= {f"in_blocks.{i}.{k}" for k in BLOCK_KEYS}
        keys |= {f"out_blocks.{i}.{k}" for k in BLOCK_KEYS}
        keys |= {f"out_blocks.{i}.skip_linear.weight", f"out_blocks.{i}.skip_linear.bias"}
    keys |= {f"mid_block.{k}" for k in BLOCK_KEYS}
    if conditional:
        keys.add("label_emb.weight")
    return keys


# -- official sizes and keys ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_official_parameter_count(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name,depth,blocks,conditional", [
    ("uvit_s2_cifar10", 12, 13, False), ("uvit_s4_celeba64", 12, 13, False),
    ("uvit_l2_imagenet256", 20, 21, True), ("uvit_tiny", 12, 13, False), ("uvit_tiny_p4", 12, 13, False)])
def test_official_state_dict_keys(name, depth, blocks, conditional):
    model = _meta(name)
    sd = model.state_dict()
    assert model.num_exits == blocks
    assert set(sd) == official_keys(depth, conditional)
    named = ["pos_embed", "patch_embed.proj.weight", "in_blocks.0.norm1.weight", "in_blocks.0.attn.qkv.weight",
             "in_blocks.0.attn.proj.weight", "in_blocks.0.mlp.fc1.weight", "mid_block.mlp.fc2.bias",
             "out_blocks.0.skip_linear.weight", "norm.weight", "decoder_pred.weight", "final_layer.weight"]
    for key in named + (["label_emb.weight"] if conditional else []):
        assert key in sd, key
    assert not any(k.endswith("qkv.bias") for k in sd), "U-ViT's qkv has no bias"
    assert ("label_emb.weight" in sd) == conditional


def test_official_shapes():
    s = _meta("uvit_s2_cifar10").state_dict()
    assert tuple(s["pos_embed"].shape) == (1, 1 + 16 * 16, 512)  # [time][256 patches]
    assert tuple(s["patch_embed.proj.weight"].shape) == (512, 3, 2, 2)
    assert tuple(s["in_blocks.0.attn.qkv.weight"].shape) == (3 * 512, 512)
    assert tuple(s["in_blocks.0.mlp.fc1.weight"].shape) == (4 * 512, 512)
    assert tuple(s["out_blocks.5.skip_linear.weight"].shape) == (512, 2 * 512)
    assert tuple(s["decoder_pred.weight"].shape) == (2 * 2 * 3, 512)
    assert tuple(s["final_layer.weight"].shape) == (3, 3, 3, 3)
    assert "in_blocks.6.norm1.weight" not in s and "out_blocks.6.norm1.weight" not in s
    l_sd = _meta("uvit_l2_imagenet256").state_dict()
    assert tuple(l_sd["label_emb.weight"].shape) == (1001, 1024)
    assert tuple(l_sd["pos_embed"].shape) == (1, 2 + 16 * 16, 1024)  # [label][time][256 patches]
    assert tuple(l_sd["decoder_pred.weight"].shape) == (2 * 2 * 4, 1024)
    c = _meta("uvit_s4_celeba64").state_dict()
    assert tuple(c["pos_embed"].shape) == (1, 1 + 16 * 16, 512)
    assert tuple(c["decoder_pred.weight"].shape) == (4 * 4 * 3, 512)


def _small(num_classes=-1, seed=0, depth=6):
    torch.manual_seed(seed)
    return UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=depth, num_heads=4,
                num_classes=num_classes).eval()


def test_strict_load_of_official_keys_round_trips():
    src = _small(num_classes=10, seed=0)
    g = torch.Generator().manual_seed(5)
    # a state dict made of exactly the official key names, as an official checkpoint would be
    official = {k: torch.randn(v.shape, generator=g) for k, v in src.state_dict().items()}
    assert set(official) == official_keys(6, conditional=True)
    dst = _small(num_classes=10, seed=1)
    dst.load_state_dict(official, strict=True)
    back = dst.state_dict()
    assert set(back) == set(official)
    assert all(torch.equal(back[k], official[k]) for k in official)
    src.load_state_dict(back, strict=True)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 9])
    with torch.no_grad():
        assert torch.equal(src(x, t, y), dst(x, t, y))
    # a key too many or too few is refused
    with pytest.raises(RuntimeError):
        dst.load_state_dict({**official, "in_blocks.0.attn.qkv.bias": torch.zeros(96)}, strict=True)
    with pytest.raises(RuntimeError):
        dst.load_state_dict({k: v for k, v in official.items() if k != "label_emb.weight"}, strict=True)


# -- the official algorithm ------------------------------------------------------------------------


def _reference_timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _reference_block(m, h, heads, skip=None):
    """Pre-norm block: (skip_linear(cat[x, skip])), x += attn(norm1 x), x += mlp(norm2 x)."""
    B, L, D = h.shape
    if skip is not None:
        h = torch.cat([h, skip], dim=-1) @ m.skip_linear.weight.T + m.skip_linear.bias
    a = F.layer_norm(h, (D,), m.norm1.weight, m.norm1.bias, eps=1e-5)
    qkv = a @ m.attn.qkv.weight.T  # no bias
    qkv = qkv.reshape(B, L, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, d)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = torch.softmax(q @ k.transpose(-2, -1) * (D // heads) ** -0.5, dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(B, L, D)
    h = h + o @ m.attn.proj.weight.T + m.attn.proj.bias
    a = F.layer_norm(h, (D,), m.norm2.weight, m.norm2.bias, eps=1e-5)
    hidden = F.gelu(a @ m.mlp.fc1.weight.T + m.mlp.fc1.bias)
    return h + hidden @ m.mlp.fc2.weight.T + m.mlp.fc2.bias


def reference_forward(model, x, t, y, heads):
    B, C, H, W = x.shape
    p, D = model.patch_size, model.embed_dim
    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p)
    patches = patches.flatten(2).transpose(1, 2)  # (B, L, D)
    tokens = [_reference_timestep_embedding(t, D)[:, None, :], patches]
    if y is not None:
        tokens.insert(0, model.label_emb.weight[y][:, None, :])
    h = torch.cat(tokens, dim=1) + model.pos_embed  # [label][time][patches]
    skips = []
    for blk in model.in_blocks:
        h = _reference_block(blk, h, heads)
        skips.append(h)
    h = _reference_block(model.mid_block, h, heads)
    for blk in model.out_blocks:
        h = _reference_block(blk, h, heads, skip=skips.pop())  # last in, first out
    assert not skips
    h = F.layer_norm(h, (D,), model.norm.weight, model.norm.bias, eps=1e-5)
    h = h @ model.decoder_pred.weight.T + model.decoder_pred.bias
    h = h[:, model.extras:, :]  # drop the label/time tokens
    gh, gw = H // p, W // p
    img = h.reshape(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)  # (p1 p2 C) order
    return F.conv2d(img, model.final_layer.weight, model.final_layer.bias, padding=1)


def _randomise(model, seed):
    """Every parameter non-trivial (biases and norms too), so that no term can hide behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm1.weight") or name.endswith("norm2.weight")
                    or name == "norm.weight" else 0.2 * noise)
    return model


@pytest.mark.parametrize("conditional", [False, True])
def test_forward_equals_reference(conditional):
    model = _randomise(_small(num_classes=10 if conditional else -1), seed=3)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0.5, 250.0, 999.0])
    y = torch.tensor([0, 4, 9]) if conditional else None
    with torch.no_grad():
        out = model(x, t, y)
        ref = reference_forward(model, x, t, y, heads=4)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if conditional:  # the label matters
        with torch.no_grad():
            assert not torch.allclose(model(x, t, torch.tensor([1, 5, 2])), out, atol=1e-4)


def test_long_skips_are_last_in_first_out():
    """Swapping two in-blocks' weights must change the output (the pairing of skips is not symmetric)."""
    model = _randomise(_small(), seed=11)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ref = reference_forward(model, x, t, None, heads=4)
        torch.testing.assert_close(model(x, t), ref, atol=1e-5, rtol=0)
        sd = model.state_dict()
        swapped = {k.replace("out_blocks.0.", "out_blocks.X.").replace("out_blocks.2.", "out_blocks.0.")
                   .replace("out_blocks.X.", "out_blocks.2."): v for k, v in sd.items()}
        model.load_state_dict(swapped)
        assert not torch.allclose(model(x, t), ref, atol=1e-3)


def test_timestep_embedding_cos_first_then_sin():
    t = torch.tensor([0.0, 1.0, 123.5])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos(0) = 1, sin(0) = 0
    freqs = torch.exp(-math.log(10000.0) * torch.arange(4) / 4)  # 1, 10^-1, 10^-2, 10^-3
    torch.testing.assert_close(emb[1, :4], torch.cos(freqs))
    torch.testing.assert_close(emb[1, 4:], torch.sin(freqs))
    torch.testing.assert_close(emb, _reference_timestep_embedding(t, 8))


def test_scalar_timestep_and_label_on_unconditional():
    model = _small()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor(40.0)), model(x, torch.full((2,), 40.0)))
        with pytest.raises(ValueError, match="unconditional"):
            model(x, torch.full((2,), 40.0), torch.tensor([0, 1]))


# -- the text-conditioned U-ViT (libs/uvit_t2i.py) ------------------------------------------------


def test_text_model_official_keys_and_size():
    model = _meta("uvit_s2_mscoco")
    sd = model.state_dict()
    assert set(sd) == (official_keys(12, conditional=False) | {"context_embed.weight", "context_embed.bias"})
    assert tuple(sd["context_embed.weight"].shape) == (512, 768)  # CLIP ViT-L/14 width -> D
    assert tuple(sd["pos_embed"].shape) == (1, 1 + 77 + 16 * 16, 512)  # [time][77 text][256 patches]
    assert model.num_exits == 13
    # U-ViT's paper lists 45M parameters for U-ViT-S/2 on MS-COCO
    assert 44.5e6 < sum(p.numel() for p in model.parameters()) < 45.5e6


def test_text_model_forward_equals_reference():
    torch.manual_seed(0)
    model = _randomise(UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=32, depth=6, num_heads=4, clip_dim=12,
                            num_clip_token=5).eval(), seed=4)
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3.0, 640.0])
    context = torch.randn(2, 5, 12, generator=g)
    B, C, H, W = x.shape
    D, p = 32, 2
    with torch.no_grad():
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=p).flatten(2)
        text = context @ model.context_embed.weight.T + model.context_embed.bias
        h = torch.cat([_reference_timestep_embedding(t, D)[:, None, :], text, patches.transpose(1, 2)], dim=1)
        h = h + model.pos_embed  # [time][text][patches], the t2i order
        skips = []
        for blk in model.in_blocks:
            h = _reference_block(blk, h, 4)
            skips.append(h)
        h = _reference_block(model.mid_block, h, 4)
        for blk in model.out_blocks:
            h = _reference_block(blk, h, 4, skip=skips.pop())
        h = F.layer_norm(h, (D,), model.norm.weight, model.norm.bias, eps=1e-5)
        h = (h @ model.decoder_pred.weight.T + model.decoder_pred.bias)[:, 1 + 5:, :]
        img = h.reshape(B, H // p, W // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)
        ref = F.conv2d(img, model.final_layer.weight, model.final_layer.bias, padding=1)
        out = model(x, t, context)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        assert not torch.allclose(model(x, t, context.flip(0)), out, atol=1e-4)  # the text matters
    with pytest.raises(ValueError, match="text-conditioned"):
        model(x, t, None)
    with pytest.raises(ValueError, match="not both"):
        UViT(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=4, num_classes=10, clip_dim=12)
