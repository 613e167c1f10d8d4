import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_stability.reference.codec.module import CodecModule
from tests._helpers_codec import LENGTH, OBJECTIVE_0_1, SR, TINY, chirps, loader
from tests.helpers import make_trainer

# the test clips are 0.128 s: too short for PESQ, STOI and BS.1770 loudness; validation reports the skips, as designed
pytestmark = pytest.mark.filterwarnings(r"ignore:CodecModule. val/\w+ skipped \d+ of \d+ validation clips:UserWarning")


def _codec(**kw):
    return CodecModule(**{**TINY, **kw})


class _Recorder(pl.Callback):
    def __init__(self):
        self.outputs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def test_shapes_and_encode_decode_round_trip():
    codec = _codec().eval()
    audio = chirps(2, length=1000)  # not a multiple of the hop (16): padded, then trimmed back
    out = codec(audio)
    assert out.audio.shape == (2, 1, 1000)
    assert out.codes.shape == (2, 3, math.ceil(1000 / 16))
    assert out.scale.shape == (2, 1, 1)
    codes, scale = codec.encode(audio)
    torch.testing.assert_close(codes, out.codes, rtol=0, atol=0)
    torch.testing.assert_close(codec.decode(codes, scale, length=1000), out.audio)
    assert codec.decode(codes, scale).shape[-1] == 63 * 16
    # fewer stages decode too (bitrate scalability)
    assert codec.decode(codes[:, :1], scale, length=1000).shape == (2, 1, 1000)
    with pytest.raises(ValueError, match="`scale`"):
        codec.decode(codes)
    with pytest.raises(ValueError, match=r"`audio` must have shape \[B, 1, T\]"):
        codec(torch.randn(2, 2, 160))


def test_bitrate_and_frame_rate():
    codec = CodecModule(n_filters=2, lstm=0)  # EnCodec 24 kHz layout: hop 320, 8 x 1024 codes
    assert codec.sample_rate == 24000
    assert codec.frame_rate == 75.0
    assert codec.bitrate == 6000.0
    assert _codec().bitrate == 3 * math.log2(32) * SR / 16


def test_scale_normalisation_makes_the_codec_amplitude_equivariant():
    codec = _codec().eval()
    audio = chirps(2)
    loud, quiet = codec(3.0 * audio), codec(audio)
    torch.testing.assert_close(loud.audio, 3.0 * quiet.audio, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loud.codes, quiet.codes, rtol=0, atol=0)
    silent = codec(torch.zeros(2, 1, LENGTH))
    assert torch.isfinite(silent.audio).all()
    assert silent.audio.abs().max() < 1e-6


def test_fast_dev_run_follows_the_protocols(tmp_path):
    codec = _codec()
    rec = _Recorder()
    trainer = make_trainer(tmp_path, [rec], fast_dev_run=True, limit_val_batches=1)
    trainer.fit(codec, loader(), loader(4))
    out = rec.outputs[0]
    assert set(out["losses"]) == {"mel", "l1", "stft", "rms", "vq"}  # the default objective (the recipe's terms)
    assert all(v.dim() == 0 and not v.requires_grad for v in out["losses"].values())
    assert out["preds"].shape == out["target"].shape == (4, 1, LENGTH)
    expected = sum(codec.loss_weights[k] * v for k, v in out["losses"].items())
    torch.testing.assert_close(out["loss"].detach(), expected)
    metrics = trainer.callback_metrics
    for key in (
        "train/loss",
        "train/si_snr",
        "train/perplexity_0",
        "val/si_snr",
        "val/mel_distance",
        "val/rms_ratio",
        "val/bitrate_kbps",
        "val/perplexity_2",
        "val/unused_code_fraction_0",
    ):
        assert key in metrics, key
    assert metrics["val/bitrate_kbps"].item() == pytest.approx(codec.bitrate / 1000)
    assert "val/dead_fraction_0" not in metrics  # it was the validation set's unused codes, now named for that
    assert all(bool(layer.initialized) for layer in codec.quantizer.layers)  # k-means ran on the first batch


def test_short_fit_on_synthetic_clips_reduces_the_loss(tmp_path):
    torch.manual_seed(0)
    codec = _codec(**OBJECTIVE_0_1)
    rec = _Recorder()
    trainer = make_trainer(tmp_path, [rec], max_steps=24)
    trainer.fit(codec, loader(16, shuffle=True))
    losses = [float(o["loss"]) for o in rec.outputs]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-4:]) / 4 < 0.75 * sum(losses[:4]) / 4
    mel = [float(o["losses"]["mel"]) for o in rec.outputs]
    assert sum(mel[-4:]) < sum(mel[:4])


class _GradAudit(pl.Callback):
    """Which parameters hold a gradient when each optimizer steps."""

    def __init__(self):
        self.records = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        disc = {id(p) for p in pl_module.discriminator.parameters()}
        gen = [p for p in pl_module.parameters() if id(p) not in disc]
        which = "disc" if optimizer is trainer.optimizers[1] else "gen"
        self.records.append(
            {
                "which": which,
                "disc_grads": [p.grad is not None for p in pl_module.discriminator.parameters()],
                "gen_grads": [p.grad is not None for p in gen],
            }
        )


def test_adversarial_gradients_never_leak_between_generator_and_discriminator(tmp_path):
    codec = _codec(
        adversarial=True, disc_filters=2, disc_n_ffts=(64, 128), adversarial_loss="ls", gradient_clip_val=1.0
    )
    assert not codec.automatic_optimization
    assert set(codec.loss_weights) == {"mel", "l1", "stft", "rms", "vq", "adv", "feat"}
    audit = _GradAudit()
    disc_before = [p.detach().clone() for p in codec.discriminator.parameters()]
    trainer = make_trainer(tmp_path, [audit], max_steps=6)  # manual optimization: 2 optimizer steps per batch
    trainer.fit(codec, loader(8))
    assert [r["which"] for r in audit.records] == ["disc", "gen"] * 3
    for r in audit.records:
        if r["which"] == "disc":
            assert all(r["disc_grads"])
            assert not any(r["gen_grads"]), "generator gradients present while the discriminator steps"
        else:
            assert any(r["gen_grads"])
            assert not any(r["disc_grads"]), "discriminator gradients present while the generator steps"
    assert all(p.requires_grad for p in codec.parameters())  # untoggled
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, codec.discriminator.parameters()))
    assert "train/disc_loss" in trainer.callback_metrics
    assert "train/adv" in trainer.callback_metrics


def test_weight_zero_term_is_logged_not_optimised(tmp_path):
    codec = _codec(loss_weights={"mel": 1.0, "stft": 0.0, "vq": 1.0})
    out = codec(chirps(2))
    losses = codec.compute_losses(chirps(2), out)
    assert set(losses) == {"mel", "stft", "vq"}
    assert not losses["stft"].requires_grad
    assert losses["stft"] > 0
    assert losses["mel"].requires_grad


def test_nan_batch_leaves_the_codebooks_untouched():
    codec = _codec().train()
    codec(chirps(4))
    before = {k: v.clone() for k, v in codec.quantizer.state_dict().items() if k != "num_updates"}
    bad = chirps(4)
    bad[1, 0, 100] = float("nan")
    codec(bad)
    after = codec.quantizer.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


class _Subclass(CodecModule):
    """A user's subclass adding a loss term."""

    def compute_losses(self, audio, out):
        losses = super().compute_losses(audio, out)
        losses["neg_sisnr"] = -self._si_snr(out.audio, audio).mean()
        return losses


def test_subclass_adds_a_loss_term_and_unknown_terms_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"\['neg_sisnr'\].*override `compute_losses`"):
        make_trainer(tmp_path, max_steps=1).fit(_codec(loss_weights={"mel": 1.0, "neg_sisnr": 0.1}), loader(4))
    codec = _Subclass(**TINY, loss_weights={"mel": 1.0, "neg_sisnr": 0.1})
    rec = _Recorder()
    make_trainer(tmp_path, [rec], max_steps=2).fit(codec, loader(8))
    assert set(rec.outputs[-1]["losses"]) == {"mel", "neg_sisnr"}
    assert rec.outputs[-1]["losses"]["neg_sisnr"] != 0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sample_rate": 0}, ValueError, "`sample_rate` must be >= 1, got 0"),
        ({"sample_rate": 16000.0}, TypeError, "`sample_rate` must be an int, got 16000.0"),
        ({"lr": -1.0}, ValueError, "`lr` must be a finite number > 0, got -1.0"),
        ({"lr": "1e-3"}, TypeError, "`lr` must be a number, got '1e-3'"),
        ({"betas": (0.9, 1.2)}, ValueError, r"`betas\[1\]` must be a number in \[0, 1\), got 1.2"),
        ({"betas": (0.9,)}, ValueError, r"`betas` must have 2 items, got \(0.9,\)"),
        ({"betas": 0.9}, TypeError, "`betas` must be a pair of numbers, got 0.9"),
        ({"adversarial_loss": "wgan"}, ValueError, r"`adversarial_loss` must be one of \('hinge', 'ls'\), got 'wgan'"),
        ({"loss_weights": {"mel": 1.0, "adv": 1.0}}, ValueError, "`adversarial`"),
        ({"loss_weights": {"mel": -1.0}}, ValueError, r"`loss_weights\['mel'\]` must be a finite number >= 0"),
        ({"loss_weights": {"mel": "1"}}, TypeError, r"`loss_weights\['mel'\]` must be a number, got '1'"),
        ({"loss_weights": [("mel", 1.0)]}, TypeError, "`loss_weights` must be a mapping of loss name to weight"),
        ({"loss_weights": {}}, ValueError, "`loss_weights` must have at least 1 entry, got {}"),
        ({"lr_gamma": 1.5}, ValueError, r"`lr_gamma` must be a number in \(0, 1\], got 1.5"),
        ({"disc_lr": 0.0}, ValueError, "`disc_lr` must be a finite number > 0, got 0.0"),
        ({"gradient_clip_val": -1.0}, ValueError, "`gradient_clip_val` must be a finite number > 0, got -1.0"),
        ({"codebook_decay": 1.0}, ValueError, r"`codebook_decay` must be a number in \(0, 1\), got 1.0"),
        ({"ema_codebook": 1}, TypeError, "`ema_codebook` must be a bool, got 1"),
        ({"adversarial": "yes"}, TypeError, "`adversarial` must be a bool, got 'yes'"),
        ({"normalize_scale": None}, TypeError, "`normalize_scale` must be a bool, got None"),
        ({"output_rms_clamp": (1.5, 0.7)}, ValueError, r"`output_rms_clamp` must be a pair \(low, high\)"),
        ({"output_rms_clamp": (0.7, "1.5")}, TypeError, r"`output_rms_clamp\[1\]` must be a number"),
        ({"output_rms_clamp": (0.7, 1.5), "normalize_scale": False}, ValueError, "needs `normalize_scale=True`"),
        ({"weight_decay": -0.1}, ValueError, "`weight_decay` must be a finite number >= 0, got -0.1"),
        ({"commitment_weight": None}, TypeError, "`commitment_weight` must be a number, got None"),
        ({"mel_window_lengths": (2048, 2)}, ValueError, r"`mel_window_lengths\[1\]` must be >= 4, got 2"),
        ({"mel_n_mels": (80,)}, ValueError, r"`mel_n_mels` must have \d+ items, got \(80,\)"),
        ({"mel_log_weight": -1.0}, ValueError, "`mel_log_weight` must be a finite number >= 0"),
        ({"disc_filters": 0}, ValueError, "`disc_filters` must be >= 1, got 0"),
        ({"disc_n_ffts": 1024}, TypeError, "`disc_n_ffts` must be a sequence of ints, got 1024"),
        # checked by the blocks that take them, under the same name
        ({"ratios": (8, 0)}, ValueError, r"`ratios\[1\]` must be >= 1, got 0"),
        ({"n_q": 2.0}, TypeError, "`n_q` must be an int, got 2.0"),
        ({"codebook_size": 1}, ValueError, "`codebook_size` must be >= 2, got 1"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        _codec(**kwargs)


def test_checkpoint_keeps_loss_weights_and_codebooks(tmp_path):
    codec = _codec()
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(codec, loader(8))
    codec.loss_weights["mel"] = 2.5  # e.g. AdaptiveLossWeight moved it
    path = tmp_path / "codec.ckpt"
    trainer.save_checkpoint(path)
    restored = CodecModule.load_from_checkpoint(path)
    assert restored.loss_weights["mel"] == 2.5
    for key, value in codec.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    restored.eval()
    codec.eval()
    torch.testing.assert_close(restored(chirps(2)).audio, codec(chirps(2)).audio)


class _SaveRankState(pl.Callback):
    """Each rank writes its quantizer state and quantizer-dropout draws to ``folder`` (asserted in the main process)."""

    def __init__(self, folder):
        self.folder = str(folder)
        self.n_q_draws = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.n_q_draws.append(int(outputs["codes"].shape[1]))

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.quantizer.state_dict().items()}
        torch.save({"state": state, "draws": self.n_q_draws}, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_ranks_keep_identical_codebooks(tmp_path):
    # learned codebooks are parameters: DDP does not re-broadcast them, so only the quantizer's own broadcast after
    # k-means init / dead-code replacement keeps the ranks (which see different batches) identical
    codec = _codec(ema_codebook=False, quantizer_dropout=0.5, lr=1e-3)
    trainer = make_trainer(
        tmp_path, [_SaveRankState(tmp_path)], devices=2, strategy="ddp_spawn", max_steps=3, deterministic=False
    )
    trainer.fit(codec, loader(16, batch_size=2))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["draws"] == ranks[1]["draws"]  # quantizer dropout drew the same stage count on both ranks
    assert len(ranks[0]["draws"]) == 3
    s0, s1 = ranks[0]["state"], ranks[1]["state"]
    assert all(bool(s0[f"layers.{i}.initialized"]) for i in range(3))
    for key in s0:
        assert torch.equal(s0[key], s1[key]), key


def test_resumed_fit_continues_exactly(tmp_path):
    # epochs of 2 batches, checkpoint at an epoch end (Lightning replays an epoch's first batches on a mid-epoch resume)
    kw = {"quantizer_dropout": 0.5, "threshold_ema_dead_code": 1.0}  # random draws every step
    torch.manual_seed(0)
    straight = _codec(**kw)
    make_trainer(tmp_path / "a", max_steps=-1, max_epochs=2).fit(straight, loader(8))
    torch.manual_seed(0)
    first = _codec(**kw)
    trainer = make_trainer(tmp_path / "b", max_steps=-1, max_epochs=1)
    trainer.fit(first, loader(8))
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG
    resumed = _codec(**kw)
    make_trainer(tmp_path / "c", max_steps=-1, max_epochs=2).fit(resumed, loader(8), ckpt_path=tmp_path / "half.ckpt")
    assert int(resumed.quantizer.num_updates) == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_bf16_mixed_fit_stays_finite(tmp_path):
    codec = _codec(adversarial=True, disc_filters=2, disc_n_ffts=(64,))
    rec = _Recorder()
    make_trainer(tmp_path, [rec], max_steps=4, precision="bf16-mixed").fit(codec, loader(8))
    assert all(torch.isfinite(o["loss"]) for o in rec.outputs)
    assert all(torch.isfinite(p).all() for p in codec.parameters())
    assert all(torch.isfinite(layer.embed).all() for layer in codec.quantizer.layers)


def _best_shift(output: torch.Tensor, target: torch.Tensor, max_shift: int = 8) -> int:
    """The shift (samples; > 0: the output is late) undoing which gives the best mean SI-SNR, within ``+-max_shift``.

    SI-SNR rather than the raw cross-correlation: normalised per item, so a loud item's pitch-period side peak (the
    test chirps are tonal) does not decide; the edges, where a roll wraps around, are left out.
    """
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    m = max_shift
    scores = [
        scale_invariant_signal_noise_ratio(torch.roll(output, -k, dims=-1)[..., m:-m], target[..., m:-m]).mean()
        for k in range(-m, m + 1)
    ]
    return int(torch.stack(scores).argmax()) - m


def test_remove_dc_and_sisnr_term():
    codec = _codec(remove_dc=True, loss_weights={"sisnr": 1.0, "rms": 1.0}).eval()
    audio = chirps(2) + 0.05  # an input DC offset is not reproduced either
    out = codec(audio)
    torch.testing.assert_close(out.audio.mean(dim=-1), torch.zeros(2, 1), rtol=0, atol=1e-6)
    codes, scale = codec.encode(audio)
    torch.testing.assert_close(codec.decode(codes, scale, length=LENGTH), out.audio)
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    losses = codec.compute_losses(audio, out)
    expected = -scale_invariant_signal_noise_ratio(out.audio, audio).mean()
    torch.testing.assert_close(losses["sisnr"], expected)
    with pytest.raises(TypeError, match="`remove_dc`"):
        _codec(remove_dc="yes")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trained_codec_output_is_aligned_with_its_input(tmp_path):
    # Regression (issue 6 follow-up): the demo codec's output was uncorrelated with its input (SI-SNR -33.6 dB, a DC
    # offset of -0.1). With a waveform term and the DC block, a short fit on fixed clips must give an output in phase
    # with the input: no shifted copy of it matches better, positive SI-SNR, no DC.
    torch.manual_seed(0)
    codec = _codec(remove_dc=True, loss_weights={"sisnr": 1.0, "rms": 1.0, "vq": 1.0})
    make_trainer(tmp_path, max_steps=150).fit(codec, loader(8, batch_size=8))
    audio = chirps(8)
    codec.eval()
    codes, scale = codec.encode(audio)
    recon = codec.decode(codes, scale, length=audio.shape[-1])
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    si_snr = scale_invariant_signal_noise_ratio(recon, audio)
    assert si_snr.mean() > 0, si_snr.flatten().tolist()
    assert _best_shift(recon, audio) == 0
    assert _best_shift(torch.roll(recon, 3, dims=-1), audio) == 3  # the measurement sees a 3-sample delay
    assert recon.mean(dim=-1).abs().max() < 1e-5


class _FactorRecorder(pl.Callback):
    """The output factor's clamped fraction and mean raw value at every training step."""

    def __init__(self):
        self.clamped, self.raw = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clamped.append(float(pl_module.output_scale.last_clamped_fraction))
        self.raw.append(float(pl_module.output_scale.last_raw_scale.mean()))


def _amplitude_fit(tmp_path, rms_weight, gate, l1_gate=None, steps=300):
    torch.manual_seed(0)
    codec = _codec(
        remove_dc=True,
        output_rms_clamp=(0.5, 1.5),
        loss_weights={"mel": 2.5, "l1": 1000.0, "rms": rms_weight, "vq": 1.0},
        rms_correlation_gate=gate,
        l1_gain_gate=l1_gate,
        quality_metrics=None,
    )
    rec = _FactorRecorder()
    make_trainer(tmp_path / f"rms{rms_weight}", max_steps=steps, callbacks=[rec]).fit(codec, loader(16, batch_size=8))
    audio = chirps(8, seed=1)  # held out: other pitches and syllable rates
    codec.eval()
    with torch.no_grad():
        out = codec(audio)
    rms = lambda x: x.pow(2).mean().sqrt()  # noqa: E731
    last = len(rec.clamped) // 4
    return {
        "output_ratio": float(rms(out.audio) / rms(audio)),
        "decoder_ratio": float(rms(out.decoded) / rms(audio)),
        "clamped_last_quarter": sum(rec.clamped[-last:]) / last,
        "factor_last_quarter": sum(rec.raw[-last:]) / last,
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three 300-step fits: about 2 min idle, over 15 min on a loaded 2-core machine
def test_short_fit_learns_the_amplitude_instead_of_pinning_the_factor(tmp_path):
    # Issue 13: with L1 dominating, the decoder's output is shrunk by its correlation with the input and the
    # safety-net factor sits at its bound; the correlation-gated RMS term on the decoder's own output (alone, or with
    # the demo's gain-invariant L1) makes the decoder learn the level, so the factor stays inside its range.
    without = _amplitude_fit(tmp_path, 0.0, None)
    from lightning_stability.reference.codec.demo import DEMO_CORRELATION_GATE, DEMO_LOSS_WEIGHTS

    gated = _amplitude_fit(tmp_path, 20.0, (0.2, 0.6))  # the RMS term alone, earlier gate
    fixed = _amplitude_fit(tmp_path, DEMO_LOSS_WEIGHTS["rms"], DEMO_CORRELATION_GATE, l1_gate=DEMO_CORRELATION_GATE)
    assert without["decoder_ratio"] < 0.75, without  # the failure, reproduced: a quiet decoder ...
    assert without["clamped_last_quarter"] > 0.3, without  # ... and a factor at its bound
    assert 0.85 <= fixed["decoder_ratio"] <= 1.15, fixed
    assert 0.95 <= fixed["output_ratio"] <= 1.05, fixed
    assert fixed["clamped_last_quarter"] < 0.1, fixed
    assert fixed["factor_last_quarter"] < 1.4, fixed
    assert 0.85 <= gated["decoder_ratio"] <= 1.15, gated
    assert gated["clamped_last_quarter"] < 0.1, gated


def test_l1_gain_gate_leaves_the_level_to_the_other_terms():
    # With the gate open the l1 term compares the decoder's output rescaled to the input's RMS: its gradient has no
    # component along the decoder's output (it shapes the waveform, it cannot shrink it). Closed, it is the plain L1
    # of the emitted output.
    from lightning_stability.reference.codec.module import CodecOutput

    codec = _codec(loss_weights={"l1": 1.0}, l1_gain_gate=(0.2, 0.6))
    audio = chirps(4)
    torch.manual_seed(0)
    decoded = (0.5 * audio + 0.05 * torch.randn_like(audio)).requires_grad_()  # correlation ~0.97: gate open
    emitted = decoded * 1.7  # a safety-net factor (a constant in backward)
    loss = codec.compute_losses(
        audio, CodecOutput(audio=emitted, codes=None, scale=None, quantized=None, decoded=decoded)
    )["l1"]
    (grad,) = torch.autograd.grad(loss, decoded)
    radial = (grad * decoded).sum(dim=(1, 2)) / decoded.norm(dim=(1, 2))
    assert (radial.abs() < 1e-4 * grad.norm(dim=(1, 2))).all(), radial  # float32 rounding only
    plain = torch.nn.functional.l1_loss(decoded * 1.7, audio)
    (plain_grad,) = torch.autograd.grad(plain, decoded)
    assert ((plain_grad * decoded).sum(dim=(1, 2)) > 0).all()  # plain L1 on a too-loud output: shrink it
    noise = torch.randn_like(audio).requires_grad_()  # uncorrelated: gate closed
    closed = codec.compute_losses(
        audio, CodecOutput(audio=noise * 2, codes=None, scale=None, quantized=None, decoded=noise)
    )["l1"]
    torch.testing.assert_close(closed, torch.nn.functional.l1_loss(noise * 2, audio))


# ---------------------------------------------------------------------------------------------- several loaders, test
class _EvalRecorder(pl.Callback):
    """Every evaluation batch's outputs, by (stage, dataloader index)."""

    def __init__(self):
        self.outputs = {}

    def _keep(self, stage, outputs, dataloader_idx):
        kept = {k: outputs[k].detach().clone() for k in ("preds", "target", "codes")}
        self.outputs.setdefault((stage, dataloader_idx), []).append(kept)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._keep("val", outputs, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._keep("test", outputs, dataloader_idx)


def _hand_metrics(outputs, codebook_size):
    """SI-SNR (mean over clips, zero-mean, float32 eps as torchmetrics), global RMS ratio and the fraction of stage 0's
    codes no clip used, in float64 from the recorded outputs."""
    preds = torch.cat([o["preds"] for o in outputs]).double().flatten(1)
    target = torch.cat([o["target"] for o in outputs]).double().flatten(1)
    eps = torch.finfo(torch.float32).eps
    p, t = preds - preds.mean(-1, keepdim=True), target - target.mean(-1, keepdim=True)
    s = ((p * t).sum(-1, keepdim=True) + eps) / ((t**2).sum(-1, keepdim=True) + eps) * t
    si_snr = 10 * torch.log10(((s**2).sum(-1) + eps) / (((s - p) ** 2).sum(-1) + eps))
    used = torch.cat([o["codes"][:, 0].flatten() for o in outputs]).unique().numel()
    return {
        "si_snr": float(si_snr.mean()),
        "rms_ratio": math.sqrt(float((preds**2).sum() / (target**2).sum())),
        "unused_code_fraction_0": 1 - used / codebook_size,
    }


def _noise_loader(n=6, seed=5):
    return torch.utils.data.DataLoader(0.2 * torch.randn(n, 1, LENGTH, generator=torch.Generator().manual_seed(seed)))


def test_two_validation_loaders_get_their_own_metrics_named_as_lightning_does(tmp_path):
    torch.manual_seed(0)
    codec, rec = _codec(quality_metrics=None), _EvalRecorder()
    trainer = make_trainer(tmp_path, [rec], max_steps=3, limit_val_batches=1.0, val_check_interval=3)
    trainer.fit(codec, loader(), [loader(8, seed=1), _noise_loader()])
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "val/si_snr" not in metrics
    assert "val/loss/dataloader_idx_1" in metrics  # `self.log` in validation_step: Lightning's own suffix
    hand = [_hand_metrics(rec.outputs["val", i], TINY["codebook_size"]) for i in (0, 1)]
    for i in (0, 1):
        for key, value in hand[i].items():
            assert metrics[f"val/{key}/dataloader_idx_{i}"] == pytest.approx(value, rel=1e-4, abs=1e-4), (i, key)
    assert abs(hand[0]["si_snr"] - hand[1]["si_snr"]) > 3  # speech-like chirps and noise: clearly apart


def test_trainer_test_logs_the_test_family_with_one_loader_unsuffixed(tmp_path):
    torch.manual_seed(0)
    codec, rec = _codec(quality_metrics=None), _EvalRecorder()
    trainer = make_trainer(tmp_path, [rec], limit_test_batches=1.0)
    (result,) = trainer.test(codec, loader(8, seed=2))
    hand = _hand_metrics(rec.outputs["test", 0], TINY["codebook_size"])
    for key, value in hand.items():
        assert result[f"test/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    assert {"test/loss", "test/mel", "test/mel_distance", "test/perplexity_2"} <= set(result)
    assert not any(k.startswith("val/") for k in result)
