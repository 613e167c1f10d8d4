"""Fixed-budget experiment on the demo codec (the harness behind ``docs/codec_demo_experiments.md``).

    python scripts/codec_experiment.py NAME STEPS ['{"codec": "kwargs"}'] ['{"datamodule": "kwargs"}'] [noq]
        [pre-recipe] [threads=N]

Trains the demo's ``CodecModule`` (``reference/codec/recipe.py``'s ``DEMO_RECIPE``; with ``pre-recipe`` the objective
the documented experiments started from, ``PRE_RECIPE``; overridden by the JSON codec kwargs) for
``STEPS`` optimizer steps on the eSpeak NG Telugu corpus in ``$CODEC_EXP_CORPUS`` (default ``speech_corpus``; made if
missing), no callbacks, then reconstructs every held-out utterance and prints one ``RESULT {json}`` line (SI-SNR, DAC
mel distance, output DC, RMS ratio, cross-correlation peak lag on 4 utterances, training time), also appended to
``$CODEC_EXP_RESULTS`` (default ``codec_experiments.jsonl``). ``noq`` bypasses the quantizer (an autoencoder).
"""

import json
import math
import os
import sys
import time
import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio as si_snr

from lightning_stability.losses.spectral import mel_distance
from lightning_stability.reference.codec import CodecModule
from lightning_stability.reference.codec.quantize import QuantizedResult
from lightning_stability.reference.codec.recipe import DEMO_RECIPE
from lightning_stability.reference.data import SpeechCorpusDataModule

#: The objective the experiments of docs/codec_demo_experiments.md started from (their JSON overrides apply to it).
PRE_RECIPE = {
    "threshold_ema_dead_code": 0.05, "dead_code_usage_ratio": None,
    "loss_weights": {"mel": 2.5, "l1": 0.2, "rms": 1.0, "vq": 1.0}, "rms_correlation_gate": None,
    "l1_gain_gate": None, "remove_dc": False,
}  # fmt: skip

warnings.filterwarnings("ignore")


class _Identity(torch.nn.Module):
    """Stands in for the quantizer: ``quantized = z``, no codes, zero losses."""

    def forward(self, z, n_q=None):
        zero = z.new_zeros(())
        return QuantizedResult(
            quantized=z,
            codes=torch.zeros(z.shape[0], 1, z.shape[-1], dtype=torch.long),
            codebook_loss=zero,
            commitment_loss=zero,
            stage_codebook_losses=zero[None],
            stage_commitment_losses=zero[None],
            n_q=1,
            metrics={"perplexity": zero[None]},
        )


def main(argv: list[str]) -> None:
    name, steps = argv[0], int(argv[1])
    codec_kw = json.loads(argv[2]) if len(argv) > 2 and argv[2] else {}
    dm_kw = json.loads(argv[3]) if len(argv) > 3 and argv[3] else {}
    flags = argv[4:]
    noq = "noq" in flags
    threads = int(dict(a.split("=") for a in flags if "=" in a).get("threads", 1))
    torch.set_num_threads(threads)
    pl.seed_everything(0, verbose=False)
    # the recipe (CodecModule's defaults at the demo's size); `pre-recipe`: the objective the experiments of
    # docs/codec_demo_experiments.md started from (before issue 13), so their commands reproduce
    pre = PRE_RECIPE if "pre-recipe" in flags else {}
    base = {**DEMO_RECIPE, "kmeans_iters": 10, "seed": 0, **pre}
    codec = CodecModule(**{**base, **codec_kw})
    if noq:
        codec.quantizer = _Identity()
    dm = SpeechCorpusDataModule(
        os.environ.get("CODEC_EXP_CORPUS", "speech_corpus"),
        **{
            "language": "te", "num_utterances": 240, "num_voices": 8, "sample_rate": 24000, "segment_seconds": 0.5,
            "val_segment_seconds": 1.0, "batch_size": 8, "val_fraction": 0.1, "loudness_lufs": -16.0, "seed": 0,
            "cache_audio": True, **dm_kw,
        },
    )  # fmt: skip
    dm.prepare_data()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(codec, datamodule=dm)
    train_s = time.perf_counter() - t0
    codec.eval()
    snrs, mels, dcs, lags, sq_pred, sq_target = [], [], [], [], 0.0, 0.0
    with torch.no_grad():
        for utt in dm.utterances("val"):
            audio = dm.load(utt.path)[None]
            if noq:
                recon = codec(audio).audio
            else:
                codes, scale = codec.encode(audio)
                recon = codec.decode(codes, scale, length=audio.shape[-1])
            snrs.append(float(si_snr(recon, audio)))
            mels.append(float(mel_distance(recon, audio, 24000)))
            dcs.append(float(recon.mean()))
            sq_pred += float(recon.pow(2).sum())
            sq_target += float(audio.pow(2).sum())
            if len(lags) < 4:
                x, y = audio[0, 0].numpy(), recon[0, 0].numpy()
                n, window = len(x), 200
                cc = np.correlate(y - y.mean(), x, mode="full")[n - 1 - window : n + window]
                lags.append(int(np.argmax(np.abs(cc))) - window)
    result = {
        "name": name, "steps": steps, "si_snr": round(float(np.mean(snrs)), 2), "mel": round(float(np.mean(mels)), 3),
        "dc": round(float(np.mean(dcs)), 4), "rms_ratio": round(math.sqrt(sq_pred / sq_target), 3), "lags": lags,
        "train_s": round(train_s, 1), "s_per_step": round(train_s / steps, 3), "ck": codec_kw, "dk": dm_kw,
        "noq": noq, "threads": threads,
    }  # fmt: skip
    print("RESULT", json.dumps(result))
    with open(os.environ.get("CODEC_EXP_RESULTS", "codec_experiments.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
