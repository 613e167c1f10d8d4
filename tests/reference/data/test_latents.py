import math

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from lightning_stability.reference.data._audio import resample
from lightning_stability.reference.data.latents import (
    LatentPairDataModule,
    RandomConvEncoder,
    collate_latents,
    degrade,
)

D = 8


def write_folder(root, lengths=(40, 30, 25, 12), voices=("a", "a", "b", "b"), seed=0, extra=None):
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i, (t, voice) in enumerate(zip(lengths, voices)):
        target = torch.randn(D, t, generator=g)
        item = {"source": target + 0.1 * torch.randn(D, t, generator=g), "target": target, "voice": voice}
        item["utterance"] = f"u{i}"
        item.update(extra or {})
        torch.save(item, root / f"item{i}.pt")
    return root


def module(root, **kw):
    defaults = {"latent_dim": D, "segment_frames": 20, "batch_size": 4, "val_fraction": 0.0, "seed": 0}
    return LatentPairDataModule(root, **{**defaults, **kw})


def test_folder_batches_crop_pad_and_mask(tmp_path):
    dm = module(write_folder(tmp_path / "lat"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == (4, D, 20)
    assert batch["conditioning"].shape == (4, D, 20)
    assert batch["target"].shape == (4, D, 20)
    assert batch["mask"].dtype == torch.bool
    assert sorted(batch["lengths"].tolist()) == [12, 20, 20, 20]
    short = int(torch.argmin(batch["lengths"]))
    assert batch["mask"][short].tolist() == [True] * 12 + [False] * 8
    assert torch.equal(batch["source"][short, :, 12:], torch.zeros(D, 8))
    for b in range(4):  # every window is a real crop of its item
        n = int(batch["lengths"][b])
        assert n == int(batch["mask"][b].sum())


def test_conditioning_is_another_utterance_of_the_same_voice(tmp_path):
    dm = module(write_folder(tmp_path / "lat"), segment_frames=10)
    dm.setup("fit")
    items = dm.items("train")
    ds = dm.train_dataset
    for epoch in range(3):
        for i, item in enumerate(items):
            cond = ds[(i, epoch)]["conditioning"]
            owners = []
            for other in items:
                t = other.target
                for s in range(t.shape[1] - 9):
                    if torch.equal(t[:, s : s + 10], cond):
                        owners.append(other)
            assert owners, (i, epoch)
            assert all(o.voice == item.voice and o.utterance != item.utterance for o in owners)


def test_crops_are_seeded_by_epoch_and_index_and_validation_is_centred(tmp_path):
    dm = module(write_folder(tmp_path / "lat", lengths=(60, 60, 60, 60)), segment_frames=20)
    dm.setup("fit")
    ds = dm.train_dataset
    a, b = ds[(0, 0)], ds[(0, 0)]
    assert torch.equal(a["source"], b["source"])
    assert any(not torch.equal(ds[(0, e)]["source"], a["source"]) for e in range(1, 6))
    val = ds[0]
    torch.testing.assert_close(val["source"], dm.items("train")[0].source[:, 20:40])
    again = module(write_folder(tmp_path / "lat2", lengths=(60, 60, 60, 60)), segment_frames=20)
    again.setup("fit")
    assert torch.equal(again.train_dataset[(2, 3)]["source"], ds[(2, 3)]["source"])


def test_whole_items_are_padded_per_batch(tmp_path):
    dm = module(write_folder(tmp_path / "lat"), segment_frames=None)
    dm.setup("fit")
    batch = collate_latents([dm.train_dataset[i] for i in range(4)])
    assert batch["source"].shape == (4, D, 40)
    assert batch["mask"].sum(dim=1).tolist() == [40, 30, 25, 12]


def test_split_by_utterance_keeps_versions_together(tmp_path):
    root = tmp_path / "lat"
    g = torch.Generator().manual_seed(0)
    root.mkdir()
    for u in range(10):
        target = torch.randn(D, 30, generator=g)
        for v in range(2):
            torch.save(
                {"source": target + v, "target": target, "voice": f"v{u % 2}", "utterance": f"u{u}"},
                root / f"{u}-{v}.pt",
            )
    dm = module(root, val_fraction=0.2)
    dm.setup("fit")
    train_utts = {it.utterance for it in dm.items("train")}
    val_utts = {it.utterance for it in dm.items("val")}
    assert len(val_utts) == 2
    assert not train_utts & val_utts
    assert len(dm.items("val")) == 4
    # validation conditioning comes from validation utterances of the voice, or from training ones if none is left
    batch = next(iter(dm.val_dataloader()))
    assert batch["conditioning"].shape == (4, D, 20)


def test_own_conditioning_and_no_conditioning(tmp_path):
    root = write_folder(tmp_path / "lat", voices=("a", "b", "c", "d"), extra={"conditioning": torch.ones(4, 7)})
    dm = module(root, cond_dim=4)
    dm.setup("fit")
    item = dm.train_dataset[(0, 0)]
    assert item["conditioning"].shape == (4, 20)
    assert item["conditioning"][:, :7].eq(1).all()
    assert item["conditioning"][:, 7:].eq(0).all()
    plain = module(write_folder(tmp_path / "plain", voices=("a", "b", "c", "d")), cond_dim=0)
    plain.setup("fit")
    assert "conditioning" not in plain.train_dataset[(0, 0)]


Z = torch.zeros


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            {"source": Z(5, 10), "target": Z(5, 10)},
            r"'source' in .*bad\.pt has shape \(5, 10\): D=5 but `latent_dim`=8",
        ),
        ({"source": Z(D, 10), "target": Z(D, 9)}, r"'source' \(8, 10\) and 'target' \(8, 9\) in .*bad\.pt"),
        ({"source": Z(1, D, 10), "target": Z(1, D, 10)}, r"float tensor \[D=8, T\], got shape \(1, 8, 10\)"),
        ({"target": Z(D, 10)}, r"bad\.pt must hold a dict with 'source' and 'target'.*\['target'\]"),
        (
            {"source": Z(D, 10), "target": Z(D, 10), "conditioning": Z(3, 4)},
            r"'conditioning' in .*bad\.pt must be a tensor \[Dc=8, T>0\], got \(3, 4\)",
        ),
    ],
)
def test_bad_files_are_named_with_their_shapes(tmp_path, content, match):
    root = write_folder(tmp_path / "lat")
    torch.save(content, root / "bad.pt")
    with pytest.raises(ValueError, match=match):
        module(root).setup("fit")


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        module(tmp_path / "missing").setup("fit")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .pt files"):
        module(tmp_path / "empty").setup("fit")
    root = write_folder(tmp_path / "single", voices=("a", "a", "b", "c"))
    with pytest.raises(ValueError, match=r"voice 'b' has a single utterance \('u2'\)"):
        module(root).setup("fit")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"cannot load latent file .*x\.pt"):
        module(tmp_path / "junk").setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"segment_frames": 0}, ValueError, "`segment_frames` must be >= 1, got 0"),
        ({"segment_frames": 150.0}, TypeError, "`segment_frames` must be an int or None, got 150.0"),
        ({"val_fraction": 1.0}, ValueError, r"`val_fraction` must be a number in \[0, 1\), got 1.0"),
        ({"val_fraction": None}, TypeError, "`val_fraction` must be a number, got None"),
        ({"snr_db": (10.0, 0.0)}, ValueError, r"`snr_db` must be a pair \(low, high\) with low <= high"),
        ({"snr_db": 10.0}, TypeError, "`snr_db` must be a pair of numbers, got 10.0"),
        ({"gain_db": (0.0, float("inf"))}, ValueError, r"`gain_db\[1\]` must be a finite number, got inf"),
        ({"cutoff_hz": (0.0, 10.0)}, ValueError, r"`cutoff_hz\[0\]` must be a finite number > 0, got 0.0"),
        ({"latent_dim": 0}, ValueError, "`latent_dim` must be >= 1, got 0"),
        ({"latent_dim": "128"}, TypeError, "`latent_dim` must be an int, got '128'"),
        ({"encoder": 3}, TypeError, "`encoder` must be a checkpoint path, a callable"),
        ({"latents_dir": 3}, TypeError, r"`latents_dir` must be a path \(str or os.PathLike\) or None, got 3"),
        ({"corpus": ["te"]}, TypeError, "`corpus` must be a dict of SpeechCorpusDataModule options"),
        ({"cache_dir": None}, TypeError, "`cache_dir` must be a path"),
        ({"encoder_key": 3}, TypeError, "`encoder_key` must be a non-empty string or None, got 3"),
        ({"fallback_to_random": "yes"}, TypeError, "`fallback_to_random` must be a bool, got 'yes'"),
        ({"max_seconds": 0}, ValueError, "`max_seconds` must be a finite number > 0, got 0"),
        ({"degradations": 0}, ValueError, "`degradations` must be >= 1, got 0"),
    ],
)
def test_argument_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        LatentPairDataModule(**kwargs)
    with pytest.raises(ValueError, match="either `latents_dir`"):
        LatentPairDataModule(tmp_path, encoder=lambda a: a)


# -- encoder mode ---------------------------------------------------------------------------------------------------
def write_audio(root, voices=("spk1", "spk2"), per_voice=2, seconds=0.5, rate=16000):
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * rate)) / rate
    for v, voice in enumerate(voices):
        (root / voice).mkdir(parents=True, exist_ok=True)
        for u in range(per_voice):
            f0 = 120 + 40 * v + 10 * u
            wave = 0.3 * np.sin(2 * np.pi * f0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            sf.write(
                root / voice / f"utt{u}.wav", (wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32), rate
            )
    return root


class CountingEncoder(nn.Module):
    """Average-pools audio into frames of 320 samples and projects to D channels; counts its calls."""

    def __init__(self, dim=D):
        super().__init__()
        self.proj = nn.Conv1d(1, dim, 1)
        self.calls = 0

    def forward(self, audio):
        self.calls += 1
        return self.proj(nn.functional.avg_pool1d(audio.abs(), 320))


def test_encoder_mode_caches_once_and_reuses(tmp_path):
    audio = write_audio(tmp_path / "audio")
    enc = CountingEncoder()
    kw = {"encoder": enc, "audio": audio, "cache_dir": tmp_path / "cache", "latent_dim": D, "degradations": 2}
    dm = LatentPairDataModule(**kw, segment_frames=16, val_fraction=0.0, batch_size=4)
    dm.prepare_data()
    assert enc.calls == 4 * 3  # clean + 2 degraded versions per utterance
    folder = dm.computed_dir()
    assert (folder / "manifest.json").is_file()
    files = sorted(folder.glob("*.pt"))
    assert len(files) == 8
    first = torch.load(files[0], weights_only=True)
    assert set(first) == {"source", "target", "voice", "utterance"}
    assert first["voice"] == "spk1"
    assert first["target"].shape == (D, 12000 // 320)  # resampled to 24 kHz, hop 320
    assert not torch.equal(first["source"], first["target"])
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = LatentPairDataModule(**kw, segment_frames=16, val_fraction=0.0, batch_size=4)
    again.prepare_data()
    again.setup("fit")
    assert enc.calls == 12  # reused, not recomputed
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    batch = next(iter(again.train_dataloader()))
    assert batch["source"].shape == (4, D, 16)
    other = LatentPairDataModule(**{**kw, "snr_db": (5.0, 5.0)}, segment_frames=16)
    assert other.computed_dir() != folder  # a changed degradation is a different cache


def test_interrupted_encoding_leaves_no_usable_cache(tmp_path):
    audio = write_audio(tmp_path / "audio")
    calls = {"n": 0}

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("killed")
        return nn.functional.avg_pool1d(x, 320).expand(-1, D, -1).contiguous()

    dm = LatentPairDataModule(encoder=flaky, audio=audio, cache_dir=tmp_path / "cache", latent_dim=D, encoder_key="f")
    with pytest.raises(RuntimeError, match="killed"):
        dm.prepare_data()
    assert list((tmp_path / "cache").iterdir()) == []  # no final folder, temporary folder removed
    dm.prepare_data()
    assert (dm.computed_dir() / "manifest.json").is_file()


@pytest.mark.parametrize(
    ("encoder", "match"),
    [
        (lambda x: nn.functional.avg_pool1d(x, 320)[:, 0], r"latents \[B=1, D=8, T\] \(rank 3\), got \(1, 37\)"),
        (lambda x: nn.functional.avg_pool1d(x, 320).expand(-1, 5, -1), r"shape \(1, 5, 37\): D=5 but `latent_dim`=8"),
        (lambda x: (x, x), "must return one latents tensor"),
    ],
)
def test_encoder_errors_name_the_shape(tmp_path, encoder, match):
    audio = write_audio(tmp_path / "audio", voices=("v",), per_voice=1)
    dm = LatentPairDataModule(encoder=encoder, audio=audio, cache_dir=tmp_path / "cache", latent_dim=D, encoder_key="x")
    with pytest.raises((ValueError, TypeError), match=match):
        dm.prepare_data()


def test_audio_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="`audio` folder .* does not exist"):
        LatentPairDataModule(audio=tmp_path / "nope", cache_dir=tmp_path / "c").prepare_data()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no wav/flac/ogg files"):
        LatentPairDataModule(audio=tmp_path / "empty", cache_dir=tmp_path / "c").prepare_data()


def test_degrade_hits_the_requested_snr_gain_and_band():
    rate = 24000
    t = torch.arange(rate) / rate
    clean = 0.5 * torch.sin(2 * torch.pi * 300 * t) + 0.2 * torch.sin(2 * torch.pi * 9000 * t)
    g = torch.Generator().manual_seed(0)
    noisy = degrade(clean, rate, snr_db=10.0, gain_db=0.0, cutoff_hz=None, generator=g)
    snr = 10 * math.log10(float(clean.pow(2).mean() / (noisy - clean).pow(2).mean()))
    assert snr == pytest.approx(10.0, abs=0.2)
    louder = degrade(clean, rate, snr_db=80.0, gain_db=6.0, cutoff_hz=None, generator=g)
    assert float(louder.pow(2).mean().sqrt() / clean.pow(2).mean().sqrt()) == pytest.approx(10 ** (6 / 20), rel=1e-3)
    lowpassed = degrade(clean, rate, snr_db=80.0, gain_db=0.0, cutoff_hz=2000.0, generator=g)
    spectrum = torch.fft.rfft(lowpassed).abs()
    assert float(spectrum[9000] / torch.fft.rfft(clean).abs()[9000]) < 0.01  # 9 kHz removed
    assert float(spectrum[300] / torch.fft.rfft(clean).abs()[300]) > 0.9  # 300 Hz kept
    silent = degrade(torch.zeros(100), rate, snr_db=10.0, gain_db=0.0, cutoff_hz=1000.0, generator=g)
    assert torch.isfinite(silent).all()


def test_random_conv_encoder_is_fixed_and_has_hop_320():
    a, b = RandomConvEncoder(16, seed=3), RandomConvEncoder(16, seed=3)
    audio = 0.1 * torch.randn(2, 1, 24000)
    za = a(audio)
    assert za.shape == (2, 16, 75)
    assert torch.equal(za, b(audio))
    assert not any(p.requires_grad for p in a.parameters())
    assert not torch.equal(za, RandomConvEncoder(16, seed=4)(audio))


def test_default_task_on_the_speech_corpus(tmp_path):
    """Enhancement on eSpeak NG Telugu speech, latents from the fixed random encoder (no codec checkpoint)."""
    dm = LatentPairDataModule(
        cache_dir=tmp_path / "cache",
        corpus={"num_utterances": 8, "num_voices": 2},
        segment_frames=50,
        batch_size=4,
        val_fraction=0.25,
    )
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.items("train"), dm.items("val")
    assert len(train) + len(val) == 16  # 8 utterances x 2 degraded versions
    assert {it.voice for it in train} == {it.voice for it in val}
    assert len({it.voice for it in train}) == 2
    batch = next(iter(dm.train_dataloader()))
    assert batch["source"].shape == (4, 128, 50)
    rms = float(batch["target"][batch["mask"][:, None, :].expand_as(batch["target"])].pow(2).mean().sqrt())
    assert 1.0 < rms < 20.0
    diff = (batch["source"] - batch["target"]).pow(2).mean().sqrt()
    assert float(diff) > 0.05 * rms  # the source is a degraded version, not the clean latents


def _codec_checkpoint(tmp_path, dim=D):
    import lightning.pytorch as pl

    from lightning_stability.reference.codec.module import CodecModule

    codec = CodecModule(n_filters=4, dimension=dim, lstm=0, n_q=1, codebook_size=16, kmeans_init=False)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(codec)
    path = tmp_path / "codec.ckpt"
    trainer.save_checkpoint(path)
    return codec, path


def test_codec_checkpoint_encoder_gives_the_codecs_latents(tmp_path):
    from lightning_stability.nn.scale import normalize
    from lightning_stability.reference.codec.latents import CodecLatentEncoder

    codec, path = _codec_checkpoint(tmp_path)
    audio = write_audio(tmp_path / "audio")
    dm = LatentPairDataModule(encoder=path, audio=audio, cache_dir=tmp_path / "cache", latent_dim=D, degradations=1)
    dm.prepare_data()
    item = torch.load(sorted(dm.computed_dir().glob("*.pt"))[0], weights_only=True)
    mono, rate = sf.read(audio / "spk1" / "utt0.wav", dtype="float32")
    clean = resample(torch.from_numpy(mono), rate, 24000)[None, None]
    codec.eval()
    with torch.no_grad():
        expected = codec.encoder(torch.nn.functional.pad(normalize(clean)[0], (0, (-clean.shape[-1]) % 320)))[0]
    torch.testing.assert_close(item["target"], expected, rtol=1e-4, atol=1e-4)
    assert item["target"].shape == (D, math.ceil(12000 / 320))
    assert isinstance(CodecLatentEncoder(codec).encoder, nn.Module)
    with pytest.raises(FileNotFoundError, match="`encoder` checkpoint .*missing.ckpt' does not exist"):
        LatentPairDataModule(encoder=tmp_path / "missing.ckpt", audio=audio, cache_dir=tmp_path / "c").prepare_data()
    fallback = LatentPairDataModule(
        encoder=tmp_path / "missing.ckpt", fallback_to_random=True, audio=audio, cache_dir=tmp_path / "c2"
    )
    fallback.prepare_data()
    assert "random-conv" in str(fallback._resolve_encoder()[1])


def test_resumed_fit_sees_the_batches_of_an_uninterrupted_one(tmp_path):
    """Crops, conditioning draws and order depend on (seed, epoch, index) only: a fit resumed at an epoch boundary
    ends with the parameters of an uninterrupted one."""
    import lightning.pytorch as pl

    from lightning_stability.reference.cascade import CascadeTransformerModule
    from tests.helpers import assert_same, make_trainer, snapshot

    root = write_folder(tmp_path / "lat", lengths=(40, 35, 30, 45, 50, 38), voices=("a", "a", "b", "b", "a", "b"))
    tiny = {"latent_dim": D, "widths": [16, 16, 16], "n_layers": 1, "n_heads": 2}
    kw = {"lr": 2e-3, "warmup_steps": 2, "total_steps": 6}

    def data():
        return module(root, segment_frames=16, batch_size=2)

    pl.seed_everything(0)
    full = CascadeTransformerModule(tiny, **kw)
    make_trainer(tmp_path / "full", max_epochs=2, max_steps=-1).fit(full, datamodule=data())
    pl.seed_everything(0)
    half = CascadeTransformerModule(tiny, **kw)
    trainer = make_trainer(tmp_path / "half", max_epochs=1, max_steps=-1)
    trainer.fit(half, datamodule=data())
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    pl.seed_everything(7)
    resumed = CascadeTransformerModule(tiny, **kw)
    make_trainer(tmp_path / "resumed", max_epochs=2, max_steps=-1).fit(
        resumed, datamodule=data(), ckpt_path=tmp_path / "half.ckpt"
    )
    assert_same(snapshot(full), snapshot(resumed))
    assert full.global_step == 6
