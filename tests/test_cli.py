import json

import pytest
import torch

from lightning_stability.cli import main
from lightning_stability.modules import CodecModule
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
