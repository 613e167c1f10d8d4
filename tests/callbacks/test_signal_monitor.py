import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stability.callbacks import SignalMonitor
from tests._helpers_signal import RecordingLogger, read_wandb_history
from tests.helpers import FaultyModule, make_trainer, manual_optimization

SR = 8000


def _audio(n: int, t: int = 800, seed: int = 0) -> torch.Tensor:
    """Decaying sinusoids at random pitches, ``[n, 1, t]``."""
    g = torch.Generator().manual_seed(seed)
    time = torch.arange(t) / SR
    freqs = 150 + 800 * torch.rand(n, 1, 1, generator=g)
    amp = 0.2 + 0.6 * torch.rand(n, 1, 1, generator=g)
    return amp * torch.sin(2 * math.pi * freqs * time) * torch.exp(-3 * time)


class AudioAE(pl.LightningModule):
    """Tiny audio model (a conv filter plus a learnable gain) following the signal-pair protocol."""

    def __init__(self, *, sample_rate: int | None = SR, bad_output: str | None = None, channels: int = 1) -> None:
        super().__init__()
        if sample_rate is not None:
            self.sample_rate = sample_rate
        self.net = nn.Conv1d(channels, channels, 9, padding=4)
        self.bad_output = bad_output
        self.channels = channels
        self.train_pairs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.val_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def step(self, batch):
        (audio,) = batch
        preds = 1.5 * self.net(audio)
        loss = (preds - audio).abs().mean()
        if self.bad_output == "tensor":
            return loss
        if self.bad_output == "no_target":
            return {"loss": loss, "preds": preds, "audio": audio}
        if self.bad_output == "shape":
            return {"loss": loss, "preds": preds, "target": audio[..., :-1]}
        return {"loss": loss, "preds": preds, "target": audio}

    def training_step(self, batch, batch_idx):
        out = self.step(batch)
        if isinstance(out, dict):
            self.train_pairs[self.global_step] = (out["preds"].detach().clone(), batch[0].clone())
        return out

    def validation_step(self, batch, batch_idx):
        out = self.step(batch)
        if isinstance(out, dict) and not self.trainer.sanity_checking:
            self.val_pairs.append((out["preds"].detach().clone(), batch[0].clone()))
        return out

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return DataLoader(TensorDataset(_audio(16, seed=0).repeat(1, self.channels, 1)), batch_size=4)

    def val_dataloader(self):
        return DataLoader(TensorDataset(_audio(6, seed=1).repeat(1, self.channels, 1)), batch_size=4)


def _hand(pairs):
    """Hand computation (numpy, float64) of every scalar over a list of (preds, target) batches."""
    p = [x.double().numpy() for x, _ in pairs]
    t = [y.double().numpy() for _, y in pairs]
    eps = np.finfo(np.float32).eps
    snr, si_snr = [], []
    for pb, tb in zip(p, t):
        for ps, ts in zip(pb.reshape(-1, pb.shape[-1]), tb.reshape(-1, tb.shape[-1])):
            snr.append(10 * np.log10(((ts**2).sum() + eps) / (((ts - ps) ** 2).sum() + eps)))
            alpha = ((ps - ps.mean()) * (ts - ts.mean())).sum() / (((ts - ts.mean()) ** 2).sum() + eps)
            s = alpha * (ts - ts.mean())
            e = (ps - ps.mean()) - s
            si_snr.append(10 * np.log10(((s**2).sum() + eps) / ((e**2).sum() + eps)))
    allp = np.concatenate([x.ravel() for x in p])
    allt = np.concatenate([x.ravel() for x in t])
    return {
        "snr": float(np.mean(snr)),
        "si_snr": float(np.mean(si_snr)),
        "rms_ratio": math.sqrt((allp**2).sum() / (allt**2).sum()),
        "peak": float(np.abs(allp).max()),
        "dc_offset": float(allp.mean()),
        "clip_fraction": float((np.abs(allp) >= 0.5).mean()),
    }


def _assert_close(got: dict, expected: dict, prefix: str):
    for key, value in expected.items():
        assert got[f"{prefix}{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_training_and_validation_scalars_match_hand_computation(tmp_path):
    logger = RecordingLogger()
    monitor = SignalMonitor(train_every_n_steps=3, clip_level=0.5)
    module = AudioAE()
    trainer = make_trainer(
        tmp_path, [monitor], max_steps=7, logger=logger, limit_val_batches=1.0, val_check_interval=4, max_epochs=-1
    )
    trainer.fit(module)

    # training: the batches of steps 0, 3 and 6 (as training_step sees global_step), keys under signal/train/
    train_snr = logger.values("signal/train/snr")
    assert sorted(train_snr) == [0, 3, 6]
    for step in (0, 3, 6):
        row = next(r for s, r in logger.rows if s == step and "signal/train/snr" in r)
        _assert_close(row, _hand([module.train_pairs[step]]), "signal/train/")

    # validation: one aggregate over both validation batches of the epoch, in callback_metrics
    assert len(module.val_pairs) == 2
    expected = _hand(module.val_pairs)
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    _assert_close(got, expected, "signal/val/")
    # and in the event log for StabilityReport
    assert [s for s, _ in monitor.event_log.traces["train/rms_ratio"]] == [0, 3, 6]
    assert monitor.event_log.traces["val/snr"][0] == (4, pytest.approx(expected["snr"], rel=1e-4))


def test_bf16_mixed_fit_logs_finite_values(tmp_path):
    # (precision="16-mixed" falls back to bf16-mixed on CPU; the monitor measures in float32 either way)
    logger = RecordingLogger()
    trainer = make_trainer(
        tmp_path,
        [SignalMonitor(train_every_n_steps=2)],
        max_steps=4,
        logger=logger,
        precision="bf16-mixed",
        limit_val_batches=1.0,
        val_check_interval=4,
    )
    trainer.fit(AudioAE())
    train = logger.values("signal/train/si_snr")
    assert sorted(train) == [0, 2]
    assert all(math.isfinite(v) for v in train.values())
    assert math.isfinite(float(trainer.callback_metrics["signal/val/si_snr"]))


_ManualAE = manual_optimization(AudioAE)


def test_manual_optimization_is_measured_on_the_same_steps(tmp_path):
    logger = RecordingLogger()
    module = _ManualAE()
    monitor = SignalMonitor(train_every_n_steps=2, clip_level=0.5)
    make_trainer(tmp_path, [monitor], max_steps=4, logger=logger).fit(module)
    assert sorted(logger.values("signal/train/snr")) == [0, 2]
    row = next(r for s, r in logger.rows if s == 2 and "signal/train/snr" in r)
    _assert_close(row, _hand([module.train_pairs[2]]), "signal/train/")


def test_faulty_module_regression_outputs_are_latents_without_media_or_clip_fraction(tmp_path):
    logger = RecordingLogger()
    monitor = SignalMonitor(train_every_n_steps=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, logger=logger)
    trainer.fit(FaultyModule())  # preds/target are [B, 4]: no sample rate -> treated as latents
    row = next(r for s, r in logger.rows if "signal/train/snr" in r)
    assert "signal/train/clip_fraction" not in row
    assert set(row) == {f"signal/train/{k}" for k in ("snr", "si_snr", "rms_ratio", "peak", "dc_offset")}


def test_wandb_offline_run_holds_scalars_audio_and_spectrograms(tmp_path):
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="signal-monitor-test")
    monitor = SignalMonitor(train_every_n_steps=2, num_media_examples=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, logger=logger, limit_val_batches=1.0, val_check_interval=4)
    trainer.fit(AudioAE())
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()

    files = run_dir / "files"
    audio = sorted((files / "media" / "audio").rglob("*.wav"))
    images = sorted((files / "media" / "images").rglob("*.png"))
    assert len(audio) == 4  # 2 examples x (target, reconstruction)
    assert len(images) == 2
    import soundfile as sf

    info = sf.info(str(audio[0]))
    assert info.samplerate == SR
    assert info.frames == 800
    from PIL import Image

    with Image.open(images[0]) as img:
        assert img.size[0] > 200
        assert img.size[1] > 200

    rows = read_wandb_history(run_dir)
    keys = set().union(*rows)
    for stage in ("train", "val"):
        for name in ("snr", "si_snr", "rms_ratio", "peak", "dc_offset", "clip_fraction"):
            assert f"signal/{stage}/{name}" in keys, (stage, name)
    train_rows = [r for r in rows if "signal/train/snr" in r]
    assert [r["trainer/global_step"] for r in train_rows] == [0, 2]
    (audio_row,) = [r for r in rows if "signal/val/audio/_type" in r]
    assert audio_row["signal/val/audio/_type"] == "audio"
    assert audio_row["signal/val/audio/count"] == 4
    assert audio_row["signal/val/audio/sampleRates"] == [SR] * 4
    (mel_row,) = [r for r in rows if "signal/val/mel/_type" in r]
    assert mel_row["signal/val/mel/_type"] == "images/separated"
    assert mel_row["signal/val/mel/count"] == 2


class _RecordingWriter:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, tuple]] = []

    def add_audio(self, tag, snd_tensor, global_step=None, sample_rate=44100):
        self.calls.append(("audio", tag, (tuple(snd_tensor.shape), global_step, sample_rate)))

    def add_image(self, tag, img, global_step=None, dataformats="CHW"):
        self.calls.append(("image", tag, (img.shape, global_step, dataformats)))


class FakeTensorBoardLogger(TensorBoardLogger):
    """A TensorBoardLogger whose writer records calls (tensorboard itself need not be installed)."""

    def __init__(self, save_dir):
        import lightning.fabric.loggers.tensorboard as fabric_tb

        available = fabric_tb._TENSORBOARD_AVAILABLE
        fabric_tb._TENSORBOARD_AVAILABLE = True  # the constructor only checks that a backend exists
        try:
            super().__init__(save_dir)
        finally:
            fabric_tb._TENSORBOARD_AVAILABLE = available
        self.writer = _RecordingWriter()

    @property
    def experiment(self):
        return self.writer

    def log_metrics(self, metrics, step=None):
        return None

    def log_hyperparams(self, params, metrics=None):
        return None

    def finalize(self, status):
        return None

    def save(self):
        return None


def test_tensorboard_gets_mono_audio_and_hwc_images_every_n_epochs(tmp_path):
    logger = FakeTensorBoardLogger(tmp_path)
    monitor = SignalMonitor(num_media_examples=1, media_every_n_epochs=2)
    trainer = make_trainer(tmp_path, [monitor], max_steps=12, logger=logger, limit_val_batches=1.0, max_epochs=3)
    trainer.fit(AudioAE(channels=2))  # 4 steps per epoch, validation after epochs 1, 2, 3 -> media after 1 and 3
    calls = logger.writer.calls
    tags = {(kind, tag) for kind, tag, _ in calls}
    assert tags == {
        ("audio", "signal/val/example0/target"),
        ("audio", "signal/val/example0/reconstruction"),
        ("image", "signal/val/example0/mel"),
    }
    assert sorted({c[2][1] for c in calls}) == [4, 12]
    audio_shape, _, rate = next(c[2] for c in calls if c[0] == "audio")
    assert audio_shape == (1, 800)
    assert rate == SR
    image_shape, _, fmt = next(c[2] for c in calls if c[0] == "image")
    assert fmt == "HWC"
    assert image_shape[2] == 3


def test_without_media_logger_says_scalars_only_once(tmp_path, caplog):
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [SignalMonitor()], max_steps=1, logger=RecordingLogger()).fit(AudioAE())
    assert sum("logging signal scalars only" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize(
    ("bad_output", "error", "match"),
    [
        (
            "tensor",
            RuntimeError,
            r"needs 'preds' and 'target' from `training_step`, but `training_step` returned only the loss \(a bare "
            r"tensor.*\{'loss': total, 'losses': \{name: unweighted term, \.\.\.\}, 'preds': output, 'target'",
        ),
        ("no_target", RuntimeError, r"missing 'target' \(keys returned: \['audio', 'loss', 'preds'\]\)"),
        ("shape", ValueError, r"'preds' of shape \(4, 1, 800\) and 'target' of shape \(4, 1, 799\)"),
    ],
)
def test_bad_step_outputs_fail_at_the_first_step(tmp_path, bad_output, error, match):
    module = AudioAE(bad_output=bad_output)
    trainer = make_trainer(tmp_path, [SignalMonitor(train_every_n_steps=50)], max_steps=5)
    with pytest.raises(error, match=match):
        trainer.fit(module)
    assert trainer.global_step == 1


def test_training_outputs_are_not_required_when_training_metrics_are_off(tmp_path):
    class ValOnlyPairs(AudioAE):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)["loss"]

    monitor = SignalMonitor(train_every_n_steps=0)
    trainer = make_trainer(tmp_path, [monitor], max_steps=4, limit_val_batches=1.0, val_check_interval=4)
    trainer.fit(ValOnlyPairs())
    assert "signal/val/snr" in trainer.callback_metrics
    assert not any(name.startswith("train/") for name in monitor.event_log.traces)


def test_validation_step_returning_none_is_named(tmp_path):
    class NoValOutputs(AudioAE):
        def validation_step(self, batch, batch_idx):
            super().validation_step(batch, batch_idx)

    trainer = make_trainer(
        tmp_path, [SignalMonitor(train_every_n_steps=0)], max_steps=2, limit_val_batches=1.0, val_check_interval=2
    )
    with pytest.raises(RuntimeError, match=r"`validation_step` to return a dict with 'preds' and 'target'.*None"):
        trainer.fit(NoValOutputs())


def test_media_for_audio_without_sample_rate_is_a_setup_error(tmp_path):
    logger = FakeTensorBoardLogger(tmp_path)
    trainer = make_trainer(tmp_path, [SignalMonitor(signal_type="audio")], max_steps=1, logger=logger)
    with pytest.raises(RuntimeError, match=r"no sample rate.*`SignalMonitor\(sample_rate=...\)`.*`AudioAE`"):
        trainer.fit(AudioAE(sample_rate=None))
    # the argument supplies it
    trainer = make_trainer(tmp_path, [SignalMonitor(signal_type="audio", sample_rate=SR)], max_steps=1, logger=logger)
    trainer.fit(AudioAE(sample_rate=None))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"train_every_n_steps": -1}, ValueError, r"`train_every_n_steps` must be >= 0, got -1"),
        ({"train_every_n_steps": 2.5}, TypeError, r"`train_every_n_steps` must be an int, got 2.5"),
        ({"sample_rate": 0}, ValueError, r"`sample_rate` must be >= 1, got 0"),
        ({"clip_level": -1.0}, ValueError, r"`clip_level` must be a finite number > 0, got -1.0"),
        ({"signal_type": "video"}, ValueError, r"`signal_type` must be one of .*'video'"),
        ({"num_media_examples": -2}, ValueError, r"`num_media_examples` must be >= 0, got -2"),
        ({"media_every_n_epochs": 0}, ValueError, r"`media_every_n_epochs` must be >= 1, got 0"),
        ({"log_media": "yes"}, TypeError, r"`log_media` must be a bool, got 'yes'"),
        ({"preds_key": "x", "target_key": "x"}, ValueError, r"`preds_key` and `target_key` must differ"),
        ({"clip_level": "1"}, TypeError, r"`clip_level` must be a number, got '1'"),
        ({"sample_rate": 16000.0}, TypeError, r"`sample_rate` must be an int, got 16000.0"),
        ({"prefix": None}, TypeError, r"`prefix` must be a string, got None"),
        ({"preds_key": ""}, ValueError, r"`preds_key` must be a non-empty string, got ''"),
        ({"target_key": 3}, TypeError, r"`target_key` must be a non-empty string, got 3"),
        ({"mask_key": ""}, ValueError, r"`mask_key` must be a non-empty string or None, got ''"),
        ({"mask_key": 0}, TypeError, r"`mask_key` must be a non-empty string or None, got 0"),
    ],
)
def test_argument_errors_name_the_argument_and_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        SignalMonitor(**kwargs)


def test_state_key_lets_two_instances_coexist_and_state_round_trips(tmp_path):
    a, b = SignalMonitor(), SignalMonitor(prefix="audio_health/")
    assert a.state_key != b.state_key
    assert a.state_key == "SignalMonitor{'prefix': 'signal/', 'preds_key': 'preds', 'target_key': 'target'}"
    trainer = make_trainer(tmp_path, [a, b], max_steps=4, limit_val_batches=1.0, val_check_interval=4)
    trainer.fit(AudioAE())
    assert float(trainer.callback_metrics["signal/val/snr"]) == float(trainer.callback_metrics["audio_health/val/snr"])
    c = SignalMonitor()
    c.load_state_dict(a.state_dict())
    assert c.event_log.traces == a.event_log.traces
    assert c.state_dict() == a.state_dict()


class _DDPAudioAE(AudioAE):
    """Writes what each rank saw (its signal pairs) and what it logged, for the main process to check."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def on_fit_end(self):
        monitor = next(cb for cb in self.trainer.callbacks if isinstance(cb, SignalMonitor))
        torch.save(
            {
                "train_pairs": self.train_pairs,
                "val_pairs": self.val_pairs,
                "callback_metrics": {k: float(v) for k, v in self.trainer.callback_metrics.items()},
                "traces": monitor.event_log.traces,
            },
            f"{self.out_dir}/rank{self.global_rank}.pt",
        )


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_values_are_over_both_ranks_and_the_report_is_written_once(tmp_path):
    from lightning_stability.callbacks import StabilityReport

    monitor = SignalMonitor(train_every_n_steps=2, clip_level=0.5)
    report = StabilityReport(dirpath=tmp_path / "report")
    trainer = make_trainer(
        tmp_path, [monitor, report], devices=2, strategy="ddp_spawn", max_steps=2, limit_val_batches=1.0, max_epochs=1
    )
    trainer.fit(_DDPAudioAE(str(tmp_path)))

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(len(r["val_pairs"]) == 1 for r in ranks)  # 6 validation items, 3 per rank
    expected_val = _hand([r["val_pairs"][0] for r in ranks])
    expected_train = _hand([r["train_pairs"][0] for r in ranks])
    for r in ranks:
        _assert_close(r["callback_metrics"], expected_val, "signal/val/")
        trained = {f"signal/train/{k[6:]}": v for k, ((_, v),) in r["traces"].items() if k.startswith("train/")}
        _assert_close(trained, expected_train, "signal/train/")
    # differs from rank 0 alone, so the reduction is what made them equal
    assert _hand(ranks[0]["val_pairs"])["rms_ratio"] != pytest.approx(expected_val["rms_ratio"], rel=1e-3)
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["stability_report.json", "stability_report.png"]


class _PaddedAE(AudioAE):
    """Returns a padding mask; the padded frames of preds hold garbage that must not reach the metrics."""

    def step(self, batch):
        out = super().step(batch)
        (audio,) = batch
        lengths = torch.tensor([800, 500, 640, 300])[: audio.shape[0]]
        mask = torch.arange(audio.shape[-1])[None, :] < lengths[:, None]  # [B, T]
        out["preds"] = torch.where(mask[:, None, :], out["preds"], torch.full_like(out["preds"], 100.0))
        out["mask"] = mask
        return out


def test_masked_frames_are_left_out_of_every_metric(tmp_path):
    logger = RecordingLogger()
    module = _PaddedAE()
    make_trainer(tmp_path, [SignalMonitor(train_every_n_steps=2, clip_level=0.5)], max_steps=1, logger=logger).fit(
        module
    )
    preds, target = module.train_pairs[0]
    lengths = [800, 500, 640, 300]
    row = next(r for s, r in logger.rows if s == 0 and "signal/train/snr" in r)
    # the hand computation over each item's valid frames (SNR/SI-SNR per item, the rest pooled)
    expected = _hand([(preds[i : i + 1, :, : lengths[i]], target[i : i + 1, :, : lengths[i]]) for i in range(4)])
    _assert_close(row, expected, "signal/train/")
    assert row["signal/train/peak"] < 100.0


def test_a_mask_of_the_wrong_shape_is_named(tmp_path):
    class BadMask(AudioAE):
        def step(self, batch):
            out = super().step(batch)
            out["mask"] = torch.ones(4, 10, dtype=torch.bool)
            return out

    trainer = make_trainer(tmp_path, [SignalMonitor()], max_steps=1)
    with pytest.raises(ValueError, match=r"'mask' must be a bool/int tensor of shape \[B, T\] = \(4, 800\).*\(4, 10\)"):
        trainer.fit(BadMask())


class _SpeechAE(pl.LightningModule):
    """A tiny conv autoencoder on real (eSpeak NG) speech batches ``[B, 1, T]``."""

    def __init__(self, sample_rate: int) -> None:
        super().__init__()
        self.sample_rate = sample_rate
        self.net = nn.Sequential(nn.Conv1d(1, 8, 15, padding=7), nn.Tanh(), nn.Conv1d(8, 1, 15, padding=7))

    def step(self, audio):
        preds = self.net(audio)
        return {"loss": (preds - audio).abs().mean(), "preds": preds, "target": audio}

    def training_step(self, batch, batch_idx):
        return self.step(batch)

    def validation_step(self, batch, batch_idx):
        return self.step(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


@pytest.mark.slow
def test_real_speech_run_logs_audible_examples_and_a_report(tmp_path):
    import soundfile as sf

    from lightning_stability.callbacks import StabilityReport
    from lightning_stability.data import SpeechCorpusDataModule

    data = SpeechCorpusDataModule(
        tmp_path / "corpus", num_utterances=12, num_voices=2, sample_rate=16000, segment_seconds=0.5, batch_size=4
    )
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="speech")
    callbacks = [SignalMonitor(train_every_n_steps=5), StabilityReport()]
    trainer = make_trainer(tmp_path, callbacks, max_steps=20, logger=logger, limit_val_batches=1.0, max_epochs=-1)
    trainer.fit(_SpeechAE(16000), datamodule=data)
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()

    wavs = sorted((run_dir / "files" / "media" / "audio").rglob("*.wav"))
    assert wavs
    for wav in wavs:
        audio, rate = sf.read(str(wav))
        assert rate == 16000
        assert len(audio) == 8000
    targets = [sf.read(str(w))[0] for w in wavs]
    assert max(float(np.sqrt(np.mean(a**2))) for a in targets) > 1e-3  # speech, not silence
    report = json.loads((tmp_path / "stability_report.json").read_text())
    loss = [v for _, v in report["loss"]]
    assert len(loss) == 20
    assert loss[-1] < loss[0]  # the tiny model learns something on real speech
    assert "SNR / SI-SNR" in report["panels"]


# ---------------------------------------------------------------------------------------------- several loaders, test
class TwoLoaderAE(AudioAE):
    """Two evaluation loaders with clearly different signals: decaying tones (loader 0) and white noise (loader 1),
    which the model's 9-tap filter reproduces very differently. ``test_step`` follows the same protocol."""

    def __init__(self, *, n_loaders: int = 2) -> None:
        super().__init__()
        self.n_loaders = n_loaders
        self.pairs: dict[tuple[str, int], list] = {}

    def _eval(self, stage, batch, dataloader_idx):
        out = self.step(batch)
        if not self.trainer.sanity_checking:
            self.pairs.setdefault((stage, dataloader_idx), []).append((out["preds"].detach().clone(), batch[0].clone()))
        return out

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return self._eval("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx=0):
        return self._eval("test", batch, dataloader_idx)

    def _loaders(self):
        tones = DataLoader(TensorDataset(_audio(6, seed=1)), batch_size=4)
        noise = DataLoader(TensorDataset(0.3 * torch.randn(5, 1, 800, generator=torch.Generator().manual_seed(3))))
        return [tones, noise][: self.n_loaders]

    def val_dataloader(self):
        return self._loaders()

    def test_dataloader(self):
        return self._loaders()


def test_two_validation_loaders_are_measured_apart_with_lightnings_names(tmp_path):
    monitor = SignalMonitor(train_every_n_steps=0, clip_level=0.5)
    module = TwoLoaderAE()
    trainer = make_trainer(tmp_path, [monitor], max_steps=2, limit_val_batches=1.0, val_check_interval=2)
    trainer.fit(module)
    got = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert "signal/val/si_snr" not in got  # no merged number
    tones, noise = _hand(module.pairs["val", 0]), _hand(module.pairs["val", 1])
    _assert_close({k.removesuffix("/dataloader_idx_0"): v for k, v in got.items()}, tones, "signal/val/")
    _assert_close({k.removesuffix("/dataloader_idx_1"): v for k, v in got.items()}, noise, "signal/val/")
    # the loaders really differ, and neither is the merged value
    merged = _hand(module.pairs["val", 0] + module.pairs["val", 1])
    assert abs(tones["si_snr"] - noise["si_snr"]) > 3
    for key in ("signal/val/si_snr/dataloader_idx_0", "signal/val/si_snr/dataloader_idx_1"):
        assert abs(got[key] - merged["si_snr"]) > 1
    # the event log carries the same names (without the prefix) for StabilityReport
    (point,) = monitor.event_log.traces["val/rms_ratio/dataloader_idx_1"]
    assert point == (2, pytest.approx(noise["rms_ratio"], rel=1e-4))
    assert "val/rms_ratio" not in monitor.event_log.traces


def test_trainer_test_logs_the_signal_test_family(tmp_path):
    monitor = SignalMonitor(clip_level=0.5)
    module = TwoLoaderAE(n_loaders=1)
    trainer = make_trainer(tmp_path, [monitor], limit_test_batches=1.0)
    (result,) = trainer.test(module)
    expected = _hand(module.pairs["test", 0])
    _assert_close({k: float(v) for k, v in result.items()}, expected, "signal/test/")
    assert not any(k.startswith("signal/val/") for k in result)
    assert monitor.event_log.traces["test/si_snr"] == [(0, pytest.approx(expected["si_snr"], rel=1e-4))]


def test_trainer_test_with_two_loaders_reports_each(tmp_path):
    monitor = SignalMonitor(clip_level=0.5)
    module = TwoLoaderAE()
    trainer = make_trainer(tmp_path, [monitor], limit_test_batches=1.0)
    results = trainer.test(module)
    for idx, result in enumerate(results):
        expected = _hand(module.pairs["test", idx])
        key = f"signal/test/si_snr/dataloader_idx_{idx}"
        assert result[key] == pytest.approx(expected["si_snr"], rel=1e-4, abs=1e-5)
    assert results[0]["signal/test/si_snr/dataloader_idx_0"] != pytest.approx(
        results[1]["signal/test/si_snr/dataloader_idx_1"], abs=3
    )


def test_the_report_plots_each_loaders_signal_metrics(tmp_path):
    from lightning_stability.callbacks import StabilityReport

    report = StabilityReport(dirpath=tmp_path)
    monitor = SignalMonitor(train_every_n_steps=0)  # only the per-loader validation traces
    trainer = make_trainer(tmp_path, [monitor, report], max_steps=2, limit_val_batches=1.0, val_check_interval=2)
    trainer.fit(TwoLoaderAE())
    panels = report.last_report["panels"]
    assert "SNR / SI-SNR" in panels
    assert "RMS ratio (output / target)" in panels
    assert "Scale factors" not in panels


def test_a_validation_step_returning_a_bare_loss_is_named(tmp_path):
    class BareValidation(AudioAE):
        def validation_step(self, batch, batch_idx):
            return self.step(batch)["loss"]

    trainer = make_trainer(
        tmp_path, [SignalMonitor(train_every_n_steps=0)], max_steps=2, limit_val_batches=1.0, val_check_interval=2
    )
    with pytest.raises(RuntimeError, match=r"`validation_step` returned only the loss \(a bare tensor.*'preds': out"):
        trainer.fit(BareValidation())
