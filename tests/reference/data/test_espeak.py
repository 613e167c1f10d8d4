"""The ctypes eSpeak NG wrapper: real synthesis of Telugu and English, errors, subprocess determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("espeakng_loader", reason="eSpeak NG ships with the optional `espeakng-loader` package")

from lightning_stability.reference.data import espeak  # noqa: E402

TELUGU = "నేను ఈ రోజు బజారుకు వెళ్తున్నాను."  # "I am going to the market today."
ENGLISH = "The quick brown fox jumps over the lazy dog."


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.mark.parametrize(("text", "voice"), [(TELUGU, "te"), (TELUGU, "te+f2"), (ENGLISH, "en"), (ENGLISH, "en+klatt")])
def test_synthesizes_plausible_speech(text: str, voice: str):
    audio = espeak.synthesize(text, voice)
    assert espeak.SAMPLE_RATE == 22050
    assert audio.dtype == np.int16
    seconds = audio.shape[0] / espeak.SAMPLE_RATE
    assert 1.0 < seconds < 6.0  # one short sentence at 175 words/min
    assert rms(audio) > 300  # about -40 dBFS: clearly not silence
    assert np.abs(audio).max() < 32767  # not clipped
    # speech is not stationary: 20 ms frame energies span > 30 dB (onsets, pauses) and fluctuate (std > 5 dB)
    frames = audio[: audio.shape[0] // 441 * 441].reshape(-1, 441).astype(np.float64)
    energy_db = 10 * np.log10(np.mean(frames**2, axis=1) + 1)
    assert energy_db.max() - energy_db.min() > 30
    assert energy_db.std() > 5


def test_parameters_change_the_speech():
    slow = espeak.synthesize(ENGLISH, "en", rate=100)
    fast = espeak.synthesize(ENGLISH, "en", rate=300)
    assert slow.shape[0] > 1.8 * fast.shape[0]
    longer = espeak.synthesize(TELUGU + " " + TELUGU, "te")
    assert longer.shape[0] > 1.6 * espeak.synthesize(TELUGU, "te").shape[0]

    def f0(audio: np.ndarray) -> float:  # autocorrelation pitch of the loudest 100 ms
        n = 2205
        start = int(np.argmax(np.convolve(audio.astype(np.float64) ** 2, np.ones(n), "valid")))
        seg = audio[start : start + n].astype(np.float64)
        ac = np.correlate(seg, seg, "full")[n - 1 :]
        lo, hi = espeak.SAMPLE_RATE // 400, espeak.SAMPLE_RATE // 60
        return espeak.SAMPLE_RATE / (lo + int(np.argmax(ac[lo:hi])))

    assert f0(espeak.synthesize(ENGLISH, "en", pitch=90)) > 1.2 * f0(espeak.synthesize(ENGLISH, "en", pitch=10))


def test_lists_languages_and_variants():
    voices = espeak.list_voices()
    assert len(voices) > 100
    assert {"te", "hi", "en-us"} <= {v.language for v in voices}
    assert any(v.identifier == "gmw/en" for v in voices)  # "en" is accepted as the file name of British English
    espeak.engine().check_voice("en")
    assert {"f2", "m3", "klatt"} <= set(espeak.list_variants())
    assert espeak.espeak_version().startswith("1.")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"text": "", "voice": "te"}, ValueError, "`text` must be a non-empty string, got ''"),
        ({"text": b"hi", "voice": "te"}, TypeError, "`text` must be a non-empty string, got b'hi'"),
        ({"text": "hi", "voice": 3}, TypeError, "`voice` must be a non-empty string, got 3"),
        ({"text": "  \n", "voice": "en"}, ValueError, "`text` must be a non-empty str"),
        ({"text": "hi", "voice": "xx"}, ValueError, r"`voice` 'xx': eSpeak NG has no language 'xx'; available include"),
        ({"text": "hi", "voice": "te+nosuch"}, ValueError, r"unknown variant 'nosuch'; available include \["),
        ({"text": "hi", "voice": "en", "rate": 10}, ValueError, "`rate` must be >= 80, got 10"),
        ({"text": "hi", "voice": "en", "pitch": 1.5}, TypeError, "`pitch` must be an int, got 1.5"),
        ({"text": "hi", "voice": "en", "seed": "0"}, TypeError, "`seed` must be an int, got '0'"),
        ({"text": "hi", "voice": "en", "pitch_range": 100}, ValueError, "`pitch_range` must be <= 99, got 100"),
    ],
)
def test_clear_errors(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        espeak.synthesize(**kwargs)


def test_subprocess_synthesis_is_byte_identical(tmp_path: Path):
    def chunks(folder: Path) -> list[list[espeak.SynthesisJob]]:
        folder.mkdir()
        texts = [TELUGU, ENGLISH, "మీరు ఎలా ఉన్నారు?"]
        voices = ["te+m3", "en+f2", "te+klatt"]
        return [
            [espeak.SynthesisJob(text=t, voice=v, path=str(folder / f"{c}_{i}.wav"), seed=7) for i, (t, v) in
             enumerate(zip(texts, voices))]
            for c in range(2)
        ]  # fmt: skip

    def digests(folder: Path) -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.wav"))}

    one = espeak.synthesize_to_files(chunks(tmp_path / "one"), workers=1)
    two = espeak.synthesize_to_files(chunks(tmp_path / "two"), workers=2)
    assert one == two
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert len(digests(tmp_path / "one")) == 6
    # the same job in a second chunk of the same process history gives the same bytes as in the first chunk
    assert digests(tmp_path / "one")["0_0.wav"] == digests(tmp_path / "one")["1_0.wav"]
    audio, rate = sf.read(str(tmp_path / "one" / "0_0.wav"), dtype="int16")
    assert rate == 22050
    assert audio.shape[0] == one[0][0]
    assert sf.info(str(tmp_path / "one" / "0_0.wav")).subtype == "PCM_16"


def test_subprocess_failure_is_reported(tmp_path: Path):
    job = espeak.SynthesisJob(text="hello", voice="en+nosuch", path=str(tmp_path / "x.wav"))
    with pytest.raises(espeak.ESpeakError, match=r"chunk 0 failed.*unknown variant 'nosuch'"):
        espeak.synthesize_to_files([[job]])
    with pytest.raises(ValueError, match="`workers` must be >= 1, got 0"):
        espeak.synthesize_to_files([[job]], workers=0)
    with pytest.raises(TypeError, match="`workers` must be an int, got 2.0"):
        espeak.synthesize_to_files([[job]], workers=2.0)
    with pytest.raises(ValueError, match="`timeout` must be a finite number > 0, got 0"):
        espeak.synthesize_to_files([[job]], timeout=0)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import sys

    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # `import espeakng_loader` now raises ImportError
    monkeypatch.setattr(espeak, "_ENGINE", None)
    with pytest.raises(espeak.ESpeakError, match="needs the PyPI package `espeakng-loader`.*pip install"):
        espeak.synthesize("hello", "en")
    from lightning_stability.reference.data import SpeechCorpusDataModule

    with pytest.raises(espeak.ESpeakError, match="espeakng-loader"):
        SpeechCorpusDataModule(tmp_path, num_utterances=2, num_voices=1).prepare_data()
