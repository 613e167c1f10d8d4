import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_stability.reference.cascade.transformer import (
    CascadeConfig,
    CascadeStage,
    CascadeTransformer,
    _calibration,
    apply_rotary,
    rotary_angles,
    small_init_,
)

TINY = {"latent_dim": 8, "widths": (16, 16, 16), "n_layers": 2, "n_heads": 2}


def _inputs(b=2, d=8, t=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 5.7 * torch.randn(b, d, t, generator=g), 5.7 * torch.randn(b, d, t, generator=g)


def test_stage_shapes_and_output():
    model = CascadeTransformer(CascadeConfig(**TINY))
    source, cond = _inputs()
    out = model(source, cond)
    assert len(out.stages) == 3
    for y, s, c in zip(out.stages, out.scales, out.clamped_fractions):
        assert y.shape == source.shape
        assert s.shape == (2, 1, 1)
        assert c.shape == ()
        assert torch.isfinite(y).all()
    assert out.output is out.stages[-1]


def test_default_config_is_the_post_mortem_fix():
    cfg = CascadeConfig()
    assert (cfg.latent_dim, cfg.n_stages, cfg.widths, cfg.layers_per_stage) == (128, 3, (256, 384, 384), (6, 6, 6))
    assert cfg.residual_weights == (1.0, 1.0, 0.3)
    assert (cfg.min_scale, cfg.max_scale, cfg.warn_above) == (0.7, 1.5, 1.3)
    assert cfg.spectral_norm_output
    assert cfg.rms_reference == "source"
    assert cfg.qk_layernorm  # the fix the miniature post-mortem needs most (tests/reference/cascade/test_module.py)
    assert cfg.normalize_input
    assert cfg.predict_gain  # the amplitude fixes (docs/guides/cascade.md)
    assert cfg.calibrate_output
    assert cfg.frame_envelope
    assert cfg.calibrate_exact
    assert cfg.identity_init


def test_residual_weights_and_scale_clamp_as_configured():
    # With zero output projections, stage k outputs clamp(rms(ref) / rms(r_k * prev)) * r_k * prev: hand-computable.
    cfg = CascadeConfig(**TINY, residual_weights=(1.0, 0.5, 0.1), spectral_norm_output=False, min_scale=0.7)
    model = CascadeTransformer(cfg)
    assert [s.residual_weight for s in model.stages] == [1.0, 0.5, 0.1]
    assert all((s.scale.min_scale, s.scale.max_scale) == (0.7, 1.5) for s in model.stages)
    with torch.no_grad():
        for proj in model.output_projections:
            proj.weight.zero_()
            proj.bias.zero_()
    source, cond = _inputs()
    out = model(source, cond)
    # stage 1: r=1 -> factor 1; stage 2: 0.5*x -> raw factor 2 -> clamped 1.5; stage 3: 0.1*0.75x -> raw 13.3 -> 1.5
    expected = [source, 0.75 * source, 0.1125 * source]
    for y, e in zip(out.stages, expected):
        torch.testing.assert_close(y, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(out.scales).flatten(), torch.tensor([1.0, 1.0, 1.5, 1.5, 1.5, 1.5]))
    assert [float(c) for c in out.clamped_fractions] == [0.0, 1.0, 1.0]


def test_spectral_norm_on_output_projections():
    model = CascadeTransformer(CascadeConfig(**TINY))
    source, cond = _inputs()
    for _ in range(5):  # power iterations run in training-mode forwards
        model(source, cond)
    model.eval()
    for proj in model.output_projections:
        assert parametrize.is_parametrized(proj, "weight")
        sigma = torch.linalg.matrix_norm(proj.weight.detach(), ord=2)
        assert abs(float(sigma) - 1.0) < 1e-2
    plain = CascadeTransformer(CascadeConfig(**TINY, spectral_norm_output=False))
    assert not any(parametrize.is_parametrized(p, "weight") for p in plain.output_projections)


def test_padding_mask_makes_padded_frames_irrelevant():
    torch.manual_seed(0)
    model = CascadeTransformer(CascadeConfig(**TINY)).eval()
    source, cond = _inputs(b=2, t=20)
    length = 13
    junk_source, junk_cond = source.clone(), cond.clone()
    junk_source[1, :, length:] = 1e3 * torch.randn(8, 20 - length)
    junk_cond[1, :, length:] = -1e3
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, length:] = False
    with torch.no_grad():  # a gain head that reads its inputs (it is zero at init)
        for stage in model.stages:
            stage.gain_proj.weight.normal_(0.0, 0.1)
    padded = model(junk_source, junk_cond, mask=mask)
    cropped = model(source[1:, :, :length], cond[1:, :, :length])
    for y_pad, y_crop in zip(padded.stages, cropped.stages):
        torch.testing.assert_close(y_pad[1:, :, :length], y_crop, rtol=1e-4, atol=1e-4)
        assert torch.equal(y_pad[1, :, length:], torch.zeros(8, 20 - length))
    torch.testing.assert_close(padded.scales[2][1:], cropped.scales[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded.gains[2][1:], cropped.gains[2], rtol=1e-4, atol=1e-5)
    assert float((padded.gains[2].detach() - 1).abs().max()) > 1e-3  # the gains did take part


def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    cos, sin = rotary_angles(64, 8, 10000.0, torch.device("cpu"))

    def score(t, s):
        qt = apply_rotary(q.expand(1, 1, 64, 8), cos, sin)[0, 0, t]
        ks = apply_rotary(k.expand(1, 1, 64, 8), cos, sin)[0, 0, s]
        return float(qt @ ks)

    assert score(10, 3) == pytest.approx(score(50, 43), rel=1e-4)
    assert score(0, 0) == pytest.approx(float(q.flatten() @ k.flatten()), rel=1e-5)


def test_softcap_path_matches_sdpa_when_cap_is_huge_and_caps_when_small():
    torch.manual_seed(0)
    base = CascadeTransformer(CascadeConfig(**TINY, qk_layernorm=True)).eval()
    capped = CascadeTransformer(CascadeConfig(**TINY, qk_layernorm=True, attn_logit_softcap=1e6)).eval()
    capped.load_state_dict(base.state_dict())
    source, cond = _inputs()
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 17:] = False
    torch.testing.assert_close(
        capped(source, cond, mask=mask).output, base(source, cond, mask=mask).output, rtol=1e-4, atol=1e-4
    )
    tight = CascadeTransformer(CascadeConfig(**TINY, qk_layernorm=True, attn_logit_softcap=0.01)).eval()
    tight.load_state_dict(base.state_dict())
    assert not torch.allclose(tight(source, cond).output, base(source, cond).output, atol=1e-3)
    assert base.stages[0].blocks[0].attn.q_norm is not None


def test_bf16_autocast_forward_backward_is_finite():
    model = CascadeTransformer(CascadeConfig(**TINY, attn_logit_softcap=30.0, qk_layernorm=True))
    source, cond = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(source, cond)
        loss = sum((y - source).abs().mean() for y in out.stages)
    assert out.output.dtype == torch.float32  # residual stream and stage outputs stay in the parameters' dtype
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_t1200_batch2_forward_backward_fits_on_cpu():
    model = CascadeTransformer(CascadeConfig(latent_dim=128, widths=(64, 64, 64), n_layers=2, n_heads=4))
    source, cond = _inputs(b=2, d=128, t=1200)
    mask = torch.ones(2, 1200, dtype=torch.bool)
    mask[1, 900:] = False
    out = model(source, cond, mask=mask)
    sum(masked.abs().mean() for masked in out.stages).backward()
    assert out.output.shape == (2, 128, 1200)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_init_schemes():
    cfg = CascadeConfig(**{**TINY, "widths": (64, 64, 64), "n_layers": 4}, spectral_norm_output=False)
    scaled = CascadeTransformer(cfg)
    qkv = scaled.stages[0].blocks[0].attn.qkv.weight.detach()
    proj = scaled.stages[0].blocks[0].mlp.proj.weight.detach()
    assert float(qkv.std()) == pytest.approx(0.02, rel=0.1)
    assert float(proj.std()) == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    small = CascadeTransformer(CascadeConfig(**{**TINY, "widths": (64, 64, 64)}, init="small"))
    fc = small.stages[1].blocks[0].mlp.fc.weight.detach()
    assert float(fc.std()) == pytest.approx(1e-3, rel=0.1)
    assert float(small.stages[1].blocks[0].mlp.fc.bias.detach().abs().max()) == 0.0


def test_small_init_helper_scales_convs_and_parametrized_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 4, 3), nn.Linear(4, 4), nn.LayerNorm(4))
    nn.utils.parametrizations.weight_norm(net[0])
    conv_before = net[0].weight.detach().clone()
    small_init_(net, std=1e-3, conv_factor=0.5)
    torch.testing.assert_close(net[0].weight.detach(), 0.5 * conv_before)
    assert float(net[1].weight.detach().std()) < 3e-3
    assert torch.equal(net[2].weight.detach(), torch.ones(4))
    with pytest.raises(ValueError, match="`std`"):
        small_init_(net, std=0.0)


def test_rms_reference_target_uses_the_answer():
    model = CascadeTransformer(CascadeConfig(**TINY, rms_reference="target"))
    source, cond = _inputs()
    with pytest.raises(ValueError, match="rms_reference='target'"):
        model(source, cond)
    target = 0.5 * source
    assert model(source, cond, target=target).output.shape == source.shape


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"widths": (16, 16)}, "`widths` must have n_stages=3"),
        ({"residual_weights": (1.0, 1.0)}, "`residual_weights` must have n_stages=3"),
        ({"n_heads": 3}, r"`widths\[0\]`=16 must be a multiple of `n_heads`=3"),
        ({"n_layers": (1, 2)}, "`n_layers` must be an int or have n_stages=3"),
        ({"min_scale": 2.0}, "`min_scale` must be <= `max_scale`"),
        ({"rms_reference": "answer"}, "`rms_reference` must be one of"),
        ({"init": "xavier"}, "`init` must be one of"),
        ({"dropout": 1.0}, r"`dropout` must be a number in \[0, 1\), got 1.0"),
        ({"attn_logit_softcap": -1.0}, "`attn_logit_softcap` must be a finite number > 0"),
        ({"residual_weights": (1.0, float("nan"), 0.3)}, r"`residual_weights\[1\]`"),
        ({"gain_range": 1.0}, "`gain_range` must be a finite number > 1, got 1.0"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CascadeConfig(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latent_dim": 8.0}, "`latent_dim` must be an int, got 8.0"),
        ({"cond_dim": "8"}, "`cond_dim` must be an int or None, got '8'"),
        ({"widths": 16}, "`widths` must be a sequence of ints, got 16"),
        ({"widths": (16, 16.0, 16)}, r"`widths\[1\]` must be an int, got 16.0"),
        ({"n_layers": 2.0}, "`n_layers` must be an int, got 2.0"),
        ({"n_layers": (2, "2", 2)}, r"`n_layers\[1\]` must be an int, got '2'"),
        ({"residual_weights": "1.0"}, "`residual_weights` must be a sequence of numbers, got '1.0'"),
        ({"mlp_ratio": "4"}, "`mlp_ratio` must be a number, got '4'"),
        ({"dropout": None}, "`dropout` must be a number, got None"),
        ({"qk_layernorm": 1}, "`qk_layernorm` must be a bool, got 1"),
    ],
)
def test_config_wrong_types_are_type_errors_naming_the_field(kwargs, match):
    with pytest.raises(TypeError, match=match):
        CascadeConfig(**{**TINY, **kwargs})


def test_stage_and_small_init_arguments_are_checked():
    config = CascadeConfig(**TINY)
    with pytest.raises(ValueError, match="`index` must be <= 2, got 3"):
        CascadeStage(config, 3)
    with pytest.raises(TypeError, match="`index` must be an int, got 1.0"):
        CascadeStage(config, 1.0)
    with pytest.raises(TypeError, match="`config` must be a CascadeConfig, got dict"):
        CascadeStage(dict(TINY), 0)
    with pytest.raises(TypeError, match="`conv_factor` must be a number, got '0.5'"):
        small_init_(nn.Linear(2, 2), conv_factor="0.5")
    with pytest.raises(ValueError, match="`conv_factor` must be a finite number > 0, got -0.5"):
        small_init_(nn.Linear(2, 2), conv_factor=-0.5)


def test_config_from_dict_rejects_unknown_fields():
    assert CascadeConfig.from_any({"widths": [16, 16, 16], "n_heads": 2}).widths == (16, 16, 16)
    with pytest.raises(ValueError, match=r"unknown `config` field\(s\) \['width'\]"):
        CascadeConfig.from_any({"width": 3})


def test_input_errors_name_the_shapes():
    model = CascadeTransformer(CascadeConfig(**TINY))
    source, cond = _inputs()
    with pytest.raises(ValueError, match=r"latent_dim=8, T>0\], got shape \(2, 7, 24\)"):
        model(source[:, :7], cond)
    with pytest.raises(ValueError, match=r"`conditioning` must have shape \[B=2, cond_dim=8, T=24\].*\(2, 8, 20\)"):
        model(source, cond[:, :, :20])
    with pytest.raises(ValueError, match="`conditioning` latents"):
        model(source)
    with pytest.raises(ValueError, match=r"`mask` must be a bool tensor of shape \[B=2, T=24\]"):
        model(source, cond, mask=torch.ones(2, 24))
    unconditioned = CascadeTransformer(CascadeConfig(**TINY, cond_dim=0))
    assert unconditioned(source).output.shape == source.shape


def test_pickles_and_deepcopies_with_spectral_norm():
    import copy
    import pickle

    model = CascadeTransformer(CascadeConfig(**TINY))
    source, cond = _inputs()
    model(source, cond)
    model.eval()
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert not clone.training
        assert clone.config == model.config
        torch.testing.assert_close(clone(source, cond).output, model(source, cond).output, rtol=0, atol=0)
        assert parametrize.is_parametrized(clone.stages[0].output_proj, "weight")


def test_output_gain_calibration_at_init_starts_weak_residual_stages_inside_the_clamp():
    torch.manual_seed(0)
    model = CascadeTransformer(CascadeConfig(**TINY, calibrate_output=False, identity_init=False))  # r = (1, 1, 0.3)
    gains = [float(s.out_norm.weight.detach()[0]) for s in model.stages]
    assert gains[:2] == [1.0, 1.0]
    assert gains[2] > 1.2  # raised so rms(W h) = sqrt(1 - 0.3^2) for the weak-residual stage
    source, cond = _inputs(b=4, t=64)
    out = model(source, cond)
    assert all(float(s.mean()) < model.config.warn_above for s in out.scales)
    uncalibrated = CascadeConfig(**TINY, init="default", calibrate_output=False, identity_init=False)
    uncalibrated = CascadeTransformer(uncalibrated)
    assert all(float(s.out_norm.weight.detach()[0]) == 1.0 for s in uncalibrated.stages)


def _quiet_projections(model):
    """Every output projection -> 0.05 x its weight: a quiet projection, as a learned one that aligned with
    low-variance feature directions is (measured: 5x quieter than at init after 100 steps of the example)."""
    with torch.no_grad():
        for stage in model.stages:
            stage.out_norm.weight.mul_(0.05)
            stage.out_norm.bias.zero_()
            stage.output_proj.bias.zero_()


def test_output_calibration_keeps_a_quiet_projection_off_the_ceiling():
    # The r = 0.3 stage's output is 0.3 * prev plus its projection; if the projection is quiet the output's RMS
    # collapses and the factor sits at its ceiling (the post-mortem's symptom), whatever the init calibration did.
    # calibrate_output scales the projection, per item, so that p + r * prev has exactly the RMS of prev (with
    # calibrate_exact=False: at least that RMS, a floor).
    cfg = {**TINY, "predict_gain": False}
    torch.manual_seed(0)
    once = CascadeTransformer(CascadeConfig(**cfg, calibrate_output=False)).eval()
    _quiet_projections(once)
    source, cond = _inputs(b=4, t=32)
    out = once(source, cond)
    assert float(out.scales[2].min()) == 1.5  # pinned at the ceiling
    assert float(out.clamped_fractions[2]) == 1.0

    level = source.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    for exact in (True, False):
        torch.manual_seed(0)
        calibrated = CascadeTransformer(CascadeConfig(**cfg, calibrate_exact=exact)).eval()
        _quiet_projections(calibrated)
        out = calibrated(source, cond)
        assert float(out.clamped_fractions[2]) == 0.0
        # by hand: stage 3's p + 0.3 * prev (its output before the factor) has the RMS of stage 2's output
        prev = out.stages[1] / level  # back to the normalised units
        raw = out.stages[2] / level / out.scales[2]
        ratio = raw.pow(2).mean(dim=(1, 2)).sqrt() / prev.pow(2).mean(dim=(1, 2)).sqrt()
        torch.testing.assert_close(ratio, torch.ones(4), rtol=1e-3, atol=1e-4)  # a quiet p is raised: both modes
        torch.testing.assert_close(out.scales[2], out.scales[1].new_ones(4, 1, 1), rtol=2e-2, atol=0.0)
    assert calibrated.stages[2].wanted_rms == pytest.approx(math.sqrt(1 - 0.09))
    assert calibrated.stages[0].wanted_rms == 0.0  # r = 1 stages are left alone: their residual carries the amplitude

    # a loud projection: the floor leaves it (factor < 1), the exact calibration scales it down to prev's RMS
    p = torch.randn(4, 8, 32)
    q = torch.randn(4, 8, 32)
    for p_case in (p, 3.0 * q, -0.5 * q + p):  # orthogonal-ish, aligned, anti-aligned
        lam = _calibration(p_case, q, 0.3, 1e-12)
        mixed = lam * p_case + 0.3 * q
        torch.testing.assert_close(mixed.pow(2).sum(dim=(1, 2)), q.pow(2).sum(dim=(1, 2)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_calibration(3.0 * q, q, 0.3, 1e-12), torch.full((4, 1, 1), 0.7 / 3.0))


def test_predicted_gain_starts_at_one_reads_the_raw_levels_and_is_bounded():
    torch.manual_seed(0)
    model = CascadeTransformer(CascadeConfig(**TINY)).eval()
    source, cond = _inputs()
    out = model(source, cond)
    assert all(torch.equal(g, torch.ones(2, 1, 1)) for g in out.gains)  # zero-initialised head: gain exactly 1
    plain = CascadeTransformer(CascadeConfig(**TINY, predict_gain=False)).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all("gain_proj" in k for k in unexpected)
    for y, y_plain in zip(out.stages, plain(source, cond).stages):
        torch.testing.assert_close(y, y_plain)

    # a head that reads only the raw levels: log g = log rms(cond) - log rms(source), tanh-bounded to log(4)
    width = TINY["widths"][0]
    with torch.no_grad():
        for stage in model.stages:
            stage.gain_proj.weight.zero_()
            stage.gain_proj.weight[0, width:] = torch.tensor([-1.0, 1.0])
    quiet = 0.5 * source
    out = model(quiet, cond)
    expected = math.log(float(cond[0].pow(2).mean().sqrt()) / float(quiet[0].pow(2).mean().sqrt()))
    bound = math.log(4.0)
    expected = math.exp(bound * math.tanh(expected / bound))
    assert float(out.gains[0][0].detach()) == pytest.approx(expected, rel=1e-4)
    # gains compose: stage k's factor aims at the level stage k - 1 ended at, so a stage that keeps the previous
    # output's amplitude sits at a factor near 1 whatever the gain before it
    torch.testing.assert_close(out.stages[0], plain(quiet, cond).stages[0] * out.gains[0], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.stages[0].gain_proj.bias.fill_(100.0)
    assert float(model(source, cond).gains[0].detach().max()) == pytest.approx(4.0)


def _smooth_inputs(b=2, d=16, t=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, t, generator=g).cumsum(-1), torch.randn(b, d, t, generator=g)


def test_identity_init_starts_every_stage_near_doing_nothing():
    """Measured: relative L1 to the input at init 0.54 / 0.70 / 1.28 per stage by default (the random projections
    add noise as loud as the signal), 0.06 / 0.09 / 0.18 with ``identity_init`` (d 16, widths 32)."""
    source, cond = _smooth_inputs()

    def distances(**kwargs):
        torch.manual_seed(0)
        config = CascadeConfig(latent_dim=16, widths=(32, 32, 32), n_layers=1, n_heads=2, **kwargs)
        with torch.no_grad():
            out = CascadeTransformer(config).eval()(source, cond)
        return [float((y - source).abs().mean() / source.abs().mean()) for y in out.stages]

    far, near = distances(identity_init=False), distances()
    assert far[0] > 0.4, far
    assert far[2] > 1.0, far
    assert max(near) < 0.3, near
    assert near[0] < 0.15, near
    torch.manual_seed(0)
    narrow = CascadeConfig(latent_dim=16, widths=(8, 8, 8), n_layers=1, n_heads=2, identity_init=True)
    narrow = CascadeTransformer(narrow)
    assert narrow.stages[2].output_proj.weight.shape == (16, 8)  # narrower than latent_dim: no identity block, no error


def test_frame_envelope_follows_the_previous_outputs_frame_loudness():
    """With ``frame_envelope`` the projection is multiplied by the previous output's per-frame RMS (relative to its
    RMS over real frames) times a zero-initialised per-frame gain: at init the stage's correction is loud where its
    input is loud, and a padded item gives the same result as its crop."""
    source, cond = _smooth_inputs(b=1)
    source[:, :, :24] *= 0.1  # a quiet first half
    torch.manual_seed(0)
    config = CascadeConfig(latent_dim=16, widths=(32, 32, 32), n_layers=1, n_heads=2, predict_gain=False)
    with_env = CascadeTransformer(config).eval()
    without = CascadeTransformer(CascadeConfig(**{**config.to_dict(), "frame_envelope": False})).eval()
    without.load_state_dict({k: v for k, v in with_env.state_dict().items() if "frame_gain" not in k})
    for stage in with_env.stages:
        assert torch.equal(stage.frame_gain_proj.weight, torch.zeros_like(stage.frame_gain_proj.weight))

    def correction_loudness(model):  # stage 1 (r = 1): y / s - prev is the projection, per half
        with torch.no_grad():
            out = model(source, cond)
        level = source.pow(2).mean().sqrt()
        part = out.stages[0] / out.scales[0] - source
        return [float(part[..., h].pow(2).mean().sqrt() / level) for h in (slice(0, 24), slice(24, 48))]

    quiet, loud = correction_loudness(with_env)
    assert quiet < 0.2 * loud
    quiet, loud = correction_loudness(without)
    assert quiet > 0.5 * loud  # LayerNorm divides the frame loudness out
