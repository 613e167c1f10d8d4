"""SpeechCorpusDataModule: generation with eSpeak NG, determinism, reuse, atomicity, splits and loading."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import soundfile as sf
import torch

pytest.importorskip("espeakng_loader", reason="eSpeak NG ships with the optional `espeakng-loader` package")

from lightning_stability.reference.data import SpeechCorpusDataModule, espeak  # noqa: E402
from lightning_stability.reference.data._audio import AudioFileError  # noqa: E402
from lightning_stability.reference.data.speech_corpus import bundled_languages, bundled_sentences  # noqa: E402
from tests.helpers import make_trainer  # noqa: E402


def corpus(cache: Path, **kw) -> SpeechCorpusDataModule:
    kw.setdefault("num_utterances", 10)
    kw.setdefault("num_voices", 3)
    kw.setdefault("segment_seconds", 0.5)
    kw.setdefault("batch_size", 4)
    kw.setdefault("val_fraction", 0.2)
    return SpeechCorpusDataModule(cache, **kw)


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_bundled_sentences():
    assert {"te", "en"} <= set(bundled_languages())
    telugu = bundled_sentences("te")
    assert len(telugu) >= 60
    assert len(set(telugu)) == len(telugu)
    for sentence in telugu:  # Telugu script (U+0C00-U+0C7F) with spaces and punctuation only
        assert all("\u0c00" <= ch <= "\u0c7f" or ch in " ,.?!" for ch in sentence), sentence
    assert len(bundled_sentences("en")) >= 30
    with pytest.raises(ValueError, match=r"`language` 'xx' has no bundled sentence list .*sentences="):
        bundled_sentences("xx")


def test_generates_a_telugu_corpus_with_manifest(tmp_path: Path):
    dm = corpus(tmp_path / "cache")
    assert not dm.is_generated()
    dm.prepare_data()
    assert dm.is_generated()
    assert dm.corpus_dir.parent == tmp_path / "cache"
    assert dm.corpus_dir.name == f"te-{dm.corpus_key()[:12]}"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [dm.corpus_dir.name]  # no leftovers
    manifest = json.loads(dm.manifest_path.read_text(encoding="utf-8"))
    assert manifest["params"] == dm.generation_params()
    assert manifest["sample_rate"] == 22050
    assert len(manifest["utterances"]) == 10
    telugu = set(bundled_sentences("te"))
    for record in manifest["utterances"]:
        path = dm.corpus_dir / record["path"]
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
        assert info.frames == record["num_samples"]
        assert record["duration"] == pytest.approx(info.frames / 22050, abs=1e-5)
        assert 0.5 < record["duration"] < 15
        assert all(part + "." in telugu or part + "?" in telugu or part in telugu for part in
                   _sentences(record["text"]))  # fmt: skip
        assert record["voice"] == f"te+{record['variant']}"
        assert 140 <= record["rate"] <= 200
    utterances = dm.utterances()
    assert [u.id for u in utterances] == [r["id"] for r in manifest["utterances"]]
    assert {u.voice_id for u in utterances} == {0, 1, 2}
    assert len({u.variant for u in utterances}) == 3  # three different eSpeak variants
    assert len({(u.voice_id, u.pitch) for u in utterances}) > 3  # pitch varies within a voice
    assert len({u.rate for u in utterances}) > 3
    assert utterances[0].duration == pytest.approx(manifest["utterances"][0]["duration"], abs=1e-5)
    audio, _ = sf.read(str(utterances[0].path))
    assert np.sqrt(np.mean(audio**2)) > 0.01  # speech, not silence


def _sentences(text: str) -> list[str]:
    parts, current = [], ""
    for ch in text:
        current += ch
        if ch in ".?!":
            parts.append(current.strip())
            current = ""
    return [p for p in parts if p] + ([current.strip()] if current.strip() else [])


def test_same_seed_gives_identical_bytes_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    a, b = corpus(tmp_path / "a", num_utterances=40), corpus(tmp_path / "b", num_utterances=40, generation_workers=1)
    a.prepare_data()
    b.prepare_data()
    assert a.corpus_dir.name == b.corpus_dir.name
    first = digests(a.corpus_dir)
    assert len(first) == 41  # 40 wavs + manifest; two synthesis chunks (CHUNK_SIZE = 32)
    wavs = {k: v for k, v in first.items() if k.endswith(".wav")}
    assert wavs == {k: v for k, v in digests(b.corpus_dir).items() if k.endswith(".wav")}
    # reuse: nothing is synthesised or rewritten by a second prepare_data
    mtimes = {p: p.stat().st_mtime_ns for p in a.corpus_dir.rglob("*")}

    def forbidden(*args, **kwargs):
        raise AssertionError("the cached corpus was regenerated")

    monkeypatch.setattr(espeak, "synthesize_to_files", forbidden)
    again = corpus(tmp_path / "a", num_utterances=40)
    again.prepare_data()
    again.setup("fit")
    assert {p: p.stat().st_mtime_ns for p in a.corpus_dir.rglob("*")} == mtimes
    assert digests(a.corpus_dir) == first


def test_changed_parameters_generate_a_different_corpus(tmp_path: Path):
    base = corpus(tmp_path)
    keys = {
        base.corpus_dir.name,
        corpus(tmp_path, seed=1).corpus_dir.name,
        corpus(tmp_path, num_voices=4).corpus_dir.name,
        corpus(tmp_path, num_utterances=11).corpus_dir.name,
        corpus(tmp_path, rate_range=(150, 160)).corpus_dir.name,
        corpus(tmp_path, sentences=["Hello there.", "Good morning."], language="en").corpus_dir.name,
    }
    assert len(keys) == 6
    # loading options do not touch the audio: same corpus folder
    assert corpus(tmp_path, sample_rate=16000, batch_size=2, loudness_lufs=-16.0).corpus_dir == base.corpus_dir
    other_seed = corpus(tmp_path / "s1", seed=1)
    base.prepare_data()
    other_seed.prepare_data()
    assert [u.text for u in base.utterances()] != [u.text for u in other_seed.utterances()]


def test_interrupted_generation_leaves_no_usable_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = espeak.synthesize_to_files
    calls = []

    def crash_after_first_chunk(chunks, **kwargs):
        calls.append(len(chunks))
        real(chunks[:1], **kwargs)  # some wav files really get written...
        raise KeyboardInterrupt("killed mid-way")  # ...then the run dies

    monkeypatch.setattr(espeak, "synthesize_to_files", crash_after_first_chunk)
    dm = corpus(tmp_path / "cache", num_utterances=40)
    with pytest.raises(KeyboardInterrupt):
        dm.prepare_data()
    assert calls == [2]
    assert not dm.is_generated()
    assert not dm.corpus_dir.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary folder is gone too
    # a hard kill (no cleanup) leaves a hidden temporary folder: never used, removed by the next generation
    stale = tmp_path / "cache" / f".tmp-{dm.corpus_dir.name}-{os.uname().nodename}-999999999-deadbeef"
    (stale / "wavs").mkdir(parents=True)
    (stale / "wavs" / "te_00000.wav").write_bytes(b"RIFF partial")
    monkeypatch.setattr(espeak, "synthesize_to_files", real)
    fresh = corpus(tmp_path / "cache", num_utterances=40)
    fresh.setup("fit")  # outside DDP, setup generates a missing corpus
    assert fresh.is_generated()
    assert not stale.exists()
    reference = corpus(tmp_path / "reference", num_utterances=40)
    reference.prepare_data()
    assert digests(fresh.corpus_dir).keys() == digests(reference.corpus_dir).keys()
    wavs = [k for k in digests(reference.corpus_dir) if k.endswith(".wav")]
    assert all(digests(fresh.corpus_dir)[k] == digests(reference.corpus_dir)[k] for k in wavs)


def test_english_corpus_and_splits(tmp_path: Path):
    dm = corpus(tmp_path, language="en", num_utterances=12, num_voices=4, val_fraction=0.25)
    dm.setup("fit")
    assert all(u.voice.startswith("en+") for u in dm.utterances())
    train, val = dm.utterances("train"), dm.utterances("val")
    assert len(val) == 3
    assert {u.id for u in train} | {u.id for u in val} == {u.id for u in dm.utterances()}
    assert not {u.id for u in train} & {u.id for u in val}
    by_voice = corpus(tmp_path, language="en", num_utterances=12, num_voices=4, val_fraction=0.25, holdout="voice")
    by_voice.setup("fit")
    train_voices = {u.voice_id for u in by_voice.utterances("train")}
    val_voices = {u.voice_id for u in by_voice.utterances("val")}
    assert len(val_voices) == 1
    assert not train_voices & val_voices
    assert len(by_voice.utterances("val")) == 3  # round-robin voices: 12 / 4


class _TinyCodec(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.sample_rate = 16000
        self.net = torch.nn.Conv1d(1, 1, 9, padding=4)
        self.shapes: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        self.shapes.append(tuple(batch.shape))
        return (self.net(batch) - batch).abs().mean()

    def validation_step(self, batch, batch_idx):
        self.shapes.append(tuple(batch.shape))
        self.log("val_l1", (self.net(batch) - batch).abs().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_trains_from_the_corpus_at_the_model_rate(tmp_path: Path):
    dm = corpus(tmp_path / "cache", sample_rate=16000, loudness_lufs=-16.0, segment_seconds=0.25, batch_size=4)
    model = _TinyCodec()
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0, val_check_interval=2)
    trainer.fit(model, datamodule=dm)
    assert model.shapes[:2] == [(4, 1, 4000), (4, 1, 4000)]
    assert model.shapes[-1] == (2, 1, 4000)  # the two held-out utterances
    assert torch.isfinite(trainer.callback_metrics["val_l1"])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"language": "te+f2"}, ValueError, "`language` must be an eSpeak NG language code.*'te\\+f2'"),
        ({"language": "xx"}, ValueError, "`language` 'xx' has no bundled sentence list"),
        ({"num_utterances": 0}, ValueError, "`num_utterances` must be >= 1, got 0"),
        ({"num_voices": 2.0}, TypeError, "`num_voices` must be an int, got 2.0"),
        ({"rate_range": (300, 100)}, ValueError, r"`rate_range` must be a pair \(low, high\).*\(300, 100\)"),
        ({"rate_range": (50, 100)}, ValueError, r"`rate_range\[0\]` must be >= 80, got 50"),
        ({"rate_range": (140, 200.0)}, TypeError, r"`rate_range\[1\]` must be an int, got 200.0"),
        ({"language": 3}, TypeError, "`language` must be a non-empty string, got 3"),
        ({"language": "te+f2"}, ValueError, "`language` must be an eSpeak NG language code"),
        ({"generation_workers": 0}, ValueError, "`generation_workers` must be >= 1, got 0"),
        ({"seed": 0.5}, TypeError, "`seed` must be an int, got 0.5"),
        ({"holdout": "speaker"}, ValueError, r"`holdout` must be one of \('utterance', 'voice'\), got 'speaker'"),
        ({"sentences": "one sentence"}, TypeError, "`sentences` must be a sequence of str, got 'one sentence'"),
        ({"sentences": ["  "]}, ValueError, "`sentences` must hold at least one non-empty sentence"),
        ({"sentences": ["ab cd.", 3]}, TypeError, r"`sentences\[1\]` must be a non-empty string, got 3"),
        ({"variants": []}, ValueError, r"`variants` must have at least 1 item, got \[\]"),
        ({"variants": "f2"}, TypeError, "`variants` must be a sequence of eSpeak variant names, got 'f2'"),
        ({"holdout": "voice", "num_voices": 1}, ValueError, "holds out every one of the 1 voices"),
        ({"batch_size": 0}, ValueError, "`batch_size` must be >= 1, got 0"),
    ],
)
def test_argument_validation(tmp_path: Path, kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        corpus(tmp_path, **kwargs)
    with pytest.raises(TypeError, match=r"`cache_dir` must be a path \(str or os.PathLike\), got 3"):
        SpeechCorpusDataModule(3)  # type: ignore[arg-type]


def test_unknown_language_or_variant_named_at_generation(tmp_path: Path):
    with pytest.raises(ValueError, match="`language` 'xx' cannot be spoken: .*no language 'xx'"):
        corpus(tmp_path, language="xx", sentences=["ab cd."]).prepare_data()
    with pytest.raises(ValueError, match="`variants` contains 'nosuch'"):
        corpus(tmp_path, variants=["f1", "nosuch"]).prepare_data()
    assert list(tmp_path.iterdir()) == []


def _fingerprint(row: torch.Tensor) -> str:
    return hashlib.sha256(row.contiguous().numpy().tobytes()).hexdigest()[:16]


class _RankRecorder(pl.LightningModule):
    """Writes a fingerprint of every training row it saw to ``<out>/rank<k>.json``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = torch.nn.Conv1d(1, 1, 3, padding=1)
        self.rows: list[str] = []

    def training_step(self, batch, batch_idx):
        self.rows += [_fingerprint(row) for row in batch]
        return (self.net(batch) - batch).pow(2).mean()

    def on_train_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.rows))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.ddp
@pytest.mark.timeout(180)
def test_ddp_generates_once_and_ranks_share_the_epoch_crops(tmp_path: Path):
    dm = corpus(tmp_path / "cache", num_utterances=16, val_fraction=0.25, batch_size=2)
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_spawn", max_epochs=1, max_steps=-1)
    trainer.fit(_RankRecorder(str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [len(r) for r in ranks] == [6, 6]  # 12 training utterances split over 2 ranks
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [dm.corpus_dir.name]  # generated once
    reference = corpus(tmp_path / "cache", num_utterances=16, val_fraction=0.25)
    reference.setup("fit")
    expected = {_fingerprint(reference.train_dataset[(i, 0)]) for i in range(len(reference.train_dataset))}
    assert set(ranks[0]) | set(ranks[1]) == expected  # every rank drew the epoch-0 crops of the same split


def test_damaged_cache_is_reported(tmp_path: Path):
    dm = corpus(tmp_path)
    dm.prepare_data()
    victim = dm.utterances()[3].path
    victim.unlink()
    with pytest.raises(RuntimeError, match=f"is damaged: 1 file.*{victim.name}.*delete the folder"):
        corpus(tmp_path).setup("fit")
    dm.utterances()[4].path.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="is damaged"):
        corpus(tmp_path).setup("fit")
    victim.write_bytes(b"")
    with pytest.raises(AudioFileError, match=r"te_00003.wav: empty file \(0 bytes\)"):
        corpus(tmp_path).setup("fit")
    victim.write_bytes(dm.utterances()[5].path.read_bytes())
    with pytest.raises(AudioFileError, match="te_00004.wav: not a readable audio file"):
        corpus(tmp_path).setup("fit")


def test_default_cache_dir_follows_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LIGHTNING_STABILITY_CACHE", str(tmp_path / "ls"))
    assert SpeechCorpusDataModule().corpus_dir.parent == tmp_path / "ls" / "speech"
    monkeypatch.delenv("LIGHTNING_STABILITY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert SpeechCorpusDataModule().corpus_dir.parent == tmp_path / "xdg" / "lightning_stability" / "speech"
