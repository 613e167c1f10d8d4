import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_stability.cli import main
from lightning_stability.reference.codec import CodecModule
from tests.conftest import REPO_ROOT


@pytest.mark.timeout(300)
def test_fit_with_the_codec_config(tmp_path):
    # the README's LightningCLI command, run in tmp_path (the corpus cache and logs are relative to the cwd)
    assert main(["fit", "--config", str(REPO_ROOT / "configs" / "codec.yaml"), "--trainer.max_steps", "2"]) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    report = json.loads((run / "stability_report.json").read_text())
    assert report["status"] == "finished"
    assert report["global_step"] == 2
    callbacks = {source["callback"] for source in report["sources"].values()}
    assert {"GradientGuard", "AdaptiveLossWeight", "ScaleFactorClamp", "SignalMonitor"} <= callbacks
    ckpt = run / "checkpoints" / "last.ckpt"
    codec = CodecModule.load_from_checkpoint(ckpt)
    assert codec.bitrate == 6000.0
    assert codec.loss_weights["mel"] == 2.5
    assert (tmp_path / "speech_corpus").is_dir()
    audio = torch.randn(1, 1, 3200) * 0.1
    codes, scale = codec.eval().encode(audio)
    assert codes.shape == (1, 8, 10)
    assert torch.isfinite(codec.decode(codes, scale)).all()


def test_fit_config_errors_are_reported_by_the_cli(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO_ROOT / "configs" / "codec.yaml"), "--model.init_args.n_q", "zero"])
    assert "n_q" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- discoverability
def test_help_lists_each_subcommand_with_a_line_and_points_to_the_docs(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "usage: lightning-stability {fit,validate,demo} [options]"
    for command in ("fit", "validate", "demo"):
        (line,) = [line for line in lines if line.startswith(f"  {command} ")]
        assert len(line.split(None, 1)[1]) > 20  # a description, not just the name
    assert "docs/getting-started.md" in out
    # `test` and `predict` would fail on the package's datamodules (no test or predict split): not offered
    assert "test" not in lines[0]
    assert "predict" not in out


def test_an_unknown_or_unsupported_command_names_the_ones_that_exist(capsys):
    assert main(["predict"]) == 2
    err = capsys.readouterr().err
    assert "'predict'" in err
    assert "fit, validate, demo" in err


def _wav_folder(root, n=6, sr=8000):
    import soundfile as sf

    from tests._helpers_codec import chirps

    root.mkdir()
    for i, clip in enumerate(chirps(n, length=4096, sr=sr)):
        sf.write(root / f"clip{i}.wav", clip[0].numpy(), sr)
    return root


TINY_CODEC_YAML = """\
model:
  class_path: CodecModule
  init_args:
    sample_rate: 8000
    n_filters: 4
    ratios: [4, 4]
    dimension: 16
    lstm: 0
    n_q: 2
    codebook_size: 16
    kmeans_iters: 2
    mel_window_lengths: [64, 128]
    mel_n_mels: [10, 20]
    quality_metrics: null
data:
  class_path: AudioFolderDataModule
  init_args:
    root: {root}
    sample_rate: 8000
    segment_seconds: 0.128
    batch_size: 2
    val_fraction: 0.34
trainer:
  accelerator: cpu
  max_steps: 2
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: SignalMonitor
    - class_path: StabilityReport
"""


@pytest.mark.timeout(300)
def test_short_class_names_in_yaml_and_on_the_command_line(tmp_path, monkeypatch, recwarn):
    # `class_path: CodecModule` / `SignalMonitor` in YAML and `--trainer.callbacks+=GradientGuard` on the command line
    # resolve to the package's classes; a real command line in sys.argv draws no "args parameter" warning
    root = _wav_folder(tmp_path / "audio")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_CODEC_YAML.format(root=root))
    monkeypatch.setattr("sys.argv", ["lightning-stability", "fit", "--config", str(config)])
    argv = ["fit", "--config", str(config), "--trainer.callbacks+=GradientGuard", "--trainer.callbacks.zscore=3.0"]
    assert main(argv) == 0
    assert not [w for w in recwarn if "args parameter" in str(w.message)]
    run = tmp_path / "lightning_logs" / "version_0"
    saved = (run / "config.yaml").read_text()  # LightningCLI's own dump of what it parsed
    for path in (
        "lightning_stability.reference.codec.CodecModule",
        "lightning_stability.reference.data.AudioFolderDataModule",
        "lightning_stability.callbacks.SignalMonitor",
        "lightning_stability.callbacks.StabilityReport",
        "lightning_stability.callbacks.GradientGuard",
    ):
        assert f"class_path: {path}" in saved
    assert "zscore: 3.0" in saved
    report = json.loads((run / "stability_report.json").read_text())
    assert report["global_step"] == 2
    assert {s["callback"] for s in report["sources"].values()} >= {"GradientGuard", "SignalMonitor"}


def test_model_and_data_by_short_name_on_the_command_line(tmp_path):
    root = _wav_folder(tmp_path / "audio")
    argv = [
        "validate",
        "--model=CodecModule",
        "--model.sample_rate=8000",
        "--model.n_filters=4",
        "--model.ratios=[4, 4]",
        "--model.dimension=16",
        "--model.lstm=0",
        "--model.n_q=2",
        "--model.codebook_size=16",
        "--model.mel_window_lengths=[64, 128]",
        "--model.mel_n_mels=[10, 20]",
        "--model.quality_metrics=null",
        "--data=AudioFolderDataModule",
        f"--data.root={root}",
        "--data.sample_rate=8000",
        "--data.segment_seconds=0.128",
        "--data.val_fraction=0.34",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--seed_everything=0",
    ]
    assert main(argv) == 0
    saved = (tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text()
    assert "class_path: lightning_stability.reference.codec.CodecModule" in saved


def test_fit_help_lists_the_package_classes_in_a_subprocess(tmp_path):
    # the one subprocess test: the real command line, as a user types it (sys.argv is the arguments)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_stability.cli", "fit", "--help"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lightning-stability [options] fit")
    known = "".join(proc.stdout.split())  # the help wraps lists of known subclasses, long names mid-word
    for path in (
        "lightning_stability.callbacks.GradientGuard",
        "lightning_stability.callbacks.AdaptiveLossWeight",
        "lightning_stability.callbacks.SignalMonitor",
        "lightning_stability.reference.codec.CodecModule",
        "lightning_stability.reference.cascade.CascadeTransformerModule",
        "lightning_stability.reference.data.SpeechCorpusDataModule",
    ):
        assert path in known
    assert "args parameter" not in proc.stderr
    assert "{fit,validate,test,predict}" not in proc.stdout


def test_the_getting_started_page_shows_the_real_help(capsys):
    main(["--help"])
    page = (REPO_ROOT / "docs" / "getting-started.md").read_text()
    assert f"$ lightning-stability --help\n{capsys.readouterr().out}```" in page
