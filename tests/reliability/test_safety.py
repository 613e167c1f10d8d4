"""Safety: checkpoints and caches are read with ``weights_only=True`` (a malicious pickle is refused, not executed),
no secret reaches a file (W&B keys come only from the environment), and cache folders are written atomically (a
killed corpus generation leaves no half corpus that a later run would use).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_stability.callbacks import SpectralNormInjection
from lightning_stability.reference.data import LatentPairDataModule, SpeechCorpusDataModule
from tests.helpers import FAULT_WARNINGS, make_trainer
from tests.reliability._stack import full_stack, loader, make_module, record_fault

pytestmark = FAULT_WARNINGS  # these tests inject faults: the guard's notices are expected

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "lightning_stability"


# ----------------------------------------------------------------------------------------------------------------------
# weights_only everywhere


def _torch_load_calls() -> list[tuple[str, int, ast.Call]]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if (name == "load" and "torch" in ast.unparse(f)) or name == "load_from_checkpoint":
                    calls.append((str(path.relative_to(REPO)), node.lineno, node))
    return calls


def test_every_torch_load_in_the_package_passes_weights_only():
    calls = _torch_load_calls()
    assert calls, "the scan found no torch.load at all: it is looking in the wrong place"
    for where, line, call in calls:
        keywords = {k.arg: k.value for k in call.keywords}
        assert "weights_only" in keywords, f"{where}:{line} {ast.unparse(call)}"
        value = keywords["weights_only"]
        # a literal True, or a parameter whose default is True (checked below through the public functions)
        assert (isinstance(value, ast.Constant) and value.value is True) or isinstance(value, ast.Name), where


class _Boom:
    """A pickle that would write a marker file when unpickled (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_spectral_norm_load_for_inference_refuses_a_malicious_checkpoint(tmp_path):
    marker = tmp_path / "pwned.txt"
    module = make_module("cascade")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": module.state_dict(), "extra": _Boom(marker)}, bad)
    injector = SpectralNormInjection("*.output_proj")
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        injector.load_for_inference(make_module("cascade"), bad)
    assert not marker.exists()


def test_latent_folder_refuses_a_malicious_tensor_file(tmp_path):
    marker = tmp_path / "pwned.txt"
    folder = tmp_path / "latents"
    folder.mkdir()
    good = {"source": torch.randn(8, 16), "target": torch.randn(8, 16)}
    for i in range(3):
        torch.save(good, folder / f"ok{i}.pt")
    torch.save({**good, "payload": _Boom(marker)}, folder / "evil.pt")
    dm = LatentPairDataModule(folder, latent_dim=8, segment_frames=8, batch_size=2, val_fraction=0.34)
    with pytest.raises(Exception, match="evil.pt") as info:
        dm.setup("fit")
    assert not marker.exists()
    assert "weights_only" in str(info.value) or "Unpickl" in repr(info.value.__cause__ or info.value)


def test_checkpoints_of_the_whole_stack_load_with_weights_only(tmp_path):
    """Every callback's state is plain data, so a run's checkpoint (and a resume from it) needs no unsafe unpickling."""
    module = make_module("cascade", {"nan_batch": {1}, "spike": {3}})
    stack = full_stack("cascade", tmp_path / "report")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    make_trainer(tmp_path, [*stack, ckpt], max_steps=4, enable_checkpointing=True).fit(module, loader("cascade"))
    files = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert len(files) == 2
    for f in files:
        data = torch.load(f, map_location="cpu", weights_only=True)
        assert {cb.state_key for cb in stack} <= set(data["callbacks"])
    resumed = make_module("cascade")
    trainer = make_trainer(tmp_path / "resume", full_stack("cascade", tmp_path / "r2"), max_steps=6)
    trainer.fit(resumed, loader("cascade"), ckpt_path=files[-1], weights_only=True)
    assert trainer.global_step == 6


# ----------------------------------------------------------------------------------------------------------------------
# secrets

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex characters, the shape of a real W&B key


def test_wandb_key_from_the_environment_reaches_no_file(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(project="reliability", save_dir=str(tmp_path / "wandb_run"), offline=True)
    module = make_module("codec", {"nan_batch": {1}})
    stack = full_stack("codec", tmp_path / "report")
    stack[4].log_to_wandb = True  # the report uploads its JSON and PNG to the run
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(
        tmp_path, [*stack, ckpt], max_steps=3, logger=logger, enable_checkpointing=True, log_every_n_steps=1
    )
    trainer.fit(module, loader("codec"))
    import wandb

    wandb.finish()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in files)
    assert (tmp_path / "report" / "stability_report.json").exists()
    assert any("wandb" in str(p) for p in files)
    leaks = []
    for p in files:
        data = p.read_bytes()
        if FAKE_KEY.encode() in data or FAKE_KEY[::-1].encode() in data:
            leaks.append(str(p.relative_to(tmp_path)))
    assert not leaks, leaks
    hparams = torch.load(sorted((tmp_path / "ckpt").glob("*.ckpt"))[-1], weights_only=True)["hyper_parameters"]
    assert FAKE_KEY not in json.dumps(hparams, default=str)


# ----------------------------------------------------------------------------------------------------------------------
# atomic caches

_KILLABLE_CORPUS = """
import sys, time
from lightning_stability.reference.data import SpeechCorpusDataModule
dm = SpeechCorpusDataModule(sys.argv[1], num_utterances=24, num_voices=2, generation_workers=1, sample_rate=8000)
real = dm._synthesize
def synthesize_then_hang(chunks):
    lengths = real(chunks)  # every wav is written into the temporary folder...
    open(sys.argv[2], "w").write("ready")
    time.sleep(600)  # ...and the process is killed before the manifest and the rename
    return lengths
dm._synthesize = synthesize_then_hang
dm.prepare_data()
"""


@pytest.mark.timeout(240)
def test_killed_corpus_generation_leaves_nothing_a_later_run_uses(tmp_path):
    cache = tmp_path / "cache"
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_CORPUS, str(cache), str(ready)], cwd=REPO, env=env, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 180
    try:
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "corpus generation never reached its synthesis"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    dm = SpeechCorpusDataModule(cache, num_utterances=24, num_voices=2, generation_workers=1, sample_rate=8000)
    temporaries = list(cache.glob(".tmp-*"))
    assert len(temporaries) == 1
    assert len(list((temporaries[0] / "wavs").glob("*.wav"))) == 24  # the killed run wrote every file...
    assert not dm.is_generated()  # ...and still nothing counts as a corpus
    assert not dm.corpus_dir.exists()
    dm.prepare_data()  # the next run regenerates, and removes the dead process's temporary folder
    assert dm.is_generated()
    assert not list(cache.glob(".tmp-*"))
    manifest = dm.manifest()
    assert len(manifest["utterances"]) == 24
    import soundfile as sf

    for u in manifest["utterances"]:
        info = sf.info(str(dm.corpus_dir / u["path"]))
        assert info.frames == u["num_samples"]
    record_fault("safety", "corpus", "SIGKILL during generation", "atomic cache", 1, survived=True)
