"""The early-exit engine: compaction is real, simulate agrees with it, records match the work done."""
import pytest
import torch

from backbones import build_backbone
from backbones.contract import run_all_blocks
from bench.diffusion import SAMPLERS, VPSDE, NoiseSource
from bench.engine import EarlyExitModel
from methods.base import DiffusionModel, Method


class ExitWhenHiddenSmall(Method):
    """A test plugin: stop after block i when the mean |hidden| of a sample is below the threshold."""

    def decide(self, model, i, state, ctx, threshold):
        h = model.backbone.hidden(state)
        ctx.setdefault("calls", torch.zeros(h.shape[0]))
        ctx["calls"] = ctx["calls"] + 1  # kept per sample and compacted by the engine
        return h.flatten(1).abs().mean(1) < threshold


def _models():
    torch.manual_seed(0)
    uvit = build_backbone("uvit_tiny", embed_dim=32, num_heads=2).eval()
    unet = build_backbone("ddim_tiny").eval()
    return {"uvit": DiffusionModel(uvit), "unet": DiffusionModel(unet)}


MODELS = _models()


def _signal_quantiles(model, x, t):
    """Thresholds at which some but not all samples stop at some block."""
    bb = model.backbone
    state, values = bb.prepare(x, t), []
    for i in range(bb.num_exits - 1):
        state = bb.run_block(i, state)
        values.append(bb.hidden(state).flatten(1).abs().mean(1))
    return torch.cat(values).quantile(torch.tensor([0.2, 0.5]))


@pytest.mark.parametrize("kind", ["uvit", "unet"])
def test_no_exit_equals_full_model(kind):
    model = MODELS[kind]
    x, t = torch.randn(5, 1, 28, 28), torch.linspace(10, 900, 5)
    full = run_all_blocks(model.backbone, x, t)
    for threshold in (None, -1.0):  # None: the method is never asked; -1: it never says stop
        engine = EarlyExitModel(model, ExitWhenHiddenSmall(), threshold=threshold)
        assert torch.equal(engine(x, t), full)
        assert engine.record.layer_ratio(model.backbone.num_exits) == 1.0
        assert engine.record.blocks_run == 5 * model.backbone.num_exits


@pytest.mark.parametrize("kind", ["uvit", "unet"])
def test_realised_and_simulate_agree_and_records_match_work(kind):
    model = MODELS[kind]
    x, t = torch.randn(8, 1, 28, 28), torch.linspace(5, 990, 8)
    distinct_exits = 0
    for threshold in _signal_quantiles(model, x, t).tolist():
        realised = EarlyExitModel(model, ExitWhenHiddenSmall(), threshold=threshold, mode="realised")
        simulate = EarlyExitModel(model, ExitWhenHiddenSmall(), threshold=threshold, mode="simulate")
        out_r, out_s = realised(x, t), simulate(x, t)
        torch.testing.assert_close(out_r, out_s, rtol=1e-5, atol=1e-5)
        exits_r, exits_s = realised.record.exit_blocks[0], simulate.record.exit_blocks[0]
        assert torch.equal(exits_r, exits_s)
        n = model.backbone.num_exits
        distinct_exits = max(distinct_exits, len(exits_r.unique()))
        # realised work is what the records say; simulate runs everything
        assert realised.record.blocks_run == int((exits_r + 1).sum())
        assert simulate.record.blocks_run == 8 * n
        # each sample's output is the head at its recorded exit, computed alone
        for j in range(8):
            bb, e = model.backbone, int(exits_r[j])
            state = bb.prepare(x[j:j + 1], t[j:j + 1])
            for i in range(e + 1):
                state = bb.run_block(i, state)
            torch.testing.assert_close(out_r[j:j + 1], bb.head(state, e), rtol=1e-5, atol=1e-5)
    assert distinct_exits > 1  # samples left the batch at different blocks: compaction was exercised


def test_sampling_through_the_engine_records_every_call():
    model = MODELS["uvit"]
    engine = EarlyExitModel(model, ExitWhenHiddenSmall(), threshold=0.5)
    x = SAMPLERS.get("dpm_solver")(engine, VPSDE(), NoiseSource(0, range(4)), (1, 28, 28), 6, order=2)
    assert x.shape == (4, 1, 28, 28) and torch.isfinite(x).all()
    assert len(engine.record.exit_blocks) == 6 and all(e.shape == (4,) for e in engine.record.exit_blocks)
    assert len(engine.record.per_call(model.backbone.num_exits)) == 6


def test_unknown_mode_lists_valid():
    with pytest.raises(ValueError, match="realised, simulate"):
        EarlyExitModel(MODELS["uvit"], ExitWhenHiddenSmall(), mode="fast")
