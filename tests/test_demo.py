import json
import math

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
