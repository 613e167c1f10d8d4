import json
import math
import re

import pytest
import soundfile as sf

from lightning_stability.cli import main


@pytest.mark.timeout(300)
def test_quick_demo_trains_reports_and_reconstructs(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    for line in ("SI-SNR", "mel distance (DAC)", "bitrate", "reconstruction", "stability report", "checkpoint"):
        assert line in printed, line
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["steps"] == 6
    assert metrics["num_utterances"] >= 1
    for key in ("si_snr_db", "mel_distance", "rms_ratio"):
        assert math.isfinite(metrics[key]), key
    assert metrics["bitrate_kbps"] == pytest.approx(2 * 5 * 75 / 1000)  # 2 stages x 32 codes at 75 Hz
    original, sr = sf.read(metrics["original_wav"])
    recon, sr2 = sf.read(metrics["reconstruction_wav"])
    assert sr == sr2 == 24000
    assert original.shape == recon.shape
    assert original.shape[0] > 24000 // 2  # a whole utterance, not a crop
    report = json.loads((out / "stability_report.json").read_text())
    callbacks = {source["callback"] for source in report["sources"].values()}
    assert {"GradientGuard", "AdaptiveLossWeight", "ScaleFactorClamp", "SignalMonitor"} <= callbacks
    assert (out / "stability_report.png").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "speech_corpus").is_dir()


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--max-steps", "0"]) == 2
    assert "`--max-steps`" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- --data DIR
METRIC_KEYS = (
    "num_utterances",
    "seconds",
    "si_snr_db",
    "mel_distance",
    "rms_ratio",
    "pesq",
    "stoi",
    "loudness_error_lu",
    "loudness_diff_lu",
    "skipped",
    "skipped_items",
    "metric_notes",
    "num_capped",
    "eval_max_seconds",
    "eval_chunk_seconds",
    "bitrate_kbps",
    "example_name",
    "original_wav",
    "reconstruction_wav",
    "data",
    "steps",
    "train_seconds",
    "checkpoint",
    "report_json",
    "config",
)


def _recordings(folder, n=6, seconds=1.5, rate=16000):
    """``n`` speech-like wav files (a gliding harmonic voice with syllables) at ``rate``, in two sub-folders."""
    from tests.metrics.test_perceptual import voiced

    for i in range(n):
        path = folder / ("a" if i % 2 else "b") / f"rec{i}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, voiced(seconds + 0.25 * i, rate, seed=i).numpy(), rate, subtype="PCM_16")
    return folder


@pytest.mark.timeout(300)
def test_quick_demo_on_a_folder_of_recordings_writes_every_metric(tmp_path, capsys):
    data = _recordings(tmp_path / "recordings")
    (data / "broken.wav").write_bytes(b"RIFF but not really a wav file")
    out = tmp_path / "demo"
    with pytest.warns(UserWarning, match="skipping .*broken.wav"):
        code = main(["demo", "--quick", "--data", str(data), "--val-fraction", "0.34", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for line in ("held-out files", "PESQ (wide-band)", "STOI", "loudness error", "unusable skipped"):
        assert line in printed, line
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    missing = [k for k in METRIC_KEYS if k not in metrics]
    assert not missing, missing
    assert metrics["data"]["kind"] == "folder"
    assert (metrics["data"]["train_files"], metrics["data"]["val_files"]) == (3, 3)  # ceil(0.34 * 6) held out
    assert metrics["data"]["skipped_files"] == [str(data / "broken.wav")]
    assert metrics["data"]["sample_rates"] == [16000]
    assert metrics["data"]["cached_in_memory"] is True  # 10 s of audio: far under CACHE_MAX_SECONDS
    assert metrics["num_utterances"] == 3
    for key in ("si_snr_db", "mel_distance", "rms_ratio", "pesq", "stoi", "loudness_error_lu", "loudness_diff_lu"):
        assert math.isfinite(metrics[key]), key
    assert 1.0 <= metrics["pesq"] <= 4.65
    assert metrics["loudness_error_lu"] >= abs(metrics["loudness_diff_lu"])
    assert metrics["skipped"] == {"pesq": 0, "stoi": 0, "loudness": 0}
    assert metrics["skipped_items"] == {"pesq": [], "stoi": [], "loudness": []}
    assert "resampled from 24000 Hz to 16 kHz" in metrics["metric_notes"]["pesq"]
    # the held-out files are evaluated whole, at the model's rate
    held = [p for p in data.rglob("rec*.wav") if p.relative_to(data).as_posix() in {metrics["example_name"]}]
    assert len(held) == 1
    original, sr = sf.read(metrics["original_wav"])
    assert sr == 24000
    assert len(original) == pytest.approx(sf.info(held[0]).duration * 24000, abs=2)
    assert (out / "stability_report.json").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert not (out / "speech_corpus").exists()  # no corpus was generated


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda d: d / "missing", r"`--data` '.*missing' does not exist"),
        (lambda d: (d / "f.txt").write_text("x") and d / "f.txt", r"`--data` '.*f.txt' is not a folder"),
        (lambda d: d, r"no audio files under `root` '.*'"),
        (lambda d: _recordings(d, n=1), r"cannot hold out .* it needs at least 2 usable files"),
        (lambda d: (d / "x.wav").write_bytes(b"junk") and d, r"every file was skipped"),
    ],
    ids=["missing", "not-a-folder", "no-audio", "one-file", "all-corrupt"],
)
@pytest.mark.filterwarnings("ignore:AudioFolderDataModule. skipping:UserWarning")  # all-corrupt: each file announced
def test_demo_data_bad_input_gets_a_message_naming_the_path_not_a_traceback(tmp_path, capsys, make, match):
    folder = tmp_path / "in"
    folder.mkdir()
    path = make(folder)
    assert main(["demo", "--quick", "--data", str(path), "--out", str(tmp_path / "out")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # the message, not an exception, ends the output
    assert last.startswith("lightning-stability demo: `--data` "), last
    assert re.search(match, last), last


def test_demo_rejects_a_val_fraction_without_held_out_files(tmp_path, capsys):
    assert main(["demo", "--quick", "--data", str(tmp_path), "--val-fraction", "0"]) == 2
    assert "`--val-fraction` must be in (0, 1)" in capsys.readouterr().err


def test_long_recordings_are_reconstructed_in_chunks_and_capped(tmp_path):
    import torch

    from lightning_stability.reference.codec.demo import DemoConfig, _codec, reconstruct

    codec = _codec(DemoConfig.quick_config()).eval()
    audio = 0.1 * torch.randn(1, 1, 24000 * 3 + 123)
    calls = []
    encode = codec.encode
    codec.encode = lambda x, *a, **k: calls.append(x.shape[-1]) or encode(x, *a, **k)
    whole = reconstruct(codec, audio, None)
    assert calls == [audio.shape[-1]]
    calls.clear()
    chunked = reconstruct(codec, audio, 24000)
    assert chunked.shape == whole.shape == audio.shape
    assert len(calls) == 4  # ceil(72123 / 24000) near-equal chunks, no tiny tail
    assert all(c % codec.hop_length == 0 for c in calls[:-1])
    assert max(calls) <= 24000
    assert min(calls) > 24000 // 2
    assert torch.isfinite(chunked).all()


def test_held_out_files_longer_than_the_cap_are_cut_and_counted(tmp_path, monkeypatch):
    import lightning_stability.reference.codec.demo as demo

    config = demo.DemoConfig.quick_config(data=str(_recordings(tmp_path / "rec", n=4)), val_fraction=0.5)
    datamodule = demo._datamodule(config)
    monkeypatch.setattr(demo, "CACHE_MAX_SECONDS", 1.0)  # a "long" collection: read crop by crop, not cached
    info = demo.prepare_folder(datamodule)
    assert info["cached_in_memory"] is False
    assert (info["train_files"], info["val_files"]) == (2, 2)
    durations = [c.duration for c in datamodule.clips("val")]  # 1.5 to 2.25 s
    cap = min(durations) - 0.25
    results = demo.evaluate_held_out(demo._codec(config), datamodule, tmp_path, max_seconds=cap, chunk_seconds=0.5)
    assert results["num_capped"] == 2
    assert results["seconds"] == pytest.approx(2 * cap, abs=1e-3)
    assert sf.info(results["original_wav"]).duration == pytest.approx(cap, abs=1e-4)
    whole = demo.evaluate_held_out(demo._codec(config), datamodule, tmp_path, max_seconds=None)
    assert whole["num_capped"] == 0
    assert whole["seconds"] == pytest.approx(sum(durations), abs=1e-3)


def test_an_item_a_measure_cannot_score_is_named_with_the_reason():
    import torch

    from lightning_stability.reference.codec.demo import _quality
    from tests.metrics.test_perceptual import voiced

    short = voiced(0.2, 24000)[None, None]  # under PESQ's 0.25 s and one 400 ms BS.1770 block
    scores = _quality(short, short, 24000)
    assert math.isnan(scores["pesq"][0])
    assert scores["pesq"][1].startswith("shorter than PESQ's minimum of 0.25 s")
    assert scores["loudness"][1].startswith("shorter than one BS.1770 block")
    value, why = _quality(voiced(1.0, 24000)[None, None], voiced(1.0, 24000)[None, None], 24000)["pesq"]
    assert why is None
    assert value == pytest.approx(4.644, abs=1e-3)
    assert torch.is_tensor(short)
