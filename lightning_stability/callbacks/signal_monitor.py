"""``SignalMonitor``: SNR, SI-SNR, RMS ratio, peak, DC offset and clipping of a model's output, plus audio media."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.audio import ScaleInvariantSignalNoiseRatio, SignalNoiseRatio
from typing_extensions import override

from lightning_stability._checks import check_bool, check_choice, check_int, check_positive, check_str
from lightning_stability.callbacks._events import EventLog
from lightning_stability.callbacks._logging import log_scalars
from lightning_stability.callbacks._outputs import only_the_loss, only_the_loss_message
from lightning_stability.callbacks._refit import begin_fit
from lightning_stability.callbacks._state_key import cached_state_key
from lightning_stability.metrics.signal import DCOffset, PeakAmplitude, RMSRatio

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SignalMonitor"]

SignalType = Literal["auto", "audio", "latent"]
_SIGNAL_TYPES = ("auto", "audio", "latent")
# scalar names, in logging order; "clip_fraction" only for audio
_AUDIO_KEYS = ("snr", "si_snr", "rms_ratio", "peak", "dc_offset", "clip_fraction")
_LATENT_KEYS = ("snr", "si_snr", "rms_ratio", "peak", "dc_offset")


class SignalMonitor(Callback):
    r"""Measure the health of a model's output signal against its target, in training, validation and test.

    Reads the signal pair ``outputs["preds"]`` / ``outputs["target"]`` that ``training_step``, ``validation_step``
    and ``test_step`` return (the loss-dict protocol: ``{"loss": ..., "losses": {...}, "preds": ..., "target":
    ...}``): audio ``[B, C, T]`` (or ``[B, T]``) or latents ``[B, D, T]``, any float dtype (measured in float32).
    Logged scalars (``<stage>`` is ``train``, ``val`` or ``test``):

    ==============================  ==================================================================================
    ``{prefix}<stage>/snr``         mean per-series SNR in dB, torchmetrics ``SignalNoiseRatio``
    ``{prefix}<stage>/si_snr``      mean per-series SI-SNR in dB, torchmetrics ``ScaleInvariantSignalNoiseRatio``
    ``{prefix}<stage>/rms_ratio``   global :math:`\sqrt{\sum \hat y^2/\sum y^2}` (:class:`~..metrics.RMSRatio`)
    ``{prefix}<stage>/peak``        :math:`\max|\hat y|` (:class:`~..metrics.PeakAmplitude`)
    ``{prefix}<stage>/dc_offset``   mean of :math:`\hat y` (:class:`~..metrics.DCOffset`)
    ``{prefix}<stage>/clip_fraction``  fraction of samples with :math:`|\hat y| \ge` ``clip_level`` (audio only)
    ==============================  ==================================================================================

    With the default prefix the keys are ``signal/train/snr``, ``signal/val/snr``, ... SNR/SI-SNR are computed per
    series (per item and channel) over time and averaged.

    **Training** (every ``train_every_n_steps`` optimizer steps: steps 0, N, 2N, ... counted as ``training_step``
    sees ``global_step``; under gradient accumulation the micro-batch that completes the step): the metrics of that
    one batch, computed on a detached float32 copy under ``no_grad`` and reduced across ranks (all ranks compute at
    the same step). Other steps cost nothing (no host sync). The values are written straight to the trainer's loggers
    at that step (the axis Lightning's own step logging uses), not through ``pl_module.log``, whose step logging is
    gated by the Trainer's own ``log_every_n_steps``, so the training values land on the step they describe; they
    are also put into ``trainer.callback_metrics`` at that step, so ``ModelCheckpoint(monitor="signal/train/si_snr")``
    and ``EarlyStopping`` can use them.

    **Validation and test** (``trainer.fit``/``validate``: ``val``; ``trainer.test``: ``test``): epoch aggregates
    over every batch of every rank (the metrics' states are reduced across ranks before ``compute``), logged with
    ``pl_module.log`` at epoch end, so they are in ``trainer.callback_metrics`` (usable by
    ``ModelCheckpoint``/``EarlyStopping``) and in every logger. **Each dataloader is measured on its own**: with
    several validation (or test) dataloaders the keys get Lightning's suffix for ``self.log``,
    ``signal/val/si_snr/dataloader_idx_0``, ``signal/val/si_snr/dataloader_idx_1``, ...; with one dataloader the
    keys have no suffix (``signal/val/si_snr``).

    **Media** (audio only, validation (not test), rank zero, every ``media_every_n_epochs`` epochs): the first
    ``num_media_examples`` items of the epoch (all channels, as ``[T, C]``; non-finite samples zeroed; values
    beyond full scale clip when written as 16-bit audio) as target and reconstruction audio plus an image with both
    log-mel spectrograms (HTK mel, ~46 ms window, one dB scale):

    - ``WandbLogger``: ``wandb.Audio`` under ``{prefix}val/audio`` and ``wandb.Image`` under ``{prefix}val/mel``;
    - ``TensorBoardLogger``: ``add_audio`` (mono mixdown) under ``{prefix}val/example<i>/target`` and
      ``.../reconstruction``, ``add_image`` under ``{prefix}val/example<i>/mel``.

    Without such a logger only scalars are logged (said once, at setup, on rank zero).

    **Audio or latents** (``signal_type``): ``"audio"`` or ``"latent"``, or ``"auto"``: the module's
    ``signal_type`` attribute when it has one, else ``"audio"`` when a sample rate is known (the ``sample_rate``
    argument or ``pl_module.sample_rate``), else ``"latent"`` (with an info message). Latents get no media and no
    clip fraction. The sample rate is the argument when given, else ``pl_module.sample_rate``.

    Every logged value is also traced into ``self.event_log`` (``"train/snr"``, ``"val/rms_ratio"``,
    ``"val/rms_ratio/dataloader_idx_1"``, ``"test/si_snr"``, ...) for
    :class:`~lightning_stability.callbacks.StabilityReport`.

    Args:
        train_every_n_steps: measure a training batch every this many optimizer steps; 0 disables training metrics.
        prefix: key prefix, prepended as is (``"signal/"`` gives ``signal/val/snr``).
        sample_rate: audio sample rate in Hz for media; default ``pl_module.sample_rate`` (a module that has one must
            agree with it: RuntimeError at setup otherwise).
        num_media_examples: series logged as media per validation epoch (0 disables media).
        clip_level: clipping threshold for ``clip_fraction`` (full scale 1.0).
        log_media: log audio and spectrograms when a media-capable logger is attached.
        signal_type: ``"auto"``, ``"audio"`` or ``"latent"`` (see above).
        media_every_n_epochs: log media every this many validation epochs.
        n_mels: mel bins of the spectrogram images.
        preds_key: the output key of the model's signal.
        target_key: the output key of the reference signal.
        mask_key: the output key of an optional validity mask ``[B, T]`` (True = a real frame, False = padding). When
            the step returns one (not None), every metric is computed over each item's valid frames only (the
            items are measured one by one, so masked batches cost a Python loop over the batch). None ignores masks.

    Raises:
        TypeError: an argument of the wrong type (at construction).
        ValueError: an argument's value is out of range (at construction).
        RuntimeError: at setup, when media are requested for audio with a media-capable logger but no sample rate is
            known, or the module's ``sample_rate``/``signal_type`` attribute is invalid; at the first step, when the
            step output lacks ``preds_key``/``target_key`` (listing the keys it had).
        ValueError: at a step, when ``preds`` and ``target`` shapes differ (both shapes named), are not 2-D/3-D, or
            the mask is not ``[B, T]``.
    """

    def __init__(
        self,
        *,
        train_every_n_steps: int = 50,
        prefix: str = "signal/",
        sample_rate: int | None = None,
        num_media_examples: int = 2,
        clip_level: float = 1.0,
        log_media: bool = True,
        signal_type: SignalType = "auto",
        media_every_n_epochs: int = 1,
        n_mels: int = 80,
        preds_key: str = "preds",
        target_key: str = "target",
        mask_key: str | None = "mask",
    ) -> None:
        check_int("train_every_n_steps", train_every_n_steps, 0)
        check_int("num_media_examples", num_media_examples, 0)
        check_int("media_every_n_epochs", media_every_n_epochs, 1)
        check_int("n_mels", n_mels, 1)
        if sample_rate is not None:
            check_int("sample_rate", sample_rate, 1)
        if not isinstance(prefix, str):
            raise TypeError(f"`prefix` must be a string, got {prefix!r}")
        clip_level = check_positive("clip_level", clip_level)
        check_bool("log_media", log_media)
        check_choice("signal_type", signal_type, _SIGNAL_TYPES)
        check_str("preds_key", preds_key)
        check_str("target_key", target_key)
        check_str("mask_key", mask_key, allow_none=True)
        if preds_key == target_key:
            raise ValueError(f"`preds_key` and `target_key` must differ, got {preds_key!r} for both")

        self.train_every_n_steps = train_every_n_steps
        self.prefix = prefix
        self.sample_rate = sample_rate
        self.num_media_examples = num_media_examples
        self.clip_level = clip_level
        self.log_media = log_media
        self.signal_type = signal_type
        self.media_every_n_epochs = media_every_n_epochs
        self.n_mels = n_mels
        self.preds_key = preds_key
        self.target_key = target_key
        self.mask_key = mask_key

        self.event_log = EventLog(source=self.state_key)
        self._resolved_type: str | None = None
        self._resolved_rate: int | None = None
        self._media_loggers: list[Logger] = []
        # "train", and per evaluation stage and dataloader "val/0", "val/1", "test/0", ... (created on first use)
        self._metrics: dict[str, dict[str, Metric]] = {}
        self._ready = False
        self._keys: tuple[str, ...] = _AUDIO_KEYS
        self._train_checked = False
        self._last_train_step = -1
        self._batch_step = 0
        self._updated: set[str] = set()  # the evaluation metric sets updated this epoch
        self._val_epochs = 0
        self._examples: list[tuple[Tensor, Tensor]] = []

    @property
    @override
    def state_key(self) -> str:
        return cached_state_key(self, prefix=self.prefix, preds_key=self.preds_key, target_key=self.target_key)

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and begin_fit(self, pl_module) is not None:  # a reused monitor: this fit's events only
            self.event_log.reset()
            self._batch_step = self._val_updates = self._val_epochs = 0
        module_rate = getattr(pl_module, "sample_rate", None)
        rate = self.sample_rate if self.sample_rate is not None else module_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise RuntimeError(f"`{type(pl_module).__name__}.sample_rate` must be a positive number, got {rate!r}")
        if (
            self.sample_rate is not None
            and isinstance(module_rate, (int, float))
            and not isinstance(module_rate, bool)
            and module_rate != self.sample_rate
        ):
            # logged audio and mel spectrograms at the wrong rate play at the wrong speed and pitch: refuse it
            raise RuntimeError(
                f"SignalMonitor(`sample_rate`={self.sample_rate}) disagrees with"
                f" `{type(pl_module).__name__}.sample_rate`={module_rate}; pass sample_rate={module_rate} or leave it"
                " None to use the module's"
            )
        self._resolved_rate = None if rate is None else int(rate)
        self._resolved_type = self._resolve_type(pl_module)

        self._media_loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]
        wants_media = self.log_media and self.num_media_examples > 0 and self._resolved_type == "audio"
        if wants_media and self._media_loggers and self._resolved_rate is None:
            raise RuntimeError(
                "SignalMonitor: media logging is requested for audio but no sample rate is known: pass "
                f"`SignalMonitor(sample_rate=...)` or give `{type(pl_module).__name__}` a `sample_rate` attribute "
                "(or set `log_media=False`)"
            )
        if wants_media and not self._media_loggers:
            rank_zero_info(
                "SignalMonitor: no WandbLogger or TensorBoardLogger attached; logging signal scalars only (no audio "
                "or spectrogram media)."
            )
        if not wants_media:
            self._media_loggers = []

        self._keys = _AUDIO_KEYS if self._resolved_type == "audio" else _LATENT_KEYS
        self._metrics = {"train": self._make_metrics()}
        self._ready = True

    def _resolve_type(self, pl_module: pl.LightningModule) -> str:
        if self.signal_type != "auto":
            return self.signal_type
        declared = getattr(pl_module, "signal_type", None)
        if declared is not None:
            if declared not in ("audio", "latent"):
                raise RuntimeError(
                    f"`{type(pl_module).__name__}.signal_type` must be 'audio' or 'latent', got {declared!r}"
                )
            return declared
        if self._resolved_rate is not None:
            return "audio"
        rank_zero_info(
            f"SignalMonitor: `{type(pl_module).__name__}` has no `sample_rate` or `signal_type`, so its "
            f"'{self.preds_key}'/'{self.target_key}' are treated as latents (no media, no clip fraction). Pass "
            "`signal_type='audio', sample_rate=...` for audio."
        )
        return "latent"

    def _make_metrics(self) -> dict[str, Metric]:
        return {
            "snr": SignalNoiseRatio(),
            "si_snr": ScaleInvariantSignalNoiseRatio(),
            "rms_ratio": RMSRatio(),
            "dc_offset": DCOffset(),
            "peak": PeakAmplitude(clip_level=self.clip_level),
        }

    # ---------------------------------------------------------------------------------------------- training
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step  # the step this batch belongs to, as `training_step` sees it

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking or not self._ready:
            return
        n = self.train_every_n_steps
        if n == 0:
            return  # training metrics disabled: training_step need not return the signal pair
        if not self._train_checked:  # a wrong output is an error at the first step, not at step N
            self._extract_pair(outputs, "training_step")
            self._train_checked = True
        step = self._batch_step
        if step % n or step == self._last_train_step:
            return
        if pl_module.automatic_optimization and trainer.global_step == step:
            return  # a micro-batch of gradient accumulation; measure the one that completes the step
        self._last_train_step = step
        preds, target, mask = self._extract_pair(outputs, "training_step")
        self._update(self._metrics["train"], preds, target, mask)
        values = self._compute(self._metrics["train"])
        self._record("train", step, values)
        log_scalars(trainer, {f"{self.prefix}train/{k}": v for k, v in values.items()}, step=step)

    # ------------------------------------------------------------------------------------ validation and test
    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_start("val")
        self._examples = []

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_epoch_start("test")

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not self._ready:
            return
        preds, target, mask = self._eval_batch_end("val", dataloader_idx, outputs, "validation_step")
        if self._media_due(trainer) and len(self._examples) < self.num_media_examples:
            take = self.num_media_examples - len(self._examples)
            for i in range(min(take, preds.shape[0])):
                p, t = preds[i].cpu(), target[i].cpu()
                if mask is not None:
                    valid = mask[i].cpu()
                    p, t = p[:, valid], t[:, valid]
                self._examples.append((t, p))

    @override
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._ready:
            self._eval_batch_end("test", dataloader_idx, outputs, "test_step")

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._ready:
            return
        logged = self._eval_epoch_end("val", trainer, pl_module)
        if logged and self._media_due(trainer) and self._examples and trainer.is_global_zero:
            self._log_media(trainer.global_step)
        self._examples = []
        if logged:
            self._val_epochs += 1

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._ready:
            self._eval_epoch_end("test", trainer, pl_module)

    def _eval_epoch_start(self, stage: str) -> None:
        for name, metrics in self._metrics.items():
            if name.startswith(f"{stage}/"):
                for metric in metrics.values():
                    metric.reset()
        self._updated = {name for name in self._updated if not name.startswith(f"{stage}/")}

    def _eval_batch_end(
        self, stage: str, dataloader_idx: int, outputs: Any, hook: str
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        preds, target, mask = self._extract_pair(outputs, hook)
        name = f"{stage}/{dataloader_idx}"
        if name not in self._metrics:
            self._metrics[name] = self._make_metrics()
        self._update(self._metrics[name], preds, target, mask)
        self._updated.add(name)
        return preds, target, mask

    def _eval_epoch_end(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Compute and log each dataloader's epoch values: ``{prefix}<stage>/<key>`` with one loader,
        ``{prefix}<stage>/<key>/dataloader_idx_<i>`` with several (Lightning's names for ``self.log``). Returns
        whether anything was logged."""
        batches = trainer.num_test_batches if stage == "test" else trainer.num_val_batches
        several = len(batches) > 1
        names = sorted((n for n in self._updated if n.startswith(f"{stage}/")), key=lambda n: int(n.split("/")[1]))
        step = trainer.global_step
        for name in names:
            suffix = f"/dataloader_idx_{name.split('/')[1]}" if several else ""
            values = self._compute(self._metrics[name])
            self._record(stage, step, values, suffix)
            for key, value in values.items():
                pl_module.log(
                    f"{self.prefix}{stage}/{key}{suffix}",
                    value,
                    on_step=False,
                    on_epoch=True,
                    sync_dist=True,
                    add_dataloader_idx=False,
                )
        self._updated -= set(names)
        return bool(names)

    def _media_due(self, trainer: pl.Trainer) -> bool:
        return (
            bool(self._media_loggers) and trainer.is_global_zero and self._val_epochs % self.media_every_n_epochs == 0
        )

    # ------------------------------------------------------------------------------------------------ helpers
    def _extract_pair(self, outputs: Any, hook: str) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(preds, target, mask)``: detached float32 ``[B, C, T]`` and a bool ``[B, T]`` mask or None; or a clear
        error about what the step returned."""
        wanted = f"'{self.preds_key}' and '{self.target_key}'"
        if outputs is None:
            raise RuntimeError(
                f"SignalMonitor needs `{hook}` to return a dict with {wanted} (the loss-dict protocol), but it "
                "returned None"
            )
        if only_the_loss(outputs):
            raise RuntimeError(f"SignalMonitor needs {wanted} from `{hook}`, but {only_the_loss_message(hook)}")
        if not isinstance(outputs, Mapping):
            raise RuntimeError(
                f"SignalMonitor needs `{hook}` to return a dict with {wanted}, but it returned {type(outputs).__name__}"
            )
        missing = [k for k in (self.preds_key, self.target_key) if k not in outputs]
        if missing:
            raise RuntimeError(
                f"SignalMonitor needs `{hook}` to return a dict with {wanted}; it is missing "
                f"{', '.join(repr(k) for k in missing)} (keys returned: {sorted(map(str, outputs))})"
            )
        pair = []
        for key in (self.preds_key, self.target_key):
            value = outputs[key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                what = f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
                raise TypeError(f"SignalMonitor: `{hook}` output {key!r} must be a float tensor, got {what}")
            pair.append(value)
        preds, target = pair
        if preds.shape != target.shape:
            raise ValueError(
                f"SignalMonitor: `{hook}` returned {self.preds_key!r} of shape {tuple(preds.shape)} and "
                f"{self.target_key!r} of shape {tuple(target.shape)}; they must have the same shape"
            )
        if preds.ndim not in (2, 3):
            raise ValueError(
                f"SignalMonitor: `{hook}` returned {self.preds_key!r}/{self.target_key!r} of shape "
                f"{tuple(preds.shape)}; expected [B, C, T] (audio), [B, D, T] (latents) or [B, T]"
            )
        if preds.ndim == 2:
            preds, target = preds.unsqueeze(1), target.unsqueeze(1)
        mask = outputs.get(self.mask_key) if self.mask_key is not None else None
        if mask is not None:
            batch, time = preds.shape[0], preds.shape[-1]
            if not isinstance(mask, Tensor) or mask.shape != (batch, time) or mask.is_floating_point():
                got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, Tensor) else repr(mask)
                raise ValueError(
                    f"SignalMonitor: `{hook}` output {self.mask_key!r} must be a bool/int tensor of shape [B, T] = "
                    f"{(batch, time)} (True = valid frame), got {got}"
                )
            mask = mask.detach().to(device=preds.device, dtype=torch.bool)
        return preds.detach().float(), target.detach().float(), mask

    @torch.no_grad()
    def _update(self, metrics: dict[str, Metric], preds: Tensor, target: Tensor, mask: Tensor | None) -> None:
        """Add a batch; with a mask, each item's valid frames only (one update per item, exact for every metric)."""
        for metric in metrics.values():
            metric.to(preds.device)
        if mask is None:
            for metric in metrics.values():
                metric.update(preds, target)
            return
        for p, t, valid in zip(preds, target, mask):
            if not bool(valid.any()):
                continue  # an all-padding item has no signal to measure
            p, t = p[:, valid].unsqueeze(0), t[:, valid].unsqueeze(0)  # [1, C, T_valid]
            for metric in metrics.values():
                metric.update(p, t)

    def _compute(self, metrics: dict[str, Metric]) -> dict[str, float]:
        """Compute (reducing states across ranks), reset, and return the scalars in logging order."""
        with torch.no_grad():
            raw: dict[str, Tensor] = {}
            for name, metric in metrics.items():
                result = metric.compute()
                if isinstance(result, dict):
                    raw.update(result)
                else:
                    raw[name] = result
                metric.reset()
        return {key: float(raw[key]) for key in self._keys}

    def _record(self, stage: str, step: int, values: dict[str, float], suffix: str = "") -> None:
        for key, value in values.items():
            self.event_log.trace(f"{stage}/{key}{suffix}", step, value)

    def _log_media(self, step: int) -> None:
        from lightning_stability.callbacks._report_plot import render_mel_pair

        rate = self._resolved_rate
        assert rate is not None  # checked in setup
        audios, captions, images, image_captions = [], [], [], []
        for i, (target, preds) in enumerate(self._examples):
            for name, signal in (("target", target), ("reconstruction", preds)):
                audios.append(_to_numpy_audio(signal))
                captions.append(f"example {i} {name} (step {step})")
            images.append(
                render_mel_pair(
                    target.mean(0), preds.mean(0), rate, title=f"example {i}, step {step}", n_mels=self.n_mels
                )
            )
            image_captions.append(f"example {i}: target (top) / reconstruction (bottom)")
        for logger in self._media_loggers:
            if isinstance(logger, WandbLogger):
                logger.log_audio(
                    f"{self.prefix}val/audio", audios, step=step, sample_rate=[rate] * len(audios), caption=captions
                )
                logger.log_image(f"{self.prefix}val/mel", images, step=step, caption=image_captions)
            else:
                writer = logger.experiment
                for i, image in enumerate(images):
                    base = f"{self.prefix}val/example{i}"
                    writer.add_audio(f"{base}/target", _mono(audios[2 * i]), step, sample_rate=rate)
                    writer.add_audio(f"{base}/reconstruction", _mono(audios[2 * i + 1]), step, sample_rate=rate)
                    writer.add_image(f"{base}/mel", image, step, dataformats="HWC")

    # ---------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"event_log": self.event_log.state_dict(), "val_epochs": self._val_epochs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.event_log.load_state_dict(state_dict["event_log"])
        self._val_epochs = int(state_dict["val_epochs"])


def _to_numpy_audio(signal: Tensor):
    """``[C, T]`` float tensor -> ``[T, C]`` float32 numpy with non-finite samples zeroed (soundfile layout)."""
    return torch.nan_to_num(signal.float(), nan=0.0, posinf=0.0, neginf=0.0).T.contiguous().numpy()


def _mono(audio) -> Tensor:
    return torch.from_numpy(audio).mean(dim=1, keepdim=False).unsqueeze(0)  # [1, T] for add_audio
