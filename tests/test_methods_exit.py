"""The dynamic exit methods: DeeDiff, BERxiT, CALM (methods/deediff.py, bertxit.py, calm.py).

Tiny models: a U-ViT of width 32 with 2 heads (still 13 blocks) and the CPU-sized DDIM U-Net.
"""
import math

import einops
import pytest
import torch
from torch import nn

from backbones import BACKBONES
from backbones.uvit import timestep_embedding
from bench.diffusion import NoiseSource, VPSDE, DiscreteSchedule, ddim, euler_maruyama
from bench.engine import EarlyExitModel
from methods import build_method
from methods.base import DiffusionModel, Method
from methods.calm import calibrate_threshold, fixed_sequence_test, hoeffding_p_value, relative_error
from methods.common import exit_predictions, pixel_map

UVIT = ("uvit_tiny", dict(embed_dim=32, num_heads=2))
UNET = ("ddim_tiny", {})
METHOD_NAMES = ("deediff", "bertxit", "calm")
NEVER = {"deediff": 0.0, "bertxit": 0.0, "calm": 2.0}    # nothing can exit at these thresholds
ALWAYS = {"deediff": 1.0, "bertxit": 1.0, "calm": -2.0}  # every sample exits as early as allowed


def build(backbone, method_name, hparams=None, seed=0):
    name, kwargs = backbone
    torch.manual_seed(seed)
    bb = BACKBONES.get(name)(**kwargs)
    method = build_method(method_name, hparams or {})
    return DiffusionModel(bb, method.attach(bb)), method


def batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, 1, 28, 28, generator=g)
    model_t = torch.tensor([3.0, 500.0, 990.0, 120.0, 760.0, 45.0][:n])
    noise = torch.randn(n, 1, 28, 28, generator=g)
    return x_t, model_t, noise


# ---- (1) the DeeDiff loss is eq. 10, 12, 13 -----------------------------------------------------


def _unpatchify(tokens, channels, p):
    """(B, L, p*p*C) -> (B, C, H, W) written out with reshape/permute (U-ViT's (p1 p2 C) order)."""
    b, n, _ = tokens.shape
    side = math.isqrt(n)
    x = tokens.reshape(b, side, side, p, p, channels)      # B h w p1 p2 C
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * p, side * p)


@pytest.mark.parametrize("hparams", [
    {}, {"layerwise_loss": False}, {"uem_time": "concat"}, {"ual_detach": False},
    {"loss_form": "paper"}, {"loss_form": "paper", "layerwise_loss": False}, {"loss_form": "paper", "ual_detach": False},
    {"lambda_u": 0.5, "beta_ual": 2.0}, {"uem_target": "data"}, {"uem_target": "data", "discrete": True},
    {"uem_target": "final"},
], ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items()) or "defaults")
def test_deediff_loss_by_hand(hparams):
    hparams = dict(hparams)
    # as training sets it (uem_target: data reads alpha_t and sigma_t): U-ViT's VP-SDE, or a discrete
    # schedule whose network time is offset (model_time = N t - 1 + 1)
    schedule = DiscreteSchedule.linear(time_offset=1) if hparams.pop("discrete", False) else VPSDE()
    model, method = build(UVIT, "deediff", hparams)
    method.diffusion_schedule = schedule
    bb = model.backbone
    with torch.no_grad():  # UEM maps away from 0.5 so that the weights matter
        for p in model.extras.parameters():
            p.normal_(0.0, 0.3)
    x_t, t, eps = batch(2)
    loss, logs = method.loss(model, x_t, t, eps)

    # g_i by the exit contract; u_i from the UEM weights, by hand
    with torch.no_grad():
        state, g, u = bb.prepare(x_t, t), [], []
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            g.append(bb.head(state, i).double())
            uem = model.extras["uem"][i]
            logits = state["x"][:, bb.extras:] @ uem.proj.weight.T + uem.proj.bias      # (B, L, p*p*C)
            if hparams.get("uem_time") == "concat":
                logits = logits + (timestep_embedding(t, bb.embed_dim) @ uem.time.weight.T)[:, None, :]
            u.append(torch.sigmoid(_unpatchify(logits, bb.in_chans, bb.patch_size)).double())
    eps = eps.double()
    n = bb.num_exits
    l_simple = ((g[-1] - eps) ** 2).mean()
    if hparams.get("uem_target") == "data":  # the error of the clean image each exit implies
        view = (-1, 1, 1, 1)
        a, s = (f(schedule.from_model_time(t)).view(view) for f in (schedule.alpha, schedule.sigma))
        x0 = (x_t.double() - s * eps) / a
        u_hat = [torch.tanh(((x_t.double() - s * gi) / a - x0).abs()) for gi in g]
    elif hparams.get("uem_target") == "final":  # the distance to the final exit's prediction
        u_hat = [torch.tanh((gi - g[-1]).abs()) for gi in g]
    else:
        u_hat = [torch.tanh((gi - eps).abs()) for gi in g]                            # eq. 9
    l_u = sum(((u[i] - u_hat[i]) ** 2).mean() for i in range(n))                       # eq. 10
    if hparams.get("loss_form", "official") == "official":  # the default
        l_u = l_u / n
        conf = torch.stack([(1 - ui).mean() for ui in u])
        w = conf / conf.sum()
        l_ual = sum(w[i] * ((g[i] - eps) ** 2).mean() for i in range(n))
    else:
        l_ual = sum(((1 - u[i]) * (g[i] - eps) ** 2).mean() for i in range(n - 1))     # eq. 12
    if hparams.get("layerwise_loss") is False:
        l_ual = 0.0 * l_ual
    lam, beta = hparams.get("lambda_u", 1.0), hparams.get("beta_ual", 1.0)
    expected = l_simple + lam * l_u + beta * l_ual                                     # eq. 13
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6, abs=1e-6)
    assert logs["l_u"] == pytest.approx(l_u.item(), rel=1e-6, abs=1e-6)
    assert logs["l_ual"] == pytest.approx(float(l_ual), rel=1e-6, abs=1e-6)
    assert logs["l_simple"] == pytest.approx(l_simple.item(), rel=1e-6, abs=1e-6)


def test_deediff_data_target_needs_the_schedule():
    model, method = build(UVIT, "deediff", {"uem_target": "data"})
    x_t, t, eps = batch(2)
    with pytest.raises(RuntimeError, match="needs the diffusion schedule"):
        method.loss(model, x_t, t, eps)
    method.diffusion_schedule = VPSDE()
    loss, _ = method.loss(model, x_t, t, eps)
    method.hp["uem_target"] = "noise"
    assert method.loss(model, x_t, t, eps)[0].item() != pytest.approx(loss.item())  # the target matters


def test_deediff_gradients_follow_detach_choices():
    """The UEM learns only from L_u when (1 - u) is detached; the backbone never learns from L_u."""
    x_t, t, eps = batch(2)
    grads = {}
    for detach in (True, False):
        model, method = build(UVIT, "deediff", {"ual_detach": detach, "lambda_u": 0.0})
        method.loss(model, x_t, t, eps)[0].backward()
        grads[detach] = model.extras["uem"][0].proj.weight.grad
    assert grads[True] is None or torch.count_nonzero(grads[True]) == 0
    assert torch.count_nonzero(grads[False]) > 0
    # the UEM reads detached hidden states and its targets are detached: without L_UAL the backbone's
    # gradient is that of L_simple, whatever the target
    for target in ("noise", "data", "final"):
        model, method = build(UVIT, "deediff", {"layerwise_loss": False, "uem_target": target})
        method.diffusion_schedule = VPSDE()
        method.loss(model, x_t, t, eps)[0].backward()
        got = [p.grad.clone() for p in model.backbone.parameters()]
        model.zero_grad()
        ((model.backbone(x_t, t) - eps) ** 2).mean().backward()
        for a, p in zip(got, model.backbone.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


# ---- (2) every method on both backbones: trains, samples, and a no-exit threshold is the full model -


@pytest.mark.parametrize("backbone", [UVIT, UNET], ids=["uvit", "unet"])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_train_step_and_sampling(name, backbone):
    model, method = build(backbone, name)
    x_t, t, eps = batch(3)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    loss, logs = method.loss(model, x_t, t, eps)
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in logs.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = dict(model.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("backbone.") for k in changed)
    extras = {k for k in before if k.startswith("extras.")}
    assert extras <= changed  # every module the method added learns

    model.eval()
    with torch.no_grad():
        full = model.backbone(x_t, t)
        engine = EarlyExitModel(model, method, NEVER[name])
        assert torch.equal(engine(x_t, t), full)
        assert engine.record.exit_blocks[-1].tolist() == [model.backbone.num_exits - 1] * 3

        engine = EarlyExitModel(model, method, ALWAYS[name])
        noise = NoiseSource(0, [0, 1])
        if backbone is UVIT:
            images = euler_maruyama(engine, VPSDE(), noise, (1, 28, 28), 4)
        else:
            images = ddim(engine, DiscreteSchedule.linear(), noise, (1, 28, 28), 4)
        assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()
        assert len(engine.record.exit_blocks) == 4  # one record per network call
        assert engine.record.layer_ratio(model.backbone.num_exits) < 0.5

        gmacs = method.decide_gmacs(model)
        assert len(gmacs) == model.backbone.num_exits and gmacs[-1] == 0.0 and min(gmacs[:-1]) > 0


@pytest.mark.parametrize("backbone", [UVIT, UNET], ids=["uvit", "unet"])
@pytest.mark.parametrize("name,thresholds", [("deediff", torch.linspace(0.3, 0.6, 13)),
                                            # CALM at random init: consecutive U-ViT states agree to about
                                            # 0.9997, consecutive U-Net predictions to -0.2..0.35
                                            ("calm", torch.cat([torch.linspace(0.9996, 0.9999, 31),
                                                                torch.linspace(-0.2, 0.35, 56)]))],
                         ids=["deediff", "calm"])
def test_realised_equals_simulate_with_mixed_exits(backbone, name, thresholds):
    """Samples that exit at different blocks: the realised engine (which drops them from the batch and
    from ctx, e.g. CALM's previous representation and its norm) agrees with the simulate mode (which
    keeps everyone) on exits and predictions."""
    model, method = build(backbone, name)
    model.eval()
    with torch.no_grad():
        for p in model.extras.parameters():
            p.mul_(200.0)  # DeeDiff: uncertainty that varies from sample to sample
    x_t, t, _ = batch(6)
    with torch.no_grad():
        for threshold in thresholds.tolist():
            sim = EarlyExitModel(model, method, threshold, mode="simulate")
            out_sim = sim(x_t, t)
            if len(set(sim.record.exit_blocks[-1].tolist())) > 1:
                break
        else:
            pytest.fail("no threshold gave mixed exits")
        real = EarlyExitModel(model, method, threshold)
        out_real = real(x_t, t)
    assert torch.equal(real.record.exit_blocks[-1], sim.record.exit_blocks[-1])
    torch.testing.assert_close(out_real, out_sim, rtol=1e-5, atol=1e-5)
    preds = exit_predictions(model, x_t, t).preds
    for b, i in enumerate(real.record.exit_blocks[-1].tolist()):
        torch.testing.assert_close(out_real[b], preds[i][b], rtol=1e-5, atol=1e-5)


def test_shared_uem_and_unet_maps():
    model, _ = build(UVIT, "deediff", {"shared_uem": True})
    uems = model.extras["uem"]
    assert all(m is uems[0] for m in uems)
    model, _ = build(UNET, "deediff", {"shared_uem": True})
    bb, uems = model.backbone, model.extras["uem"]
    for i in range(bb.num_exits):
        for j in range(bb.num_exits):
            assert (uems[i] is uems[j]) == (bb.exit_channels[i] == bb.exit_channels[j])
    # a U-Net exit map: 1x1 conv, then nearest interpolation to the output size
    m = pixel_map(bb, bb.exit_info[1].width)
    h = torch.randn(2, bb.exit_channels[1], 14, 14)
    expected = nn.functional.interpolate(m.proj(h), size=(28, 28), mode="nearest")
    assert torch.equal(m(h), expected) and expected.shape == (2, bb.out_ch, 28, 28)


@pytest.mark.parametrize("backbone", [UVIT, UNET], ids=["uvit", "unet"])
@pytest.mark.parametrize("uem_time", ["token", "concat"])
def test_exit_rule_mean_equals_the_mean_of_the_map(backbone, uem_time):
    """DeeDiff's exit rule reads mean_sigmoid (no unpatchify, tokens read in place, outputs-major): it must
    be the per-sample mean of the uncertainty map u_i the UEM is trained on."""
    model, method = build(backbone, "deediff", {"uem_time": uem_time})
    bb, (x_t, t, _) = model.backbone, batch(3)
    state = bb.prepare(x_t, t)
    with torch.no_grad():
        for p in model.extras.parameters():  # maps that vary over pixels and samples, and a bias that counts
            p.mul_(200.0).add_(torch.randn_like(p))
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            hidden, uem = bb.hidden(state), model.extras["uem"][i]
            expected = method.uncertainty(model, i, hidden, t).flatten(1).mean(1)
            torch.testing.assert_close(uem.mean_sigmoid(hidden, t), expected, rtol=1e-5, atol=1e-6)


def test_uncertainty_maps_and_hparam_errors():
    model, method = build(UVIT, "deediff")
    x_t, t, _ = batch(2)
    maps = method.uncertainty_maps(model, x_t, t)
    assert len(maps) == 13 and all(m.shape == (2, 1, 28, 28) for m in maps)
    assert all(((m > 0) & (m < 1)).all() for m in maps)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_method("deediff", {"lamda_u": 1.0})
    with pytest.raises(ValueError, match="exit_rule"):
        build_method("deediff", {"exit_rule": "mean"})
    with pytest.raises(ValueError, match="impossible on the U-Net"):
        build(UNET, "calm", {"compare": "hidden"})


# ---- (3) DeeDiff decide: per sample, batch mean, patience ----------------------------------------


def crafted(method_hparams):
    """A U-ViT DeeDiff whose UEM maps are sigmoid(feature 0 of each token), and a state in which every
    token of sample b carries logit(targets[b]): sample b's uncertainty map is exactly targets[b]."""
    model, method = build(UVIT, "deediff", method_hparams)
    with torch.no_grad():
        for uem in model.extras["uem"]:
            uem.proj.weight.zero_()
            uem.proj.weight[:, 0] = 1.0
            uem.proj.bias.zero_()
    bb = model.backbone

    def state(values):
        x = torch.zeros(len(values), bb.extras + 196, bb.embed_dim)
        v = torch.tensor(values)
        x[:, :, 0] = torch.log(v / (1 - v))[:, None]
        return {"x": x, "skips": []}

    return model, method, state


def test_deediff_decide_per_sample_and_batch_mean():
    targets = [0.05, 0.3, 0.1]  # batch mean 0.15
    mid = 6  # the mid block: past the in-blocks, so patience does not apply
    for rule, thr, expected in [("per_sample", 0.2, [True, False, True]), ("batch_mean", 0.2, [True] * 3),
                                ("per_sample", 0.12, [True, False, True]), ("batch_mean", 0.12, [False] * 3)]:
        model, method, state = crafted({"exit_rule": rule})
        ctx = {"model_t": torch.zeros(3)}
        assert method.decide(model, mid, state(targets), ctx, thr).tolist() == expected


def test_deediff_patience():
    thr = 0.2
    # official (patience 1, cumulative): in the in-blocks a second crossing is needed, not necessarily in a row
    model, method, state = crafted({})
    ctx = {"model_t": torch.zeros(3)}
    assert method.decide(model, 0, state([0.1, 0.3, 0.1]), ctx, thr).tolist() == [False] * 3
    assert ctx["deediff_crossings"].tolist() == [1, 0, 1]
    assert method.decide(model, 1, state([0.1, 0.1, 0.3]), ctx, thr).tolist() == [True, False, False]
    # sample 2 crossed at blocks 0 and 2: it exits (sample 0 exited before; the engine would have dropped it)
    assert method.decide(model, 2, state([0.3, 0.3, 0.1]), ctx, thr).tolist() == [True, False, True]
    # past the in-blocks one crossing suffices
    assert method.decide(model, 6, state([0.1, 0.3, 0.3]), ctx, thr).tolist() == [True, False, False]
    # consecutive crossings
    model, method, state = crafted({"patience_reset": True})
    ctx = {"model_t": torch.zeros(2)}
    method.decide(model, 0, state([0.1, 0.1]), ctx, thr)
    method.decide(model, 1, state([0.3, 0.1]), ctx, thr)
    assert method.decide(model, 2, state([0.1, 0.1]), ctx, thr).tolist() == [False, True]
    # no patience
    model, method, state = crafted({"patience": 0})
    assert method.decide(model, 0, state([0.1, 0.3]), {"model_t": torch.zeros(2)}, thr).tolist() == [True, False]


# ---- (4) CALM: its signal, and Learn-then-Test on a toy whose risks are known ---------------------


def test_calm_signal_and_loss():
    model, method = build(UVIT, "calm")
    bb, (x_t, t, eps) = model.backbone, batch(2)
    state, ctx = bb.prepare(x_t, t), {"model_t": t}
    state = bb.run_block(0, state)
    assert method.decide(model, 0, state, ctx, -0.5).all()  # similarity 0 at the first exit
    after_first = dict(ctx)
    h0 = bb.hidden(state).flatten(1).detach()
    state = bb.run_block(1, state)
    cos = nn.functional.cosine_similarity(bb.hidden(state).flatten(1), h0, dim=1).detach()
    assert method.decide(model, 1, state, ctx, float(cos.min()) - 1e-4).all()
    assert not method.decide(model, 1, dict(state), after_first, float(cos.max()) + 1e-4).any()
    loss, _ = method.loss(model, x_t, t, eps)
    preds = exit_predictions(model, x_t, t).preds
    n = len(preds)
    expected = sum((i + 1) / (n * (n + 1) / 2) * ((g - eps) ** 2).mean() for i, g in enumerate(preds))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


class ToyBackbone(nn.Module):
    """Two exits on (B, 2) inputs x = [score, gap]: the full prediction is x + 1, the early one adds
    `gap` to its second entry, so a sample that exits early has relative error gap^2 / ||x + 1||^2."""

    num_exits = 2

    def prepare(self, x, t, cond=None):
        return {"x": x}

    def run_block(self, i, state):
        return {"x": state["x"]}

    def hidden(self, state):
        return state["x"]

    def head(self, state, i):
        x = state["x"]
        return x + 1 if i == 1 else x + 1 + torch.stack([torch.zeros_like(x[:, 1]), x[:, 1]], dim=1)


class ScoreBelow(Method):
    """Exit at block 0 when the sample's score is below the threshold."""

    def decide(self, model, i, state, ctx, threshold):
        return state["x"][:, 0] < threshold


def test_ltt_stops_at_first_candidate_not_rejected():
    n = 200
    score = (torch.arange(n) + 0.5) / n
    gap = torch.where(torch.arange(n) % 2 == 0, torch.tensor(10.0), torch.tensor(0.0))  # half of them drift
    x = torch.stack([score, gap], dim=1)
    batches = [(x[:120], torch.zeros(120)), (x[120:], torch.zeros(80))]  # two batches, pooled
    model = DiffusionModel(ToyBackbone())
    candidates = [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8]       # strict to loose: risks 0, .05, .1, .15, .2, .3, .4
    cal = calibrate_threshold(model, ScoreBelow(), batches, candidates,
                              risk_tolerance=0.25, sample_tolerance=0.5, epsilon=0.05)
    risks = [row["risk"] for row in cal.table]
    assert cal.n == n
    assert risks == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])  # stops after the first failure
    # p = exp(-2 n (delta - R)^2): 0.15 -> e^-4 = 0.018 <= 0.05 certified; 0.2 -> e^-1 = 0.37 is not
    assert cal.table[3]["p_value"] == pytest.approx(math.exp(-4.0))
    assert cal.table[4]["p_value"] == pytest.approx(math.exp(-1.0))
    assert [row["valid"] for row in cal.table] == [True, True, True, True, False]
    assert cal.threshold == 0.3  # although R_hat(0.4) = 0.2 <= delta: not certified at level epsilon
    assert cal.table[3]["layer_ratio"] == pytest.approx((0.3 * 1 + 0.7 * 2) / 2)

    # a loose per-sample tolerance makes every early prediction consistent: the loosest candidate wins
    cal = calibrate_threshold(model, ScoreBelow(), batches, candidates,
                              risk_tolerance=0.25, sample_tolerance=1e3, epsilon=0.05, evaluate_all=True)
    assert cal.threshold == 0.8 and len(cal.table) == len(candidates)
    # a strict level: nothing certified at this n
    cal = calibrate_threshold(model, ScoreBelow(), batches, candidates, risk_tolerance=0.05,
                              sample_tolerance=0.5, epsilon=1e-6)
    assert cal.threshold is None and len(cal.table) == 1


def test_fixed_sequence_and_p_values():
    assert hoeffding_p_value(0.3, 100, 0.2) == 1.0
    assert hoeffding_p_value(0.0, 50, 0.2) == pytest.approx(math.exp(-2 * 50 * 0.04))
    # fixed-sequence testing never looks past the first failure, even at a later safe candidate
    last, p = fixed_sequence_test([0.0, 0.3, 0.0], n=100, risk_tolerance=0.2, epsilon=0.05)
    assert last == 0 and len(p) == 2
    early, full = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [3.0, 4.0]])
    assert relative_error(early, full).tolist() == pytest.approx([0.5, 0.0])
