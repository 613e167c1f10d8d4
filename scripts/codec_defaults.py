"""``CodecModule()`` with its defaults on a folder of recordings: the check behind the codec guide's "The module's
defaults on real speech".

    python scripts/codec_defaults.py DATA_DIR OUT_DIR STEPS [--seed S] [--codec '{"kwarg": value}']

Trains ``CodecModule(sample_rate=24000, seed=S)`` (EnCodec's size, the recipe's objective, no output safety net: no
factor can make up the level) for ``STEPS`` optimizer steps on ``DATA_DIR`` read as the demo reads ``--data`` (every
audio file under it, mono, 24 kHz, -16 LUFS, a seeded 10 % of the files held out, random 0.5 s crops, batch 8), no
callbacks, one torch thread; then reconstructs every held-out file whole with the demo's evaluation
(``evaluate_held_out``: global RMS ratio, mel distance, SI-SNR, PESQ, STOI, loudness error) and prints one
``RESULT {json}`` line, also written to ``OUT_DIR/result.json``.

It imports the codec and the data module by their public paths (``lightning_stability.modules``,
``lightning_stability.data``), which every release has, so the same script measures an older checkout too:
``PYTHONPATH=/path/to/old/checkout python scripts/codec_defaults.py ...``.

The recordings used in the guide are the Asterisk project's English prompts (one professional voice, 8 kHz, about
25 minutes), from Debian::

    apt-get download asterisk-core-sounds-en-wav && dpkg-deb -x asterisk-core-sounds-en-wav_*.deb asterisk
    DATA_DIR=asterisk/usr/share/asterisk/sounds/en_US_f_Allison
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

KEEP = ("num_utterances", "seconds", "si_snr_db", "mel_distance", "rms_ratio", "pesq", "stoi", "loudness_error_lu",
        "loudness_diff_lu")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="scripts/codec_defaults.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a folder of recordings (wav/flac/ogg, searched recursively)")
    parser.add_argument("out", type=Path, help="output folder (result.json, the first held-out file's wavs)")
    parser.add_argument("steps", type=int, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codec", default="{}", help="more CodecModule keyword arguments, as JSON")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"`data`: {args.data} is not a folder")
    if args.steps < 1:
        parser.error(f"`steps` must be >= 1, got {args.steps}")

    import lightning.pytorch as pl
    import torch

    from lightning_stability.data import AudioFolderDataModule
    from lightning_stability.demo import evaluate_held_out
    from lightning_stability.modules import CodecModule

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = AudioFolderDataModule(
        args.data, sample_rate=24000, segment_seconds=0.5, val_segment_seconds=1.0, batch_size=8, val_fraction=0.1,
        loudness_lufs=-16.0, seed=args.seed, on_error="skip", on_silent="skip",
    )  # fmt: skip
    kwargs = json.loads(args.codec)
    codec = CodecModule(sample_rate=24000, seed=args.seed, **kwargs)
    args.out.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=False, enable_model_summary=False, logger=False, enable_checkpointing=False,
        default_root_dir=args.out,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(codec, datamodule=datamodule)
    train_seconds = time.perf_counter() - t0
    results = evaluate_held_out(codec, datamodule, args.out, chunk_seconds=30.0, max_seconds=300.0)
    out = {key: results.get(key) for key in KEEP}
    out.update(
        steps=int(trainer.global_step),
        train_seconds=round(train_seconds, 1),
        seed=args.seed,
        codec_kwargs=kwargs,
        codec_module=sys.modules[type(codec).__module__].__file__,
        data=str(args.data),
    )
    print("RESULT", json.dumps(out))
    (args.out / "result.json").write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
