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


def test_a_head_of_the_wrong_shape_is_an_error(monkeypatch):
    """Where nobody exits apart, the head's tensor is the output itself: its shape is still checked."""
    torch.manual_seed(0)
    model = DiffusionModel(build_backbone("uvit_tiny", embed_dim=32, num_heads=2).eval())
    head = model.backbone.head
    monkeypatch.setattr(model.backbone, "head", lambda state, i: torch.cat([head(state, i)] * 2, dim=1))
    x, t = torch.randn(3, 1, 28, 28), torch.linspace(10, 900, 3)
    for threshold in (None, 1e9):  # full depth; every sample stops after the first block
        with pytest.raises(RuntimeError, match=r"head returned \(3, 2, 28, 28\)"):
            EarlyExitModel(model, ExitWhenHiddenSmall(), threshold=threshold)(x, t)


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


# -- classifier-free guidance: both halves of a sample share one exit block -------------------------


class ExitOnLabelToken(Method):
    """A test plugin whose signal depends on the condition: the mean of the label token's state."""

    def decide(self, model, i, state, ctx, threshold):
        return state["x"][:, 0].mean(1) < threshold


def _class_model():
    torch.manual_seed(1)
    return DiffusionModel(build_backbone("uvit_tiny", embed_dim=32, num_heads=2, num_classes=11).eval())


def test_guidance_without_exit_is_u_vits_formula():
    model = _class_model()
    x, t, y = torch.randn(4, 1, 28, 28), torch.linspace(10, 900, 4), torch.tensor([0, 3, 7, 9])
    null = torch.tensor(10)
    with torch.no_grad():
        eps_c, eps_u = model(x, t, y), model(x, t, null.expand(4))
    engine = EarlyExitModel(model, ExitWhenHiddenSmall(), threshold=None, cond=y, uncond=null, guidance_scale=0.4)
    torch.testing.assert_close(engine(x, t), eps_c + 0.4 * (eps_c - eps_u), atol=1e-5, rtol=0)
    assert len(engine.record.exit_blocks[0]) == 4  # one exit per sample, not per half
    assert engine.record.blocks_run == 8 * model.backbone.num_exits  # but both halves ran


@pytest.mark.parametrize("rule", ["both", "cond", "any"])
def test_guided_exits_are_shared_by_both_halves(rule):
    model = _class_model()
    bb = model.backbone
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(6, 1, 28, 28, generator=g), torch.linspace(5, 990, 6)
    y, null = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor(10)
    # thresholds between the two halves' signals make the rules differ
    signals = []
    with torch.no_grad():
        state = bb.prepare(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null.expand(6)]))
        for i in range(bb.num_exits - 1):
            state = bb.run_block(i, state)
            signals.append(state["x"][:, 0].mean(1))
    last = bb.num_exits - 1

    def first_stop(stops):  # (blocks, n) -> the first stopping block per column, else the last block
        return torch.tensor([int(torch.nonzero(stops[:, k])[0]) if stops[:, k].any() else last
                             for k in range(stops.shape[1])])

    def rules_differ(thr):
        stops = torch.stack([s < thr for s in signals])
        return not torch.equal(first_stop(stops[:, :6] & stops[:, 6:]), first_stop(stops[:, :6]))

    candidates = torch.cat(signals).quantile(torch.linspace(0.05, 0.95, 19)).tolist()
    threshold = next(thr for thr in candidates if rules_differ(thr))  # the rules really differ here
    engine = EarlyExitModel(model, ExitOnLabelToken(), threshold=threshold, cond=y, uncond=null,
                            guidance_scale=1.0, guidance_exit=rule)
    out = engine(x, t)
    exits = engine.record.exit_blocks[0]
    # the expected pair exit from the per-half signals
    stops = torch.stack([s < threshold for s in signals])  # (blocks, 2B)
    c, u = stops[:, :6], stops[:, 6:]
    expected = first_stop(c & u if rule == "both" else c if rule == "cond" else c | u)
    assert torch.equal(exits, expected)
    # each half's prediction comes from that shared exit: recompute by hand
    ref = []
    for k in range(6):
        s = bb.prepare(torch.stack([x[k], x[k]]), torch.stack([t[k], t[k]]), torch.stack([y[k], null]))
        for i in range(int(expected[k]) + 1):
            s = bb.run_block(i, s)
        e = bb.head(s, int(expected[k]))
        ref.append(e[0] + 1.0 * (e[0] - e[1]))
    torch.testing.assert_close(out, torch.stack(ref), atol=1e-4, rtol=0)
    simulated = EarlyExitModel(model, ExitOnLabelToken(), threshold=threshold, mode="simulate", cond=y,
                               uncond=null, guidance_scale=1.0, guidance_exit=rule)
    torch.testing.assert_close(simulated(x, t), out, atol=1e-4, rtol=0)
    assert torch.equal(simulated.record.exit_blocks[0], exits)


def test_guidance_needs_the_unconditional_input():
    with pytest.raises(ValueError, match="unconditional"):
        EarlyExitModel(_class_model(), ExitWhenHiddenSmall(), guidance_scale=0.4, cond=torch.tensor([1]))
    with pytest.raises(ValueError, match="guidance_exit"):
        EarlyExitModel(_class_model(), ExitWhenHiddenSmall(), guidance_exit="either")
