"""Train the reference speech codec with the stability kit, in plain Python (copy this file and edit it).

    python examples/train_codec.py                        # generated Telugu speech (eSpeak NG), ~6 min on 2 cores
    python examples/train_codec.py --audio-dir my_wavs/   # your own recordings (wav/flac/ogg, any rate)

It is what ``lightning-stability demo`` and ``lightning-stability fit --config configs/codec.yaml`` do: a SEANet +
residual-VQ codec (EnCodec's 24 kHz layout, 8 x 1024 codes = 6 kbps) with GradientGuard, AdaptiveLossWeight on the
mel term, ScaleFactorClamp, SignalMonitor and StabilityReport; then it encodes and decodes one file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import soundfile as sf
from lightning.pytorch.callbacks import ModelCheckpoint
from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

from lightning_stability.callbacks import (
    AdaptiveLossWeight,
    GradientGuard,
    ScaleFactorClamp,
    SignalMonitor,
    StabilityReport,
)
from lightning_stability.losses.spectral import mel_distance
from lightning_stability.reference.codec import CodecModule
from lightning_stability.reference.codec.recipe import DEMO_RECIPE
from lightning_stability.reference.data import AudioFolderDataModule, SpeechCorpusDataModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--audio-dir", type=Path, default=None, help="folder of your audio (default: eSpeak corpus)")
    parser.add_argument("--out", type=Path, default=Path("codec_run"))
    parser.add_argument("--max-steps", type=int, default=1000)
    args = parser.parse_args()

    sample_rate = 24000
    common = {"sample_rate": sample_rate, "segment_seconds": 0.5, "batch_size": 8, "loudness_lufs": -16.0}
    if args.audio_dir is not None:
        data = AudioFolderDataModule(args.audio_dir, on_error="skip", **common)
    else:
        data = SpeechCorpusDataModule(args.out / "speech_corpus", language="te", num_utterances=240, **common)

    # The demo's codec: EnCodec's 24 kHz layout, narrower so it trains on a CPU (DEMO_SIZE), with the output safety net
    # ScaleFactorClamp watches. The objective (losses, weights, correlation gates, DC block, lr) is CodecModule's
    # defaults: the recipe measured in docs/codec_demo_experiments.md. Pass any argument to change it.
    model = CodecModule(**DEMO_RECIPE)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        default_root_dir=args.out,
        val_check_interval=250,
        check_val_every_n_epoch=None,
        callbacks=[
            GradientGuard(),
            AdaptiveLossWeight("mel"),  # base 2.5 within [1, 5] (docs/design.md, post-mortem 1)
            ScaleFactorClamp(min_scale=0.7, max_scale=1.5),
            SignalMonitor(train_every_n_steps=50),
            StabilityReport(dirpath=args.out),
            ModelCheckpoint(dirpath=args.out / "checkpoints", save_last=True),
        ],
    )
    trainer.fit(model, datamodule=data)

    # Use the codec: codes [1, 8, frames] and the per-segment scale are what you would store or send.
    clip = data.clips("val")[0].path
    audio = data.load(clip)[None]  # [1, 1, T] at 24 kHz
    model.eval()
    codes, scale = model.encode(audio)
    recon = model.decode(codes, scale, length=audio.shape[-1])
    sf.write(args.out / "reconstruction.wav", recon[0, 0].numpy(), sample_rate)
    print(f"{clip}: {codes.shape[-1]} frames x {codes.shape[1]} codes at {model.bitrate / 1000:.1f} kbps")
    si_snr = scale_invariant_signal_noise_ratio(recon, audio).item()
    print(f"SI-SNR {si_snr:.2f} dB, mel distance {mel_distance(recon, audio, sample_rate).item():.3f}")


if __name__ == "__main__":
    main()
