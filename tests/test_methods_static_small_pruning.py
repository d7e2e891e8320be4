"""The static-exit, small-model and pruning plugins on both tiny backbones (methods/static.py, small.py, pruning.py)."""
import copy
import importlib.util

import pytest
import torch

from backbones import build_backbone
from backbones.contract import run_all_blocks
from bench.checkpoint import atomic_save, load_weights_into
from bench.diffusion import SAMPLERS, SCHEDULES, NoiseSource
from bench.engine import EarlyExitModel
from methods import build_method
from methods.base import DiffusionModel
from methods.static import blocks_per_bucket, paper_static_exits, scheduled_exit

BACKBONES = {"uvit": ("uvit_tiny", {"embed_dim": 32, "num_heads": 2}, "vp"), "unet": ("ddim_tiny", {}, "linear")}
FAST_PRUNING = {"max_steps": 2}  # two calibration steps: the structure, not the importance, is tested here
needs_tp = pytest.mark.skipif(importlib.util.find_spec("torch_pruning") is None, reason="torch-pruning not installed")


def _build(method_name: str, kind: str, hparams: dict | None = None, seed: int = 0):
    """method, DiffusionModel and schedule, built as bench.setup.build_model does."""
    name, kwargs, schedule = BACKBONES[kind]
    method = build_method(method_name, hparams)
    torch.manual_seed(seed)
    backbone = build_backbone(name, **{**method.backbone_overrides(name), **kwargs})
    model = DiffusionModel(backbone, method.attach(backbone))
    return method, model, SCHEDULES.get(schedule)()


def _pruned(kind: str, ratio: float = 0.3):
    method, model, schedule = _build("pruning", kind, {**FAST_PRUNING, "ratio": ratio})
    original = copy.deepcopy(model)
    x0 = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    method.prepare(model, [x0], schedule)
    return method, model.eval(), original.eval(), schedule


# ---- every plugin: one training step, then sampling through the engine -------------------------


@pytest.mark.parametrize("kind", ["uvit", "unet"])
@pytest.mark.parametrize("name,hparams", [("static", {}), ("static", {"schedule": "time"}), ("small", {}),
                                          pytest.param("pruning", FAST_PRUNING, marks=needs_tp)],
                         ids=["static", "static_time", "small", "pruning"])
def test_training_step_and_sampling(name, hparams, kind):
    method, model, schedule = _build(name, kind, hparams)
    if method.prepare_images:
        method.prepare(model, [torch.rand(4, 1, 28, 28) * 2 - 1], schedule)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # after prepare: it holds the pruned parameters
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1
    t = schedule.sample_train_time(4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    loss, logs = method.loss(model, schedule.add_noise(x0, t, noise), schedule.model_time(t), noise)
    assert torch.isfinite(loss) and all(v == v for v in logs.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())

    model.eval()
    for threshold in (None, *method.default_thresholds[:1]):
        engine = EarlyExitModel(model, method, threshold=threshold)
        x = SAMPLERS.get("ddim")(engine, schedule, NoiseSource(0, range(2)), (1, 28, 28), 2)
        assert x.shape == (2, 1, 28, 28) and torch.isfinite(x).all()


# ---- static: fixed exits and the time schedule -------------------------------------------------


def test_paper_layers_map_to_zero_based_exits():
    assert paper_static_exits(13) == (6, 8, 10)  # layers 7, 9, 11 of U-ViT-S
    assert paper_static_exits(7) == (3, 4, 5)  # the same depth fractions on a 7-exit U-Net
    method, model, _ = _build("static", "uvit")
    assert method.default_thresholds == (6.0, 8.0, 10.0) and method.threshold_range == (0.0, 12.0)


@pytest.mark.parametrize("kind", ["uvit", "unet"])
def test_fixed_schedule_exits_at_the_block_it_is_told(kind):
    method, model, _ = _build("static", kind)
    model.eval()
    n = model.backbone.num_exits
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([5.0, 500.0, 990.0])
    for block in (0, 3, n - 1, n + 4):
        engine = EarlyExitModel(model, method, threshold=float(block))
        out = engine(x, t)
        expected = min(block, n - 1)
        assert engine.record.exit_blocks[0].tolist() == [expected] * 3
        assert engine.record.blocks_run == 3 * (expected + 1)
        state = model.backbone.prepare(x, t)
        for i in range(expected + 1):
            state = model.backbone.run_block(i, state)
        torch.testing.assert_close(out, model.backbone.head(state, expected))


def test_time_schedule_scales_moon_et_al():
    assert blocks_per_bucket(28) == [28, 28, 24, 24, 20, 20, 16, 16, 12, 12]  # Moon et al., DiT-XL/2
    assert blocks_per_bucket(13) == [13, 13, 11, 11, 9, 9, 7, 7, 6, 6]
    assert blocks_per_bucket(7) == [7, 7, 6, 6, 5, 5, 4, 4, 3, 3]
    assert blocks_per_bucket(13, 0.0) == [13] * 10
    assert min(blocks_per_bucket(13, 3.0)) == 1  # never fewer than one block
    t = torch.tensor([0.0, 99.9, 100.0, 450.0, 999.0, 1000.0])
    assert scheduled_exit(t, 13).tolist() == [12, 12, 12, 8, 5, 5]


@pytest.mark.parametrize("kind", ["uvit", "unet"])
def test_time_schedule_runs_fewer_blocks_at_noisier_steps(kind):
    method, model, _ = _build("static", kind, {"schedule": "time"})
    model.eval()
    n = model.backbone.num_exits
    t = torch.tensor([10.0, 250.0, 450.0, 650.0, 950.0])
    engine = EarlyExitModel(model, method, threshold=1.0)
    engine(torch.randn(5, 1, 28, 28), t)
    exits = engine.record.exit_blocks[0]
    assert exits.tolist() == [b - 1 for b in [blocks_per_bucket(n)[int(v // 100)] for v in t.tolist()]]
    assert exits[0] == n - 1 and all(exits[1:] <= exits[:-1]) and exits[-1] < exits[1]
    deeper = EarlyExitModel(model, method, threshold=0.5)
    deeper(torch.randn(5, 1, 28, 28), t)
    assert (deeper.record.exit_blocks[0] >= exits).all() and deeper.record.blocks_run > engine.record.blocks_run


def test_static_loss_trains_the_scheduled_exits():
    method, model, schedule = _build("static", "unet")  # per-exit heads: training reaches exactly E's
    x, noise = torch.randn(4, 1, 28, 28), torch.randn(4, 1, 28, 28)
    loss, logs = method.loss(model, x, torch.full((4,), 300.0), noise)
    assert {k for k in logs if k.startswith("mse_exit_")} == {"mse_exit_3", "mse_exit_4", "mse_exit_5"}
    loss.backward()
    heads = model.backbone.exit_heads
    assert all(heads[i].conv.weight.grad is not None for i in (3, 4, 5))
    assert all(heads[i].conv.weight.grad is None for i in (0, 1, 2))
    method, model, _ = _build("static", "unet", {"schedule": "time"})
    t = torch.tensor([50.0, 50.0, 950.0, 950.0])  # exits 6 (last, L_simple only) and 2
    method.loss(model, x, t, noise)[0].backward()
    grads = [i for i, h in enumerate(model.backbone.exit_heads) if h.conv.weight.grad is not None]
    assert grads == [2]


# ---- small ---------------------------------------------------------------------------------


def test_small_model_is_shallow():
    _, uvit, _ = _build("small", "uvit")
    assert uvit.backbone.num_exits == 7 and len(uvit.backbone.in_blocks) == 3 and len(uvit.backbone.out_blocks) == 3
    method, unet, _ = _build("small", "unet")
    assert unet.backbone.num_exits == 5 and unet.backbone.num_res_blocks == 1  # ch_mult (1, 2, 2) -> (1, 2)
    assert method.backbone_overrides("ddim_cifar10") == {"ch_mult": (1, 2, 2), "num_res_blocks": 1}
    assert method.from_scratch and method.decide(unet, 0, {}, {}, 0.5) is None
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_method("small", {"depht": 4})


# ---- pruning -------------------------------------------------------------------------------


def _kept(new: torch.Tensor, old: torch.Tensor) -> list[int]:
    """Row indices of `old` that `new` kept (rows match exactly)."""
    return [int((old == row).all(1).nonzero()[0]) for row in new]


@needs_tp
def test_pruning_uvit_widths_heads_and_parameters():
    method, model, original, _ = _pruned("uvit")
    heads, head_dim, width = 2, 16, 32
    for block, old in zip(model.backbone.blocks, original.backbone.blocks):
        assert block.mlp.fc1.out_features == 128 - round(0.3 * 128) == 90  # MLP hidden width
        assert block.attn.qkv.out_features == 3 * heads * 11  # 16 - round(4.8) dims kept per head
        assert block.attn.proj.in_features == heads * 11 and block.norm1.normalized_shape == (width,)
        # the same hidden units leave fc1 and fc2; the same dims leave q, k, v of each head and proj
        hidden = _kept(block.mlp.fc1.weight, old.mlp.fc1.weight)
        assert hidden == _kept(block.mlp.fc2.weight.t(), old.mlp.fc2.weight.t())
        kept = _kept(block.attn.qkv.weight, old.attn.qkv.weight)
        q, k, v = kept[:22], kept[22:44], kept[44:]
        assert [i - heads * head_dim for i in k] == q == [i - 2 * heads * head_dim for i in v]
        assert q == _kept(block.attn.proj.weight.t(), old.attn.proj.weight.t())
        assert sum(i < head_dim for i in q) == 11  # the same count in every head
    pruned_layers = ("mlp.fc1", "mlp.fc2", "attn.qkv", "attn.proj")

    def count(m):
        return sum(p.numel() for n, p in m.named_parameters() if any(s in n for s in pruned_layers))

    assert 0.25 < 1 - count(model) / count(original) < 0.35
    assert method.report["params_after"] < method.report["params_before"]
    assert bool(model.extras["pruning"].pruned)


@needs_tp
def test_pruning_unet_keeps_groupnorm_valid():
    method, model, original, _ = _pruned("unet")
    bb, old = model.backbone, original.backbone
    for (name, m), m_old in zip(bb.named_modules(), old.modules()):
        if isinstance(m, torch.nn.GroupNorm):
            assert m.num_channels % 32 == 0 and m.weight.shape == (m.num_channels,)
        if name.endswith("conv1"):  # each GroupNorm group of g channels loses round(0.3 g)
            g = m_old.out_channels // 32
            assert m.out_channels == m_old.out_channels - 32 * int(0.3 * g + 0.5)
    assert bb.conv_out.out_channels == 1 and all(h.conv.out_channels == 1 for h in bb.exit_heads)
    attn, attn_old = bb.mid.attn_1, old.mid.attn_1
    assert attn.q.out_channels == attn.k.out_channels == attn.v.out_channels == attn.proj_out.in_channels == 64 - 19
    # q, k and v lose the same inner channels (q.k contracts over them), proj_out reads exactly those
    kept = [_kept(getattr(attn, a).bias[:, None], getattr(attn_old, a).bias[:, None]) for a in ("q", "k", "v")]
    assert kept[0] == kept[1] == kept[2]
    rows = _kept(attn.proj_out.bias[:, None], attn_old.proj_out.bias[:, None])
    assert torch.equal(attn.proj_out.weight, attn_old.proj_out.weight[rows][:, kept[0]])
    assert method.report["params_after"] < 0.7 * method.report["params_before"]


@needs_tp
@pytest.mark.parametrize("kind", ["uvit", "unet"])
def test_pruned_model_is_its_contract_and_survives_save_and_load(kind, tmp_path):
    method, model, _, _ = _pruned(kind)
    x, t = torch.randn(3, 1, 28, 28), torch.tensor([3.0, 400.0, 900.0])
    with torch.no_grad():
        out = model(x, t)
        assert torch.equal(out, run_all_blocks(model.backbone, x, t))
        state = model.backbone.prepare(x, t)
        for i in range(model.backbone.num_exits):  # every exit head still fits its (pruned) features
            state = model.backbone.run_block(i, state)
            assert model.backbone.head(state, i).shape == x.shape
    path = tmp_path / "pruned.pt"
    atomic_save({"model": model.state_dict(), "ema": model.state_dict()}, path)
    _, fresh, _ = _build("pruning", kind, FAST_PRUNING, seed=123)  # unpruned, other initial weights
    load_weights_into(fresh, path)  # weights_only=True
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x, t), out)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())
    assert method.prepare(fresh, [x], SCHEDULES.get(BACKBONES[kind][2])())["skipped"] == "already pruned"


@needs_tp
def test_pruning_through_training_resumes_with_the_pruned_shapes(tmp_path):
    from bench.checkpoint import load_checkpoint
    from bench.config import load_config, resolve
    from bench.setup import build_model
    from bench.train import train

    overrides = {"model.init_from": None, "model.kwargs": {"embed_dim": 32, "num_heads": 2}, "data.limit": 16,
                 "train.steps": 2, "train.batch_size": 4, "train.progress": False, "run.runs_dir": str(tmp_path)}
    cfg = resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": "pruning"}, overrides=overrides)
    cfg["method"].update(max_steps=2, calib_images=4)  # (set here: bench.yaml need not list these keys)
    last = train(cfg, stop_at=1)  # prunes, trains one step, saves last.pt
    final = train(cfg)  # resumes: a fresh model must take the pruned shapes before loading
    assert last.name == "last.pt" and final.name == "final.pt"
    weights = load_checkpoint(final)["ema"]
    assert weights["backbone.in_blocks.0.mlp.fc1.weight"].shape == (90, 32)
    model = build_model(cfg, build_method("pruning", cfg["method"]))
    load_weights_into(model, final)
    assert model.backbone.in_blocks[0].mlp.fc1.out_features == 90
