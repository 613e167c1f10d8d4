"""``CodecModule``: the reference neural audio codec (SEANet encoder/decoder + residual VQ), EnCodec/DAC style."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics import MeanMetric
from torchmetrics.audio import ScaleInvariantSignalNoiseRatio

from lightning_stability._checks import (
    check_bool,
    check_choice,
    check_int,
    check_interval,
    check_mapping,
    check_number,
    check_pair,
    check_positive,
    check_sequence,
)
from lightning_stability.losses.spectral import (
    DAC_MEL_N_MELS,
    DAC_MEL_WINDOWS,
    MultiResolutionMelLoss,
    MultiResolutionSTFTLoss,
    RMSMatchingLoss,
    check_correlation_gate,
    correlation_gate_weights,
    mel_distance,
)
from lightning_stability.losses.weights import LossWeights
from lightning_stability.metrics.codebook import CodebookUsage
from lightning_stability.metrics.quality import build_quality_metrics, resolve_quality_metrics, summarize
from lightning_stability.metrics.signal import RMSRatio
from lightning_stability.nn.scale import ClampedRMSScale, denormalize, normalize
from lightning_stability.reference.codec.discriminator import (
    MultiScaleSTFTDiscriminator,
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
)
from lightning_stability.reference.codec.quantize import QuantizedResult, ResidualVectorQuantizer
from lightning_stability.reference.codec.seanet import SEANetDecoder, SEANetEncoder

__all__ = ["CodecModule", "CodecOutput"]

#: The weights used when ``loss_weights`` is not given: the objective the demo proved
#: (``docs/codec_demo_experiments.md``; the recipe of :mod:`lightning_stability.reference.codec.recipe`). A dominant
#: time-domain L1 (only a waveform term constrains phase, which SI-SNR measures), a multi-resolution STFT term that
#: puts the output's energy and spectrum in place in the first steps, EnCodec's linear-magnitude mel as the adaptive
#: term, and a 10x RMS term on the decoder's own output that sets the level once the output correlates.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {"mel": 2.5, "l1": 1000.0, "stft": 3.0, "rms": 10.0, "vq": 1.0}
#: The weights of 0.1 (DAC's log-mel 15, EnCodec's L1 0.1): on real speech its output ended 18-35 % too quiet.
LEGACY_LOSS_WEIGHTS: dict[str, float] = {"mel": 15.0, "l1": 0.1, "rms": 1.0, "vq": 1.0}
#: The correlation gate of the default ``rms`` term and gain-invariant ``l1``: both act as the output's correlation
#: with its input rises from 0.4 to 0.8.
DEFAULT_CORRELATION_GATE: tuple[float, float] = (0.4, 0.8)
ADVERSARIAL_LOSS_WEIGHTS: dict[str, float] = {"adv": 1.0, "feat": 2.0}  # DAC's generator / feature-matching weights
KNOWN_LOSSES = ("mel", "l1", "stft", "sisnr", "rms", "vq", "adv", "feat")


@dataclass
class CodecOutput:
    """What :meth:`CodecModule.forward` returns.

    Attributes:
        audio: reconstruction ``[B, C, T]`` (the input's length).
        codes: ``[B, n_q_used, F]`` code indices, ``F = ceil(T / hop)``.
        scale: ``[B, 1, 1]`` per-segment RMS scale sent with the codes (``None`` without scale normalisation).
        quantized: the quantizer's :class:`~lightning_stability.reference.codec.quantize.QuantizedResult` (losses,
            metrics).
        decoded: the decoder's own output at the input's scale, before the ``output_rms_clamp`` factor (the same
            tensor as ``audio`` without one). The ``rms`` term measures it, so the factor cannot hide a quiet decoder.
    """

    audio: Tensor
    codes: Tensor
    scale: Tensor | None
    quantized: QuantizedResult
    decoded: Tensor | None = None


def _audio_from_batch(batch: Any) -> Tensor:
    """The audio ``[B, C, T]`` of a batch: a tensor, the first item of a tuple/list, or ``batch["audio"]``."""
    if isinstance(batch, Mapping):
        if "audio" not in batch:
            raise KeyError(f"a dict batch must have an 'audio' entry, got keys {sorted(batch)}")
        batch = batch["audio"]
    elif isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not torch.is_tensor(batch) or not batch.is_floating_point():
        raise TypeError(f"the batch must hold float audio [B, C, T], got {type(batch).__name__}")
    if batch.dim() == 2:
        batch = batch[:, None]
    if batch.dim() != 3:
        raise ValueError(f"the batch audio must have shape [B, C, T] (or [B, T]), got {tuple(batch.shape)}")
    return batch


class _EvalMetrics(nn.Module):
    """The codec's epoch metrics of one evaluation dataloader: SI-SNR, mel distance, RMS ratio, code usage and the
    speech-quality measures."""

    def __init__(self, n_q: int, codebook_size: int, quality: Sequence[str], sample_rate: int) -> None:
        super().__init__()
        self.si_snr = ScaleInvariantSignalNoiseRatio()
        self.mel_distance = MeanMetric()
        self.rms_ratio = RMSRatio()
        self.codebook = CodebookUsage(n_q, codebook_size)
        self.quality = nn.ModuleDict(build_quality_metrics(quality, sample_rate))
        self.sample_rate = sample_rate

    def update(self, recon: Tensor, audio: Tensor, codes: Tensor) -> None:
        self.si_snr.update(recon, audio)
        self.mel_distance.update(mel_distance(recon, audio, self.sample_rate), weight=audio.shape[0])
        self.rms_ratio.update(recon, audio)
        self.codebook.update(codes)
        for metric in self.quality.values():
            metric.update(recon, audio)

    def compute(self, bitrate: float) -> dict[str, Tensor]:
        """Everything but the quality measures (``summarize`` those: they report what they skipped)."""
        usage = self.codebook.compute()
        values = {
            "si_snr": self.si_snr.compute(),
            "mel_distance": self.mel_distance.compute(),
            "rms_ratio": self.rms_ratio.compute(),
            "bitrate_kbps": torch.tensor(bitrate / 1000.0),
        }
        for i in range(usage["perplexity"].numel()):
            values[f"perplexity_{i}"] = usage["perplexity"][i]
            # codes of stage i that no frame of this evaluation set used (a property of the set's size as much as of
            # the codebook); the quantizer's own EMA dead-code fraction is `train/dead_fraction_<i>`
            values[f"unused_code_fraction_{i}"] = usage["dead_fraction"][i]
        return values

    def reset(self) -> None:
        for metric in (self.si_snr, self.mel_distance, self.rms_ratio, self.codebook, *self.quality.values()):
            metric.reset()


class CodecModule(pl.LightningModule):
    r"""A SEANet + residual-VQ speech codec (EnCodec architecture, DAC-style losses), stable by construction.

    Pipeline (shapes for ``ratios=(8, 5, 4, 2)``, hop 320, at 24 kHz, 75 frames/s)::

        audio [B, C, T] --normalize--> (x / s, s [B, 1, 1])           # EnCodec scale, optional
              --pad to a multiple of hop--> SEANetEncoder -> z [B, 128, F]      F = ceil(T / 320)
              --ResidualVectorQuantizer--> codes [B, n_q, F], quantized [B, 128, F]
              --SEANetDecoder--> [B, C, F * 320] --trim to T, * s--> reconstruction [B, C, T]

    The decoder is unbounded (no tanh, no learnable output scale: ``docs/design.md``, post-mortem 2). Amplitude is
    carried by the per-segment RMS scale ``s`` (computed from the input by
    :func:`~lightning_stability.nn.scale.normalize`, sent with the codes and multiplied back by
    :func:`~lightning_stability.nn.scale.denormalize`; ``normalize_scale=True``, the default; each training crop, or
    each ``encode`` input, is one segment) and by the RMS-matching loss.

    **Losses** (the loss-dict protocol, ``docs/design.md``): unweighted terms, combined by
    ``self.loss_weights.weighted_sum`` (a :class:`~lightning_stability.losses.weights.LossWeights`, which
    ``AdaptiveLossWeight`` may tune):

    - ``mel``: :class:`~lightning_stability.losses.spectral.MultiResolutionMelLoss` (DAC's 7 resolutions), weight 15;
    - ``l1``: time-domain L1, weight 0.1 (EnCodec); ``stft``: multi-resolution STFT loss (off unless weighted);
    - ``sisnr``: negative scale-invariant SNR in dB, ``-10 log10(|a s|^2 / |a s - y|^2)`` with
      ``a = <y, s> / |s|^2`` on zero-mean signals (Le Roux et al. 2019), averaged over the batch (off unless
      weighted): a waveform (phase-sensitive) term that, unlike L1/MSE, does not reward a quieter output;
    - ``rms``: :class:`~lightning_stability.losses.spectral.RMSMatchingLoss`, weight 1;
    - ``vq``: ``codebook_weight * codebook + commitment_weight * commitment`` averaged over the stages, weight 1;
    - with ``adversarial=True``: ``adv`` (generator hinge/LS loss, weight 1) and ``feat`` (feature matching, 2).

    Only the terms named in ``loss_weights`` are computed; a weight of 0 computes and logs the term under
    ``no_grad``. A subclass adds a term by overriding :meth:`compute_losses` (and naming it in ``loss_weights``), or
    replaces the networks by overriding :meth:`build_encoder` / :meth:`build_quantizer` / :meth:`build_decoder`.

    **Quantizer** (:class:`~lightning_stability.reference.codec.quantize.ResidualVectorQuantizer`): ``n_q`` stages of
    ``codebook_size`` codes, per-stage codebook/commitment losses with the detached residual (encodec issue #25),
    k-means initialisation, EMA codebooks (default) or learned ones, dead-code replacement, quantizer dropout and
    DAC's factorised L2-normalised lookup (``codebook_dim``). **The EMA codebook update refuses non-finite
    statistics**: a batch whose per-code counts or sums are not finite (a NaN input, an overflow) leaves the
    codebook, its EMA sums and counts untouched (decided on the device with ``torch.where``, no host sync), and
    neither k-means initialisation nor dead-code replacement ever draws from a non-finite batch. This is defence in
    depth beside ``GradientGuard``'s buffer protection (issue 10): the codebooks survive a NaN batch even without it.
    (``num_updates``, the quantizer-dropout counter, still advances.)

    **Adversarial training** (``adversarial=True``): EnCodec's multi-scale STFT discriminator with manual
    optimization, two AdamW optimizers (generator first, discriminator second in ``configure_optimizers``). Each
    training step: generator forward; discriminator step on ``(audio, reconstruction.detach())`` with the
    discriminator optimizer toggled (generator parameters frozen, their gradients untouched); then the generator step
    with the generator optimizer toggled (discriminator parameters frozen, so the generator's loss writes no
    gradient into them). Each optimizer's gradients are set to ``None`` right before its own backward and again right
    after its step, so when either optimizer steps (and callbacks such as ``GradientGuard`` inspect gradients in
    ``on_before_optimizer_step``) only its own, fresh gradients exist. In manual optimization Lightning's
    ``global_step`` counts both optimizer steps, so ``max_steps`` is reached after ``max_steps / 2`` batches. The step
    output then also holds ``disc_loss`` (the discriminator's loss) and ``disc_real`` / ``disc_fake`` (its logits on
    real and reconstructed audio, flattened over scales), what ``AdversarialBalanceMonitor`` reads by default.

    **Metrics** logged: training ``train/loss``, ``train/<term>`` (unweighted), ``train/si_snr``,
    ``train/perplexity_<i>``, ``train/dead_fraction_<i>`` (the quantizer's own: codes whose EMA count is below the
    dead-code threshold); validation ``val/loss``, ``val/<term>``, ``val/si_snr`` (torchmetrics SI-SNR, dB),
    ``val/mel_distance`` (DAC's), ``val/rms_ratio``, ``val/perplexity_<i>``, ``val/unused_code_fraction_<i>`` (the
    fraction of stage ``i``'s codes that no validation frame used: it depends on the size of the validation set),
    ``val/bitrate_kbps``; with ``quality_metrics`` (on by default where the packages are installed): ``val/pesq``
    (wide-band PESQ, P.862.2, after resampling to 16 kHz), ``val/stoi`` and ``val/loudness_error_lu`` (mean
    ``|L(recon) - L(audio)|``, BS.1770 LU), each with ``val/<name>_skipped`` (clips the measure could not score).
    ``trainer.test`` logs the same family under ``test/``. With several validation (or test) dataloaders each is
    measured on its own and every validation key gets Lightning's ``/dataloader_idx_<i>`` suffix, as ``self.log``
    names them (``val/si_snr/dataloader_idx_1``); with one loader the names are as above.

    Args (keyword-only):
        sample_rate: audio rate (Hz); exposed as ``self.sample_rate``.
        channels, n_filters, ratios, dimension, n_residual_layers, lstm, causal: SEANet (see
            :class:`~lightning_stability.reference.codec.seanet.SEANetEncoder`); defaults are EnCodec 24 kHz's.
        n_q, codebook_size, codebook_dim, l2_normalize, ema_codebook, codebook_decay, kmeans_init, kmeans_iters,
            threshold_ema_dead_code, quantizer_dropout: the quantizer.
        dead_code_usage_ratio: Moshi's dead-code rule (default 0.1): a code whose EMA count falls below this
            fraction of uniform use (``ratio * total / codebook_size``) is replaced by a batch vector, so the
            threshold does not depend on the batch size; ``None`` uses the absolute ``threshold_ema_dead_code``
            (EnCodec's rule, a count per batch).
        dead_code_check_every: steps between dead-code checks (the check runs on the device, no host read).
        normalize_scale: EnCodec-style per-segment RMS normalisation.
        remove_dc: subtract the decoder output's mean over time, ``y - mean_t(y)`` per item and channel, before the
            output scale (a DC block for a decoder with a bias in its last convolution: measured on the demo, the
            RMS-matching term was otherwise met by a DC offset of about -0.1 at -16 LUFS, i.e. most of the output's
            energy). On by default (the recipe); ``False`` for a codec that must carry DC.
        output_rms_clamp: ``None`` (default) or ``(min_scale, max_scale)``: a
            :class:`~lightning_stability.nn.scale.ClampedRMSScale` (``detach_scale=True``) after the decoder pulls the
            normalised-domain output towards unit RMS with the factor clamped to the bounds, a safety net whose
            factor ``ScaleFactorClamp`` logs and bounds (a factor pinned at ``max_scale`` means the decoder's output
            is collapsing). The decoder still learns the amplitude itself (the factor is a constant in backward).
        loss_weights: ``{term: weight}``; default the demo's recipe ``{"mel": 2.5, "l1": 1000, "stft": 3, "rms": 10,
            "vq": 1}`` (+ ``adv`` 1 and ``feat`` 2 when adversarial; 0.1's default, DAC's log-mel 15 with EnCodec's L1
            0.1, is ``LEGACY_LOSS_WEIGHTS`` in this module). Terms: ``mel``, ``l1``, ``stft``, ``sisnr``, ``rms``,
            ``vq``, ``adv``, ``feat``.
        codebook_weight, commitment_weight: inside the ``vq`` term (DAC: 1 and 0.25).
        mel_window_lengths, mel_n_mels: resolutions of the ``mel`` term.
        mel_log_weight, mel_mag_weight: the ``mel`` term's log-mel L1 (DAC: 1) and linear-mel L1 (EnCodec's form:
            its frequency loss is on linear mel magnitudes) weights; default 0 and 1 (the recipe: EnCodec's form).
        lr, betas, weight_decay: AdamW; default 1e-3 (the recipe's short budget; DAC uses 1e-4 over 400k steps, lower
            it for a long run), (0.8, 0.99) (DAC), 0.
        lr_gamma: per-step exponential learning-rate decay (DAC: 0.999996; 1.0 = constant).
        adversarial, disc_filters, disc_n_ffts, adversarial_loss ("hinge" or "ls"), disc_lr: the discriminator.
        gradient_clip_val: gradient-norm clip applied in adversarial (manual) mode; with automatic optimization use
            the Trainer's ``gradient_clip_val``.
        seed: quantizer-dropout seed.
        quality_metrics: validation speech-quality metrics (:mod:`lightning_stability.metrics.quality`), computed
            on each validation clip on the CPU: ``"auto"`` (default: each of ``"pesq"``, ``"stoi"``, ``"loudness"``
            whose package, ``pesq`` / ``pystoi`` / ``pyloudnorm``, is installed: ``pip install
            lightning-stability[metrics]``), ``None`` (off), or a list of those names (a missing package then raises).
            CPU cost per second of validation audio (``benchmarks/quality_cost.py``): PESQ about 18 ms, STOI 6 ms,
            loudness 2 ms (the demo's 24 one-second clips: about 0.6 s of CPU per validation). Clips a measure
            cannot score (silent, shorter than PESQ's 0.25 s or one 400 ms loudness block, NaN output) are skipped,
            counted in ``val/<name>_skipped`` and named in a warning; the epoch never fails on them. Exact under DDP
            (summed scores and counts).
        rms_correlation_gate: ``(rho0, rho1)`` (default ``(0.4, 0.8)``, the recipe) or ``None`` (no gate): the ``rms``
            term's weight per item ramps from 0 at correlation ``rho0`` to 1 at ``rho1`` between the decoder's output
            and the input (detached; see :class:`~lightning_stability.losses.spectral.RMSMatchingLoss`). An L1-trained
            output is shrunk by its correlation with the target (the L1/L2-optimal gain is about ``rho``): early in
            training, matching the level of an uncorrelated output only makes loud noise, while late the gate is open
            and the term pulls the decoder's level to the target's, so a safety-net factor is not left pinned at its
            bound.
        l1_gain_gate: ``(rho0, rho1)`` (default ``(0.4, 0.8)``, the recipe) or ``None``: as the correlation rises
            through the gate, the ``l1`` term compares the decoder's output rescaled to the input's RMS, so it shapes
            the waveform and cannot pull the level down (the L1-optimal gain of a partly correlated output is below 1).
    """

    def __init__(
        self,
        *,
        sample_rate: int = 24000,
        channels: int = 1,
        n_filters: int = 32,
        ratios: Sequence[int] = (8, 5, 4, 2),
        dimension: int = 128,
        n_residual_layers: int = 1,
        lstm: int = 2,
        causal: bool = False,
        n_q: int = 8,
        codebook_size: int = 1024,
        codebook_dim: int | None = None,
        l2_normalize: bool = False,
        ema_codebook: bool = True,
        codebook_decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        dead_code_usage_ratio: float | None = 0.1,
        dead_code_check_every: int = 5,
        quantizer_dropout: float = 0.0,
        normalize_scale: bool = True,
        remove_dc: bool = True,
        output_rms_clamp: tuple[float, float] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        codebook_weight: float = 1.0,
        commitment_weight: float = 0.25,
        mel_window_lengths: Sequence[int] = DAC_MEL_WINDOWS,
        mel_n_mels: Sequence[int] = DAC_MEL_N_MELS,
        mel_log_weight: float = 0.0,
        mel_mag_weight: float = 1.0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.8, 0.99),
        weight_decay: float = 0.0,
        lr_gamma: float = 1.0,
        adversarial: bool = False,
        disc_filters: int = 32,
        disc_n_ffts: Sequence[int] = (1024, 2048, 512),
        adversarial_loss: str = "hinge",
        disc_lr: float | None = None,
        gradient_clip_val: float | None = None,
        seed: int = 0,
        quality_metrics: str | Sequence[str] | None = "auto",
        rms_correlation_gate: tuple[float, float] | None = DEFAULT_CORRELATION_GATE,
        l1_gain_gate: tuple[float, float] | None = DEFAULT_CORRELATION_GATE,
    ) -> None:
        super().__init__()
        # the arguments passed on under another name are checked here, so an error names the argument given; the rest
        # are checked by the blocks that take them (SEANet, the quantizer, the losses, the quality metrics)
        check_int("sample_rate", sample_rate, 1)
        check_bool("ema_codebook", ema_codebook)
        check_interval("codebook_decay", codebook_decay, 0, 1, low_open=True, high_open=True)
        check_number("codebook_weight", codebook_weight, minimum=0)
        check_number("commitment_weight", commitment_weight, minimum=0)
        windows = check_sequence(
            "mel_window_lengths", mel_window_lengths, partial(check_int, minimum=4), noun="a sequence of ints"
        )
        check_sequence(
            "mel_n_mels", mel_n_mels, partial(check_int, minimum=1), length=len(windows), noun="a sequence of ints"
        )
        check_number("mel_log_weight", mel_log_weight, minimum=0)
        check_number("mel_mag_weight", mel_mag_weight, minimum=0)
        check_number("weight_decay", weight_decay, minimum=0)
        check_int("disc_filters", disc_filters, 1)
        check_sequence("disc_n_ffts", disc_n_ffts, partial(check_int, minimum=8), noun="a sequence of ints")
        check_positive("lr", lr)
        check_interval("lr_gamma", lr_gamma, 0, 1, low_open=True)
        check_positive("disc_lr", disc_lr, allow_none=True)
        check_pair("betas", betas, partial(check_interval, low=0, high=1, high_open=True))
        check_choice("adversarial_loss", adversarial_loss, ("hinge", "ls"))
        check_bool("normalize_scale", normalize_scale)
        check_pair("output_rms_clamp", output_rms_clamp, check_positive, ordered=True, allow_none=True)
        if output_rms_clamp is not None and not normalize_scale:
            raise ValueError("`output_rms_clamp` needs `normalize_scale=True` (its target is the unit RMS)")
        check_bool("remove_dc", remove_dc)
        check_bool("adversarial", adversarial)
        check_positive("gradient_clip_val", gradient_clip_val, allow_none=True)
        if loss_weights is None:
            loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(ADVERSARIAL_LOSS_WEIGHTS if adversarial else {})}
        # the weights keep the caller's values: LossWeights stores them as floats
        check_mapping(
            "loss_weights", loss_weights, partial(check_number, minimum=0), noun="a mapping of loss name to weight"
        )
        weighted = {k for k, v in loss_weights.items() if v > 0}
        if not adversarial and weighted & {"adv", "feat"}:
            raise ValueError(
                f"`loss_weights` weights 'adv'/'feat' but `adversarial` is False, got {dict(loss_weights)!r}"
            )
        self.save_hyperparameters()
        self.sample_rate = sample_rate
        self.loss_weights = LossWeights(dict(loss_weights))
        self.automatic_optimization = not adversarial

        self.encoder = self.build_encoder()
        self.quantizer = self.build_quantizer()
        self.decoder = self.build_decoder()
        self.hop_length = int(math.prod(ratios))
        self.output_scale = None if output_rms_clamp is None else ClampedRMSScale(*output_rms_clamp, detach_scale=True)
        self.mel_loss = MultiResolutionMelLoss(
            sample_rate,
            window_lengths=mel_window_lengths,
            n_mels=mel_n_mels,
            log_weight=mel_log_weight,
            mag_weight=mel_mag_weight,
        )
        self.stft_loss = MultiResolutionSTFTLoss() if "stft" in self.loss_weights else None
        self.rms_loss = RMSMatchingLoss(
            correlation_gate=check_correlation_gate(rms_correlation_gate, "rms_correlation_gate")
        )
        self.l1_gain_gate = check_correlation_gate(l1_gain_gate, "l1_gain_gate")
        #: how far the ``rms`` (level) term acts: the mean weight of its correlation gate over the last training
        #: batch (a detached scalar tensor, on the device), read by ``ScaleFactorClamp``; None without a gate
        self.level_gate: Tensor | None = None
        self.discriminator = (
            MultiScaleSTFTDiscriminator(filters=disc_filters, in_channels=channels, n_ffts=disc_n_ffts)
            if adversarial
            else None
        )
        self._quality_names = resolve_quality_metrics(quality_metrics)
        # the epoch metrics of each evaluation dataloader (one set per loader, added when a loader first appears)
        self.val_metrics = nn.ModuleList([self._eval_metrics()])
        self.test_metrics = nn.ModuleList()

    # ---------------------------------------------------------------------------------------------- networks
    def build_encoder(self) -> nn.Module:
        """The encoder ``[B, C, T] -> [B, dimension, T / hop]`` (override to use your own)."""
        return SEANetEncoder(**self._seanet_kwargs())

    def build_decoder(self) -> nn.Module:
        """The decoder ``[B, dimension, F] -> [B, C, F * hop]`` (override to use your own)."""
        return SEANetDecoder(**self._seanet_kwargs())

    def _seanet_kwargs(self) -> dict[str, Any]:
        """The SEANet arguments the encoder and decoder share (the decoder mirrors the encoder)."""
        hp = self.hparams
        return {
            "channels": hp.channels,
            "dimension": hp.dimension,
            "n_filters": hp.n_filters,
            "ratios": tuple(hp.ratios),
            "n_residual_layers": hp.n_residual_layers,
            "lstm": hp.lstm,
            "causal": hp.causal,
        }

    def build_quantizer(self) -> ResidualVectorQuantizer:
        """The residual vector quantizer (override to change it)."""
        hp = self.hparams
        return ResidualVectorQuantizer(
            hp.dimension,
            n_q=hp.n_q,
            codebook_size=hp.codebook_size,
            codebook_dim=hp.codebook_dim,
            l2_normalize=hp.l2_normalize,
            ema=hp.ema_codebook,
            decay=hp.codebook_decay,
            kmeans_init=hp.kmeans_init,
            kmeans_iters=hp.kmeans_iters,
            threshold_ema_dead_code=hp.threshold_ema_dead_code,
            dead_code_usage_ratio=hp.get("dead_code_usage_ratio"),
            dead_code_check_every=hp.get("dead_code_check_every", 5),
            quantizer_dropout=hp.quantizer_dropout,
            seed=hp.seed,
        )

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: shard with FSDP2, each SEANet layer with parameters (and the discriminator)
        a unit of its own, the quantizer replicated so its codebooks stay identical on every rank (see
        :func:`~lightning_stability.sharding.shard_module`). A no-op under every other strategy."""
        from lightning_stability.sharding import layers_with_parameters, shard_module

        units = layers_with_parameters(self.encoder, self.decoder)
        if self.discriminator is not None:
            units.append(self.discriminator)
        shard_module(self, units, replicate=[self.quantizer])

    # ---------------------------------------------------------------------------------------------- codec API
    @property
    def frame_rate(self) -> float:
        """Code frames per second: ``sample_rate / hop``."""
        return self.sample_rate / self.hop_length

    @property
    def bitrate(self) -> float:
        """Bits per second at full ``n_q``: ``n_q * log2(codebook_size) * frame_rate`` (the scale is not counted)."""
        return self.quantizer.bits_per_frame * self.frame_rate

    def _pad(self, x: Tensor) -> Tensor:
        extra = (-x.shape[-1]) % self.hop_length
        return F.pad(x, (0, extra)) if extra else x

    def _check_audio(self, audio: Tensor) -> None:
        if not torch.is_tensor(audio) or audio.dim() != 3 or audio.shape[1] != self.hparams.channels:
            shape = tuple(audio.shape) if torch.is_tensor(audio) else type(audio).__name__
            raise ValueError(f"`audio` must have shape [B, {self.hparams.channels}, T], got {shape}")

    def forward(self, audio: Tensor, n_q: int | None = None) -> CodecOutput:
        """Encode, quantize and decode ``audio [B, C, T]`` (see the class docstring)."""
        self._check_audio(audio)
        length = audio.shape[-1]
        x, scale = normalize(audio) if self.hparams.normalize_scale else (audio, None)
        z = self.encoder(self._pad(x))
        q = self.quantizer(z, n_q=n_q)
        decoded = self._remove_dc(self.decoder(q.quantized)[..., :length])
        y = self._rescale(decoded)
        if scale is not None:
            y = denormalize(y, scale)
        if self.output_scale is None:
            decoded = y
        elif scale is not None:
            decoded = denormalize(decoded, scale)
        return CodecOutput(audio=y, codes=q.codes, scale=scale, quantized=q, decoded=decoded)

    def _remove_dc(self, y: Tensor) -> Tensor:
        # the decoder's DC offset over the segment: y - mean_t(y) per item and channel (``remove_dc=True``)
        return y - y.mean(dim=-1, keepdim=True) if self.hparams.get("remove_dc", False) else y

    def _rescale(self, y: Tensor) -> Tensor:
        # normalised domain: the encoder's input had unit RMS, so the target RMS of the decoder's output is 1
        return y if self.output_scale is None else self.output_scale(y, 1.0)

    @torch.no_grad()
    def encode(self, audio: Tensor, n_q: int | None = None) -> tuple[Tensor, Tensor | None]:
        """``audio [B, C, T] -> (codes [B, n_q, ceil(T / hop)], scale [B, 1, 1] or None)``; updates no statistics."""
        self._check_audio(audio)
        x, scale = normalize(audio) if self.hparams.normalize_scale else (audio, None)
        return self.quantizer.encode(self.encoder(self._pad(x)), n_q=n_q), scale

    @torch.no_grad()
    def decode(self, codes: Tensor, scale: Tensor | None = None, length: int | None = None) -> Tensor:
        """``codes [B, n, F]`` (``n <= n_q``) and the scale from :meth:`encode` -> audio ``[B, C, F * hop]``.

        ``length`` trims the result to the original number of samples.
        """
        if self.hparams.normalize_scale and scale is None:
            raise ValueError("`scale` is required: this codec normalises its input (pass the scale `encode` returned)")
        y = self.decoder(self.quantizer.decode(codes))
        if length is not None:
            y = y[..., :length]
        y = self._rescale(self._remove_dc(y))
        return denormalize(y, scale) if scale is not None else y

    # ---------------------------------------------------------------------------------------------- losses
    def _l1_input(self, recon: Tensor, out: CodecOutput, audio: Tensor) -> Tensor:
        """What the ``l1`` term compares with the input: ``recon``, or with ``l1_gain_gate`` the decoder's output
        rescaled to the input's RMS (gain-invariant: the L1 then shapes the waveform but cannot pull the level down)
        blended in per item by the correlation gate."""
        if self.l1_gain_gate is None:
            return recon
        y = recon if out.decoded is None else out.decoded
        dims = tuple(range(1, y.dim()))
        eps = torch.finfo(torch.float32).eps
        rms_y = y.float().pow(2).mean(dim=dims, keepdim=True).add(eps).sqrt()
        rms_x = audio.float().pow(2).mean(dim=dims, keepdim=True).add(eps).sqrt()
        g = correlation_gate_weights(y, audio, self.l1_gain_gate).view(-1, *([1] * (y.dim() - 1)))
        return g * (y.float() * (rms_x / rms_y)) + (1 - g) * recon.float()

    def compute_losses(self, audio: Tensor, out: CodecOutput) -> dict[str, Tensor]:
        """Unweighted reconstruction and quantizer terms named in ``self.loss_weights`` (not ``adv``/``feat``).

        Override to add your own term (name it in ``loss_weights``; call ``super().compute_losses`` for the rest).
        """
        lw, recon = self.loss_weights, out.audio
        fns = {
            "mel": lambda: self.mel_loss(recon, audio),
            "l1": lambda: F.l1_loss(self._l1_input(recon, out, audio).float(), audio.float()),
            "stft": lambda: self.stft_loss(recon, audio),
            "sisnr": lambda: -self._si_snr(recon, audio).mean(),
            # the decoder's own level, before any safety-net factor: inside its range that factor makes the output's
            # RMS exact, so an RMS term on ``recon`` would see no error while the decoder drifts to the factor's bound
            "rms": lambda: self.rms_loss(recon if out.decoded is None else out.decoded, audio),
            "vq": lambda: out.quantized.penalty(self.hparams.codebook_weight, self.hparams.commitment_weight),
        }
        losses = {}
        for name in lw.names:
            if name in fns:
                if name == "stft" and self.stft_loss is None:
                    self.stft_loss = MultiResolutionSTFTLoss().to(audio.device)
                losses[name] = lw.compute(name, fns[name])
        return losses

    def _check_terms(self, losses: Mapping[str, Tensor]) -> None:
        missing = [n for n in self.loss_weights.names if n not in losses]
        if missing:
            raise ValueError(
                f"`loss_weights` names {missing}, which {type(self).__name__}.compute_losses does not compute "
                f"(built in: {list(KNOWN_LOSSES)}); override `compute_losses` to add them"
            )

    # ---------------------------------------------------------------------------------------------- training
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        audio = _audio_from_batch(batch)
        if not self.automatic_optimization:
            return self._adversarial_step(audio)
        out = self(audio)
        self._track_level_gate(out, audio)
        losses = self.compute_losses(audio, out)
        self._check_terms(losses)
        total = self.loss_weights.weighted_sum(losses)
        self._log_step("train", total, losses, out, audio)
        return self._outputs(total, losses, out, audio)

    def _track_level_gate(self, out: CodecOutput, audio: Tensor) -> None:
        gate = self.rms_loss.correlation_gate
        if gate is None or "rms" not in self.loss_weights.names:
            return
        with torch.no_grad():
            y = out.audio if out.decoded is None else out.decoded  # what the rms term measures
            self.level_gate = correlation_gate_weights(y.float(), audio.float(), gate).mean()

    def _adversarial_step(self, audio: Tensor) -> dict[str, Any]:
        opt_g, opt_d = self.optimizers()
        kind = self.hparams.adversarial_loss
        clip = self.hparams.gradient_clip_val
        out = self(audio)
        self._track_level_gate(out, audio)
        recon = out.audio

        # 1) discriminator: real vs detached reconstruction; generator parameters frozen meanwhile.
        self.toggle_optimizer(opt_d)
        real_logits, _ = self.discriminator(audio)
        fake_logits_d, _ = self.discriminator(recon.detach())
        d_loss = discriminator_loss(real_logits, fake_logits_d, kind)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        if clip:
            self.clip_gradients(opt_d, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)  # no stale discriminator gradient outlives its step
        self.untoggle_optimizer(opt_d)

        # 2) generator: discriminator parameters frozen, so the generator's loss writes no gradient into them.
        self.toggle_optimizer(opt_g)
        losses = self.compute_losses(audio, out)
        lw = self.loss_weights
        if "adv" in lw or "feat" in lw:
            fake_logits, fake_fmaps = self.discriminator(recon)
            with torch.no_grad():
                _, real_fmaps = self.discriminator(audio)
            if "adv" in lw:
                losses["adv"] = lw.compute("adv", generator_adversarial_loss, fake_logits, kind)
            if "feat" in lw:
                losses["feat"] = lw.compute("feat", feature_matching_loss, real_fmaps, fake_fmaps)
        self._check_terms(losses)
        total = lw.weighted_sum(losses)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if clip:
            self.clip_gradients(opt_g, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        self.untoggle_optimizer(opt_g)
        for scheduler in self._schedulers():
            scheduler.step()

        self.log("train/disc_loss", d_loss.detach(), on_step=True, on_epoch=False)
        self._log_step("train", total, losses, out, audio)
        outputs = self._outputs(total, losses, out, audio)
        # the discriminator's side of the step, for AdversarialBalanceMonitor (its default names)
        outputs["disc_loss"] = d_loss.detach()
        outputs["disc_real"] = torch.cat([logits.detach().flatten() for logits in real_logits])
        outputs["disc_fake"] = torch.cat([logits.detach().flatten() for logits in fake_logits_d])
        return outputs

    def _schedulers(self) -> list:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return []
        return list(schedulers) if isinstance(schedulers, (list, tuple)) else [schedulers]

    @staticmethod
    def _outputs(total: Tensor, losses: dict[str, Tensor], out: CodecOutput, audio: Tensor) -> dict[str, Any]:
        return {
            "loss": total,
            "losses": {k: v.detach() for k, v in losses.items()},
            "preds": out.audio.detach(),
            "target": audio,
            "codes": out.codes,
        }

    def _log_step(self, stage: str, total: Tensor, losses: dict[str, Tensor], out: CodecOutput, audio: Tensor):
        on_step = stage == "train"
        kw = {"on_step": on_step, "on_epoch": not on_step, "sync_dist": not on_step, "batch_size": audio.shape[0]}
        self.log(f"{stage}/loss", total.detach(), prog_bar=True, **kw)
        self.log_dict({f"{stage}/{k}": v.detach().float() for k, v in losses.items()}, **kw)
        if stage == "train":
            with torch.no_grad():
                self.log("train/si_snr", self._si_snr(out.audio, audio).mean(), **kw)
            metrics = out.quantized.metrics
            self.log_dict(
                {
                    f"train/{key}_{i}": metrics[key][i]
                    for key in ("perplexity", "entropy", "expired", "dead_fraction")
                    if key in metrics
                    for i in range(metrics[key].numel())
                },
                **kw,
            )

    @staticmethod
    def _si_snr(preds: Tensor, target: Tensor) -> Tensor:
        from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

        with torch.autocast(preds.device.type, enabled=False):
            return scale_invariant_signal_noise_ratio(preds.float(), target.float())

    # ---------------------------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self._eval_step("test", batch, dataloader_idx)

    def _eval_metrics(self) -> _EvalMetrics:
        hp = self.hparams
        return _EvalMetrics(hp.n_q, hp.codebook_size, self._quality_names, self.sample_rate)

    def _stage_metrics(self, stage: str, dataloader_idx: int) -> _EvalMetrics:
        """The metric set of one dataloader of ``stage`` ("val" or "test"), created the first time it is needed."""
        sets = self.val_metrics if stage == "val" else self.test_metrics
        while len(sets) <= dataloader_idx:
            sets.append(self._eval_metrics().to(self.device))
        return sets[dataloader_idx]

    def _eval_step(self, stage: str, batch: Any, dataloader_idx: int) -> dict[str, Any]:
        audio = _audio_from_batch(batch)
        out = self(audio)
        losses = self.compute_losses(audio, out)
        total = self.loss_weights.weighted_sum(losses, allow_missing=True)
        self._log_step(stage, total, losses, out, audio)  # `self.log` adds "/dataloader_idx_N" with several loaders
        self._stage_metrics(stage, dataloader_idx).update(out.audio.float(), audio.float(), out.codes)
        return self._outputs(total, losses, out, audio)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test", self.test_metrics)

    def _eval_epoch_end(self, stage: str, sets: nn.ModuleList) -> None:
        """Log the epoch metrics of each dataloader, named as Lightning names ``self.log`` values: ``val/si_snr`` with
        one loader, ``val/si_snr/dataloader_idx_<i>`` with several."""
        batches = self.trainer.num_test_batches if stage == "test" else self.trainer.num_val_batches
        several = len(batches) > 1
        for idx, metrics in enumerate(sets):
            if self.trainer.sanity_checking or metrics.codebook.histogram.sum() == 0:
                metrics.reset()
                continue
            suffix = f"/dataloader_idx_{idx}" if several else ""
            values = metrics.compute(self.bitrate)
            for name, metric in metrics.quality.items():
                mean, scored, skipped = summarize(metric)  # collective: every rank calls it
                if scored:
                    values[name] = mean
                values[f"{name}_skipped"] = torch.tensor(float(skipped))
                if skipped:
                    rank_zero_warn(
                        f"{type(self).__name__}: {stage}/{name}{suffix} skipped {skipped} of {scored + skipped} "
                        f"{'validation' if stage == 'val' else 'test'} clips "
                        f"({metric.last_skip_reason or 'on other ranks'})"
                    )
            # metric states are already reduced over ranks
            self.log_dict({f"{stage}/{k}{suffix}": v.float() for k, v in values.items()}, add_dataloader_idx=False)
            metrics.reset()

    # ---------------------------------------------------------------------------------------------- optimizers
    def _generator_parameters(self) -> list[nn.Parameter]:
        disc = set() if self.discriminator is None else {id(p) for p in self.discriminator.parameters()}
        return [p for p in self.parameters() if id(p) not in disc]

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.AdamW(
            self._generator_parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay
        )
        optimizers = [opt_g]
        if self.discriminator is not None:
            optimizers.append(
                torch.optim.AdamW(
                    self.discriminator.parameters(),
                    lr=hp.disc_lr or hp.lr,
                    betas=tuple(hp.betas),
                    weight_decay=hp.weight_decay,
                )
            )
        if hp.lr_gamma == 1.0:
            return optimizers[0] if len(optimizers) == 1 else optimizers
        schedulers = [
            {"scheduler": torch.optim.lr_scheduler.ExponentialLR(opt, gamma=hp.lr_gamma), "interval": "step"}
            for opt in optimizers
        ]
        return optimizers, schedulers

    # ---------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the current loss weights (a callback may have changed them) so a resumed run continues exactly."""
        checkpoint["loss_weights"] = self.loss_weights.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "loss_weights" in checkpoint:
            self.loss_weights.load_state_dict(checkpoint["loss_weights"])
        else:
            rank_zero_warn("checkpoint has no `loss_weights`; keeping the module's current weights")
