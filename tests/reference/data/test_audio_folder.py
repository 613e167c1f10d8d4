"""AudioFolderDataModule (and the shared helpers of ``data/_audio.py``) on real files written with soundfile."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
import torch

from lightning_stability.reference.data import AudioFolderDataModule
from lightning_stability.reference.data._audio import (
    AudioFileError,
    EpochShuffleSampler,
    integrated_loudness,
    k_weighting,
)
from tests.helpers import make_trainer

SR = 24000


def tone(freq: float, seconds: float, rate: int, amp: float = 0.3, phase: float = 0.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)


def noise(seconds: float, rate: int, amp: float, seed: int) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(round(seconds * rate))).clip(-1, 1).astype(np.float32)


def write(path: Path, data: np.ndarray, rate: int, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, **kw)
    return path


def speechlike(seconds: float, rate: int, seed: int, amp: float = 0.1) -> np.ndarray:
    """Amplitude-modulated noise with pauses (syllable-like bursts), so loudness gating matters."""
    x = noise(seconds, rate, amp, seed)
    t = np.arange(x.shape[0]) / rate
    envelope = np.clip(np.sin(2 * np.pi * 3.0 * t), 0, None) ** 2
    return (x * envelope).astype(np.float32)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Ten good files in several formats/rates/channel layouts, in nested folders."""
    root = tmp_path / "audio"
    write(root / "int16_44k_stereo.wav", np.stack([tone(440, 1.5, 44100), tone(660, 1.5, 44100)], 1), 44100,
          subtype="PCM_16")  # fmt: skip
    write(root / "float32_16k.wav", tone(300, 1.2, 16000), 16000, subtype="FLOAT")
    write(root / "nested" / "deeper" / "clip.flac", noise(1.0, 24000, 0.1, 1), 24000)
    write(root / "nested" / "clip.ogg", tone(500, 1.0, 22050, 0.2), 22050)
    write(root / "UPPER.WAV", noise(0.8, 24000, 0.05, 2), 24000, subtype="PCM_16")
    for i in range(5):
        write(root / f"speech_{i}.wav", speechlike(1.3, 24000, 10 + i, 0.03 * (i + 1)), 24000, subtype="PCM_16")
    (root / "notes.txt").write_text("not audio")
    write(root / ".hidden" / "x.wav", tone(100, 0.5, 24000), 24000)  # hidden folders are ignored
    return root


def make(root: Path, **kw) -> AudioFolderDataModule:
    kw.setdefault("segment_seconds", 0.5)
    kw.setdefault("batch_size", 4)
    return AudioFolderDataModule(root, **kw)


# ------------------------------------------------------------------------------------------------ scanning


def test_scans_all_formats_recursively_and_batches_are_b1t_float32(folder: Path):
    dm = make(folder, val_fraction=0.2)
    dm.setup("fit")
    names = sorted(c.path.name for c in dm.clips("train") + dm.clips("val"))
    assert names == sorted(
        ["int16_44k_stereo.wav", "float32_16k.wav", "clip.flac", "clip.ogg", "UPPER.WAV"]
        + [f"speech_{i}.wav" for i in range(5)]
    )
    assert len(dm.clips("val")) == 2  # ceil(0.2 * 10)
    batches = list(dm.train_dataloader())
    assert [b.shape[0] for b in batches] == [4, 4]
    for batch in batches + list(dm.val_dataloader()):
        assert batch.dtype == torch.float32
        assert batch.shape[1:] == (1, round(0.5 * SR))
        assert torch.isfinite(batch).all()


def test_resampling_keeps_frequency_and_length(tmp_path: Path):
    for rate in (44100, 16000):
        write(tmp_path / f"r{rate}" / "a.wav", tone(440, 1.0, rate), rate, subtype="FLOAT")
        dm = make(tmp_path / f"r{rate}", val_fraction=0.0, segment_seconds=2.0)
        dm.setup("fit")
        clip = dm.clips("train")[0]
        assert clip.sample_rate == rate
        assert clip.frames_at(SR) == SR  # exactly 1 s at 24 kHz
        item = dm.train_dataset[0][0]
        assert item.shape == (2 * SR,)
        assert torch.all(item[SR:] == 0)  # zero-padded tail of a 1 s clip in a 2 s crop
        spectrum = torch.fft.rfft(item[:SR] * torch.hann_window(SR))
        peak_hz = float(spectrum.abs().argmax()) * SR / SR  # 1 Hz bins for a 1 s window
        assert peak_hz == pytest.approx(440, abs=1)
        assert float(item[: SR // 2].abs().max()) == pytest.approx(0.3, rel=0.02)  # amplitude survives resampling


def test_stereo_is_averaged_to_mono(tmp_path: Path):
    left, right = tone(440, 0.5, SR, 0.4), noise(0.5, SR, 0.1, 3)
    write(tmp_path / "s" / "st.wav", np.stack([left, right], 1), SR, subtype="FLOAT")
    dm = make(tmp_path / "s", val_fraction=0.0, segment_seconds=0.5)
    dm.setup("fit")
    assert dm.clips("train")[0].channels == 2
    out = dm.train_dataset[0][0].numpy()
    np.testing.assert_allclose(out, (left + right) / 2, rtol=0, atol=1e-7)


def test_short_clip_is_zero_padded(tmp_path: Path):
    clip = noise(0.1, SR, 0.2, 4)
    write(tmp_path / "short" / "a.wav", clip, SR, subtype="FLOAT")
    dm = make(tmp_path / "short", val_fraction=0.0, segment_seconds=0.5)
    dm.setup("fit")
    for key in (0, (0, 0), (0, 7)):
        item = dm.train_dataset[key][0]
        np.testing.assert_array_equal(item[: clip.shape[0]].numpy(), clip)
        assert torch.count_nonzero(item[clip.shape[0] :]) == 0


def test_min_seconds_drops_short_clips(folder: Path):
    write(folder / "tiny.wav", noise(0.05, SR, 0.1, 5), SR)
    dm = make(folder, val_fraction=0.0, min_seconds=0.1)
    dm.setup("fit")
    assert "tiny.wav" not in {c.path.name for c in dm.clips("train")}
    assert len(dm.clips("train")) == 10


# ------------------------------------------------------------------------------------------------ loudness


def test_integrated_loudness_matches_pyloudnorm():
    for rate, seed in ((16000, 0), (44100, 1), (24000, 2)):
        x = speechlike(3.0, rate, seed, amp=0.2).astype(np.float64)
        assert integrated_loudness(x, rate) == pytest.approx(pyloudnorm.Meter(rate).integrated_loudness(x), abs=0.01)
    assert integrated_loudness(np.zeros(48000), 48000) == -math.inf
    # the standard's 48 kHz coefficients: a 997 Hz full-scale sine reads -3.01 LUFS after K-weighting (BS.1770 §1)
    sine = np.sin(2 * np.pi * 997 * np.arange(48000 * 2) / 48000)
    assert integrated_loudness(sine, 48000) == pytest.approx(-3.01, abs=0.05)
    assert k_weighting(np.zeros(10), 48000).shape == (10,)


def test_loudness_normalisation_reaches_target(folder: Path):
    dm = make(folder, val_fraction=0.0, loudness_lufs=-16.0, segment_seconds=2.0)
    dm.setup("fit")
    meter = pyloudnorm.Meter(SR)
    before, after = [], []
    for index, clip in enumerate(dm.clips("train")):
        out = dm.train_dataset[index][0].numpy().astype(np.float64)[: clip.frames_at(SR)]
        before.append(clip.loudness_lufs)
        after.append(meter.integrated_loudness(out))
    assert max(before) - min(before) > 10  # the files really were at different levels
    assert after == pytest.approx([-16.0] * len(after), abs=0.5)


def test_loudness_gain_is_capped(tmp_path: Path):
    write(tmp_path / "q" / "quiet.wav", speechlike(1.0, SR, 0, amp=0.0005), SR, subtype="FLOAT")
    dm = make(tmp_path / "q", val_fraction=0.0, loudness_lufs=-16.0, max_gain_db=6.0, silence_threshold_db=-90)
    dm.setup("fit")
    clip = dm.clips("train")[0]
    assert clip.loudness_lufs < -16 - 6
    assert dm._gain(clip) == pytest.approx(10 ** (6 / 20))


# ------------------------------------------------------------------------------------------------ split and crops


def test_split_is_seeded_and_reproducible(folder: Path):
    def split(seed: int) -> tuple[list[str], list[str]]:
        dm = make(folder, val_fraction=0.3, seed=seed)
        dm.setup("fit")
        return [c.path.name for c in dm.clips("train")], [c.path.name for c in dm.clips("val")]

    first, again, other = split(0), split(0), split(1)
    assert first == again
    assert len(first[1]) == 3
    assert not set(first[0]) & set(first[1])
    assert {s for part in other for s in part} == {s for part in first for s in part}
    splits = {tuple(split(seed)[1]) for seed in range(2, 6)}
    assert len(splits | {tuple(first[1]), tuple(other[1])}) > 1  # the seed actually moves files


def test_validation_crops_are_centred_and_deterministic(folder: Path):
    dm = make(folder, val_fraction=0.3, segment_seconds=0.5)
    dm.setup("fit")
    first = torch.cat(list(dm.val_dataloader()))
    second = torch.cat(list(dm.val_dataloader()))
    assert torch.equal(first, second)
    for row, clip in zip(first, dm.clips("val")):
        if clip.sample_rate == SR and clip.channels == 1:  # hand-check the centred window on a native-rate file
            audio = sf.read(str(clip.path), dtype="float32")[0]
            start = (clip.frames - 12000) // 2
            np.testing.assert_array_equal(row[0].numpy(), audio[start : start + 12000])


def test_training_crops_depend_only_on_seed_epoch_index(folder: Path):
    dm = make(folder, val_fraction=0.0)
    dm.setup("fit")
    ds = dm.train_dataset
    assert torch.equal(ds[(3, 0)], ds[(3, 0)])
    offsets = {ds.offset((i, epoch))[1] for i in range(len(ds)) for epoch in range(3)}
    assert len(offsets) > 5  # random crops, not one fixed window
    # the sampler: a seeded permutation per epoch, independent of worker count
    sampler = EpochShuffleSampler(10, seed=0, epoch_fn=lambda: 4)
    assert list(sampler) == list(EpochShuffleSampler(10, seed=0, epoch_fn=lambda: 4))
    assert sorted(i for i, _ in sampler) == list(range(10))
    assert [i for i, _ in sampler] != [i for i, _ in EpochShuffleSampler(10, seed=0, epoch_fn=lambda: 5)]
    workers = make(folder, val_fraction=0.0, num_workers=2)
    workers.setup("fit")
    assert torch.equal(torch.cat(list(dm.train_dataloader())), torch.cat(list(workers.train_dataloader())))


class _Recorder(pl.LightningModule):
    """Records a fingerprint of every training batch, per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Conv1d(1, 1, 3, padding=1)
        self.seen: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        assert batch.ndim == 3
        assert batch.shape[1] == 1
        self.seen.setdefault(self.current_epoch, []).append(float(batch.double().pow(2).sum()))
        return (self.layer(batch) - batch).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", (self.layer(batch) - batch).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_resumed_fit_sees_the_same_crops(folder: Path, tmp_path: Path):
    def fit(max_epochs: int, ckpt: str | None = None, root: str = "a") -> tuple[_Recorder, pl.Trainer]:
        model = _Recorder()
        trainer = make_trainer(tmp_path / root, max_epochs=max_epochs, max_steps=-1, limit_val_batches=1.0)
        trainer.fit(model, datamodule=make(folder, val_fraction=0.2), ckpt_path=ckpt)
        return model, trainer

    full, _ = fit(2)
    assert full.seen[0] != full.seen[1]  # a new epoch draws new crops
    first, trainer = fit(1, root="b")
    ckpt = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, _ = fit(2, ckpt=str(ckpt), root="c")
    assert first.seen[0] == full.seen[0]
    assert resumed.seen == {1: full.seen[1]}


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")  # no validation split: expected
def test_no_validation_split(folder: Path, tmp_path: Path):
    dm = make(folder, val_fraction=0.0)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1.0)
    model = _Recorder()
    trainer.fit(model, datamodule=dm)
    assert dm.val_dataloader() == []
    assert sum(len(v) for v in model.seen.values()) == 2


# ------------------------------------------------------------------------------------------------ errors


def test_missing_root(tmp_path: Path):
    dm = make(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.*does not exist"):
        dm.setup("fit")


def test_empty_folder_lists_extensions(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(RuntimeError, match=r"no audio files under .*empty.*\['wav', 'flac', 'ogg'\]"):
        make(tmp_path / "empty").setup("fit")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("corrupt.wav", "random", "not a readable audio file"),
        ("empty.wav", "empty", r"empty file \(0 bytes\)"),
        ("zero.wav", "zero", "zero-length clip"),
    ],
)
def test_bad_file_is_named(folder: Path, name: str, content: str, message: str):
    bad = folder / "nested" / name
    if content == "random":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif content == "empty":
        bad.write_bytes(b"")
    else:
        write(bad, np.zeros(0, dtype=np.float32), SR)
    with pytest.raises(AudioFileError, match=message) as info:
        make(folder).setup("fit")
    assert info.value.path == bad
    assert str(bad) in str(info.value)
    assert info.traceback[-1].frame.code.name != "read"  # raised by us, not deep inside soundfile
    dm = make(folder, on_error="skip", val_fraction=0.0)
    with pytest.warns(UserWarning, match=f"skipping {bad}"):
        dm.setup("fit")
    assert bad not in {c.path for c in dm.clips("train")}
    assert len(dm.clips("train")) == 10


def test_silent_clip_skip_raise_keep(folder: Path):
    silent = write(folder / "silent.wav", np.zeros(SR, dtype=np.float32), SR)
    dm = make(folder, val_fraction=0.0)
    with pytest.warns(UserWarning, match=f"skipping {silent}: silent clip"):
        dm.setup("fit")
    assert silent not in {c.path for c in dm.clips("train")}
    with pytest.raises(AudioFileError, match=f"{silent}: silent clip"):
        make(folder, on_silent="raise").setup("fit")
    keep = make(folder, on_silent="keep", val_fraction=0.0, loudness_lufs=-16.0)
    keep.setup("fit")
    index = [c.path for c in keep.clips("train")].index(silent)
    assert torch.count_nonzero(keep.train_dataset[index]) == 0  # kept, gain 1, never NaN


def test_only_bad_files(tmp_path: Path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.wav").write_bytes(b"RIFF1234")
    with pytest.warns(UserWarning, match="a.wav"), pytest.raises(RuntimeError, match="every file was skipped"):
        make(tmp_path / "bad", on_error="skip").setup("fit")


def test_too_few_files_to_split(tmp_path: Path):
    write(tmp_path / "one" / "a.wav", noise(0.5, SR, 0.1, 0), SR)
    with pytest.raises(RuntimeError, match="val_fraction"):
        make(tmp_path / "one", val_fraction=0.5).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sample_rate": 0}, ValueError, "`sample_rate` must be >= 1, got 0"),
        ({"sample_rate": 24000.0}, TypeError, "`sample_rate` must be an int, got 24000.0"),
        ({"segment_seconds": -1.0}, ValueError, "`segment_seconds` must be a finite number > 0, got -1.0"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be >= 1, got 0"),
        ({"val_fraction": 1.0}, ValueError, r"`val_fraction` must be a number in \[0, 1\), got 1.0"),
        ({"loudness_lufs": 3.0}, ValueError, r"`loudness_lufs` must be a number in \(-70, 0\] or None, got 3.0"),
        ({"loudness_lufs": float("nan")}, ValueError, "`loudness_lufs` must be a number in .*got nan"),
        ({"extensions": "wav"}, TypeError, "`extensions` must be a sequence of extensions.*got 'wav'"),
        ({"extensions": ()}, ValueError, r"`extensions` must have at least 1 item, got \(\)"),
        ({"extensions": ("wav", 3)}, TypeError, r"`extensions\[1\]` must be a non-empty string, got 3"),
        ({"extensions": ("wav", "")}, ValueError, r"`extensions\[1\]` must be a non-empty string, got ''"),
        ({"seed": "0"}, TypeError, "`seed` must be an int, got '0'"),
        ({"val_fraction": "0.1"}, TypeError, "`val_fraction` must be a number, got '0.1'"),
        ({"max_gain_db": float("inf")}, ValueError, "`max_gain_db` must be a finite number, got inf"),
        ({"val_segment_seconds": 0}, ValueError, "`val_segment_seconds` must be a finite number > 0, got 0"),
        ({"cache_audio": "yes"}, TypeError, "`cache_audio` must be a bool, got 'yes'"),
        ({"drop_last": 1}, TypeError, "`drop_last` must be a bool, got 1"),
        ({"on_error": "ignore"}, ValueError, "`on_error` must be one of .*got 'ignore'"),
        ({"on_silent": "drop"}, ValueError, "`on_silent` must be one of .*got 'drop'"),
        ({"min_seconds": -0.5}, ValueError, "`min_seconds` must be a finite number >= 0, got -0.5"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        AudioFolderDataModule(tmp_path, **kwargs)
    with pytest.raises(TypeError, match=r"`root` must be a path \(str or os.PathLike\), got None"):
        AudioFolderDataModule(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`root` must be a non-empty path, got ''"):
        AudioFolderDataModule("")


def test_load_runs_the_whole_clip_through_the_pipeline(folder: Path):
    dm = make(folder, loudness_lufs=-16.0)
    audio = dm.load(folder / "int16_44k_stereo.wav")
    assert audio.dtype == torch.float32
    assert audio.shape == (1, 36000)  # 1.5 s at 24 kHz, no crop, no padding
    assert pyloudnorm.Meter(SR).integrated_loudness(audio[0].double().numpy()) == pytest.approx(-16.0, abs=0.5)
    with pytest.raises(AudioFileError, match="missing.wav: not a readable audio file"):
        dm.load(folder / "missing.wav")


def test_model_sample_rate_must_match(folder: Path, tmp_path: Path):
    model = _Recorder()
    model.sample_rate = 16000
    with pytest.raises(RuntimeError, match="`sample_rate`=24000 Hz but the model _Recorder has sample_rate=16000"):
        make_trainer(tmp_path, max_steps=1).fit(model, datamodule=make(folder))


@pytest.mark.parametrize("rate", [44100, 22050, 16000, 24000])
def test_partial_reads_equal_crops_of_the_fully_resampled_clip(tmp_path: Path, rate: int):
    write(tmp_path / "long" / "a.wav", noise(3.0, rate, 0.1, rate), rate, subtype="FLOAT")
    streamed = make(tmp_path / "long", val_fraction=0.0)  # reads only the span around each crop
    cached = make(tmp_path / "long", val_fraction=0.0, cache_audio=True)  # resamples the whole clip once
    streamed.setup("fit")
    cached.setup("fit")
    starts = set()
    for key in [(0, epoch) for epoch in range(12)] + [0]:
        starts.add(streamed.train_dataset.offset(key)[1])
        torch.testing.assert_close(streamed.train_dataset[key], cached.train_dataset[key], rtol=0, atol=1e-6)
    assert len(starts) > 6
