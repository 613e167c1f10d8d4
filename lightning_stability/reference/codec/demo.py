"""``lightning-stability demo``: the main job. Train a small speech codec on generated Telugu speech (or on your own
recordings with ``--data DIR``), with the kit.

What it does, end to end, on a CPU-only machine:

1. generates (or reuses) an eSpeak NG speech corpus with
   :class:`~lightning_stability.reference.data.SpeechCorpusDataModule` (Telugu by default; ``--language en`` for
   English), loudness-normalised to -16 LUFS as DAC; or, with ``--data DIR``, reads every wav/flac/ogg file under
   ``DIR`` with :class:`~lightning_stability.reference.data.AudioFolderDataModule` (same -16 LUFS normalisation,
   ``val_fraction`` of the files held out, unreadable or silent files skipped with a warning naming them);
2. trains a small :class:`~lightning_stability.reference.codec.CodecModule` (EnCodec's 24 kHz layout: hop 320,
   75 frames/s, 8 x 1024 codes = 6 kbps; narrower convolutions so it trains on 2 CPU cores) with ``GradientGuard``,
   ``AdaptiveLossWeight`` on the ``mel`` term, ``ScaleFactorClamp``, ``SignalMonitor``, ``CodebookMonitor``,
   ``AdversarialBalanceMonitor`` and ``StabilityReport``, a
   progress bar, CSV logs and a checkpoint;
3. evaluates the trained codec on the held-out utterances or files (whole, not crops; files longer than
   ``eval_max_seconds`` are evaluated on their first ``eval_max_seconds``, and the codec runs over
   ``eval_chunk_seconds`` chunks so memory stays bounded whatever the length): SI-SNR, DAC's mel distance, RMS ratio,
   wide-band PESQ (P.862.2, both signals resampled to 16 kHz as it requires), STOI (pystoi, which resamples to its
   native 10 kHz), the BS.1770 loudness error in LU, bitrate; writes the original and the reconstruction of one
   held-out item as wav files, the numbers as ``metrics.json``, and prints where everything went.

``--quick`` is a seconds-long smoke version (tiny corpus and model, a few steps) used by the tests.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_stability.reference.codec.module import DEFAULT_CORRELATION_GATE, DEFAULT_LOSS_WEIGHTS
from lightning_stability.reference.codec.recipe import DEMO_SIZE

#: The demo's objective, ``CodecModule``'s default weights (kept under this name; one owner: the module).
DEMO_LOSS_WEIGHTS: dict[str, float] = dict(DEFAULT_LOSS_WEIGHTS)
#: The correlation gate of the ``rms`` term and gain-invariant ``l1`` (``CodecModule``'s default).
DEMO_CORRELATION_GATE: tuple[float, float] = DEFAULT_CORRELATION_GATE

__all__ = [
    "DEMO_CORRELATION_GATE",
    "DEMO_LOSS_WEIGHTS",
    "build_callbacks",
    "check_data_folder",
    "codebook_health",
    "DemoConfig",
    "DemoInputError",
    "evaluate_held_out",
    "held_out_items",
    "HeldOutItem",
    "main",
    "prepare_folder",
    "reconstruct",
    "run_demo",
    "run_demo_cli",
    "scale_factor_summary",
]


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults are the full run (about 6 minutes on 2 busy CPU cores)."""

    out: str = "demo_output"  # where checkpoints, logs, the report, wavs and metrics.json go
    cache_dir: str | None = None  # speech corpus cache (default: <out>/speech_corpus)
    data: str | None = None  # a folder of the user's recordings instead of the generated corpus
    val_fraction: float = 0.1  # share of the files held out with ``data`` (the corpus holds out voices)
    language: str = "te"  # eSpeak NG language of the corpus
    num_utterances: int = 240  # corpus size (about 10 % held out for validation/evaluation)
    num_voices: int = 8  # corpus speakers (eSpeak variants, pitches)
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8
    segment_seconds: float = 0.5  # training crop length
    # the model's size: the recipe's DEMO_SIZE (lightning_stability/reference/codec/recipe.py)
    sample_rate: int = DEMO_SIZE["sample_rate"]
    n_filters: int = DEMO_SIZE["n_filters"]  # SEANet width (EnCodec: 32); 8 keeps a step around 0.3 s on 2 cores
    lstm: int = DEMO_SIZE["lstm"]  # LSTM layers in the bottleneck (EnCodec: 2)
    n_q: int = DEMO_SIZE["n_q"]  # 8 x 1024 codes at 75 Hz = 6 kbps (EnCodec's 6 kbps setting)
    codebook_size: int = DEMO_SIZE["codebook_size"]
    # None: CodecModule's default, the recipe's (Moshi's dead-code rule at 0.1; lr 1e-3 for a 10-minute run)
    dead_code_usage_ratio: float | None = None
    lr: float | None = None
    val_every_n_steps: int = 250
    # Held-out evaluation of whole files: the codec runs over chunks of this length (each its own EnCodec segment
    # with its own scale), so a long recording never holds more than one chunk's activations in memory ...
    eval_chunk_seconds: float = 30.0
    # ... and only the first this-many seconds of a longer file are evaluated (PESQ alone costs ~65 ms per second of
    # audio on a CPU; None = the whole file). The corpus utterances (2-6 s) are never cut.
    eval_max_seconds: float | None = 300.0
    seed: int = 0
    # torch CPU threads. 1 by default: the demo model's convolutions are too small to gain from more, and measured on
    # a busy 2-core machine 2 threads cost 1.06 s of CPU per step against 0.25 s with one (oversubscription).
    threads: int | None = 1
    progress: bool = True
    quick: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # more CodecModule keyword arguments

    @classmethod
    def quick_config(cls, **overrides: Any) -> DemoConfig:
        """A seconds-long version: 12 utterances, a tiny model, 6 steps."""
        base = {
            "num_utterances": 12,
            "num_voices": 2,
            "max_steps": 6,
            "batch_size": 2,
            "segment_seconds": 0.25,
            "n_filters": 2,
            "lstm": 0,
            "n_q": 2,
            "codebook_size": 32,
            "val_every_n_steps": 3,
            "progress": False,
            "quick": True,
        }
        base.update(overrides)
        return cls(**base)


def _codec(config: DemoConfig):
    """The demo's ``CodecModule``: :func:`~lightning_stability.reference.codec.recipe.demo_codec` at the config's
    size. The objective (losses, weights, gates, DC block) is ``CodecModule``'s defaults: the recipe measured in
    ``docs/codec_demo_experiments.md`` (held-out RMS ratio 1.00 at 1000 steps, factor at a bound 3.5 % of the last
    quarter, SI-SNR 5.2 dB, mel distance 3.36)."""
    from lightning_stability.reference.codec.recipe import demo_codec

    kwargs = {
        "sample_rate": config.sample_rate,
        "n_filters": config.n_filters,
        "lstm": config.lstm,
        "n_q": config.n_q,
        "codebook_size": config.codebook_size,
        "kmeans_iters": 3 if config.quick else 10,
        "seed": config.seed,
    }
    if config.dead_code_usage_ratio is not None:
        kwargs["dead_code_usage_ratio"] = config.dead_code_usage_ratio
    if config.lr is not None:
        kwargs["lr"] = config.lr
    kwargs.update(config.extra)
    return demo_codec(**kwargs)


class DemoInputError(RuntimeError):
    """The demo's input (``--data`` folder, arguments) cannot be used; the message names the path or argument."""


#: Keep decoded recordings in memory when they total at most this long (30 min at 24 kHz float32: about 170 MB).
CACHE_MAX_SECONDS = 1800.0


def _datamodule(config: DemoConfig):
    from lightning_stability.reference.data import AudioFolderDataModule, SpeechCorpusDataModule

    if config.data is not None:
        return AudioFolderDataModule(
            config.data,
            sample_rate=config.sample_rate,
            segment_seconds=config.segment_seconds,
            val_segment_seconds=1.0,
            batch_size=config.batch_size,
            val_fraction=config.val_fraction,
            loudness_lufs=-16.0,  # as the corpus: DAC's level, and what the demo's recipe was tuned at
            seed=config.seed,
            on_error="skip",  # a corrupt file among many is skipped with a warning naming it (listed in metrics.json)
            on_silent="skip",
        )
    cache = Path(config.cache_dir) if config.cache_dir else Path(config.out) / "speech_corpus"
    return SpeechCorpusDataModule(
        cache,
        language=config.language,
        num_utterances=config.num_utterances,
        num_voices=config.num_voices,
        sample_rate=config.sample_rate,
        segment_seconds=config.segment_seconds,
        val_segment_seconds=1.0,
        batch_size=config.batch_size,
        val_fraction=0.1,
        loudness_lufs=-16.0,
        seed=config.seed,
        cache_audio=True,
    )


def build_callbacks(config: DemoConfig, out: Path) -> list:
    """The stability kit as the demo configures it, plus a checkpoint and (unless quick) a progress bar."""
    from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

    from lightning_stability.callbacks import (
        AdaptiveLossWeight,
        AdversarialBalanceMonitor,
        CodebookMonitor,
        GradientGuard,
        ScaleFactorClamp,
        SignalMonitor,
        StabilityReport,
    )

    warmup = max(1, min(100, config.max_steps // 10))
    callbacks = [
        GradientGuard(),
        # docs/design.md, post-mortem 1: base 2.5, bounds [1, 5] (the controller's defaults).
        AdaptiveLossWeight("mel", warmup_steps=warmup),
        ScaleFactorClamp(),
        SignalMonitor(train_every_n_steps=max(1, min(50, config.max_steps // 20)), log_media=False),
        # code usage per RVQ level, and the GAN's balance when the codec trains adversarially (silent otherwise)
        CodebookMonitor(every_n_steps=50),  # a collapse needs 3 checks: 150 batches
        AdversarialBalanceMonitor(),
        StabilityReport(dirpath=out, warmup_steps=warmup),
        ModelCheckpoint(dirpath=out / "checkpoints", filename="codec-{step}", save_last=True),
    ]
    if config.progress:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    return callbacks


@dataclass(frozen=True)
class HeldOutItem:
    """One held-out recording the demo evaluates: its file, a display name and (for the corpus) text and voice."""

    path: Path
    name: str
    text: str | None = None
    voice: str | None = None


def held_out_items(datamodule) -> list[HeldOutItem]:
    """The held-out utterances of a :class:`SpeechCorpusDataModule` or files of an :class:`AudioFolderDataModule`."""
    if hasattr(datamodule, "utterances"):  # the generated corpus: utterances with text and voice
        return [HeldOutItem(u.path, u.id, u.text, u.voice) for u in datamodule.utterances("val")]
    root = Path(datamodule.root)
    items = []
    for clip in datamodule.clips("val"):
        try:
            name = str(Path(clip.path).relative_to(root))
        except ValueError:
            name = str(clip.path)
        items.append(HeldOutItem(Path(clip.path), name))
    return items


def reconstruct(codec, audio, chunk_samples: int | None = None, usage=None):
    """``codec.encode`` then ``decode`` of ``audio [B, C, T]``, over chunks of at most ``chunk_samples`` samples.

    The length is split into ``n = ceil(T / chunk_samples)`` near-equal chunks (multiples of the hop; no tiny tail),
    each encoded as its own segment (with its own EnCodec scale) and decoded; the pieces are concatenated. Peak
    memory is one chunk's activations whatever ``T`` is. ``None``: one piece. ``usage`` (a
    :class:`~lightning_stability.metrics.CodebookUsage`), when given, counts the codes.
    """
    import torch

    length = audio.shape[-1]
    hop = int(getattr(codec, "hop_length", 1))
    if chunk_samples is None or length <= chunk_samples:
        sizes = [length]
    else:
        n = math.ceil(length / chunk_samples)
        size = math.ceil(length / n / hop) * hop
        sizes = [min(size, length - start) for start in range(0, length, size)]
    pieces, start = [], 0
    with torch.no_grad():
        for size in sizes:
            x = audio[..., start : start + size]
            codes, scale = codec.encode(x)
            if usage is not None:
                usage.update(codes)
            pieces.append(codec.decode(codes, scale, length=size))
            start += size
    return torch.cat(pieces, dim=-1)


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _quality(recon, audio, sample_rate: int) -> dict[str, tuple[float, str | None]]:
    """One item's PESQ, STOI and signed loudness error as ``(value, why not)``: ``(nan, reason)`` where the measure has
    no score for it, ``(nan, "missing: ...")`` where its package is not installed."""
    from lightning_stability.metrics.perceptual import SpeechQualityError, loudness_error, stoi, wideband_pesq

    scores: dict[str, tuple[float, str | None]] = {}
    for key, fn in (
        ("pesq", lambda: wideband_pesq(recon, audio, sample_rate)),
        ("stoi", lambda: stoi(recon, audio, sample_rate)),
        ("loudness", lambda: loudness_error(recon, audio, sample_rate, signed=True)),
    ):
        try:
            scores[key] = (float(fn().mean()), None)
        except SpeechQualityError as err:
            scores[key] = (math.nan, err.reason)
        except ModuleNotFoundError as err:
            scores[key] = (math.nan, f"missing: {err}")
    return scores


def evaluate_held_out(
    codec,
    datamodule,
    out: Path,
    max_utterances: int | None = None,
    *,
    chunk_seconds: float | None = 30.0,
    max_seconds: float | None = None,
) -> dict[str, Any]:
    """Reconstruct every held-out utterance (or file) and measure it; write the first one's original and reconstruction.

    Each item is evaluated whole (up to its first ``max_seconds``; ``None`` = all of it) and run through the codec in
    ``chunk_seconds`` chunks (see :func:`reconstruct`). Metrics: mean SI-SNR (dB), mean DAC mel distance, the global RMS
    ratio (all held-out samples), mean wide-band PESQ (P.862.2 after resampling to 16 kHz), mean STOI (pystoi at its
    10 kHz), mean loudness error ``|L(recon) - L(original)|`` and mean signed difference (LU, BS.1770 via
    pyloudnorm). A measure that cannot score an item (e.g. PESQ on under 0.25 s) skips it, counts it in ``skipped``
    and names it with the reason in ``skipped_items``; a missing package leaves the value ``None`` with the reason in
    ``metric_notes``.
    """
    import soundfile as sf
    import torch
    from torchmetrics.functional.audio import scale_invariant_signal_noise_ratio

    from lightning_stability.losses.spectral import mel_distance

    items = held_out_items(datamodule)
    if max_utterances is not None:
        items = items[:max_utterances]
    if not items:
        raise RuntimeError("nothing is held out to evaluate (val_fraction is 0?)")
    from lightning_stability.metrics.codebook import CodebookUsage

    codec = codec.eval().cpu()
    usage = CodebookUsage(codec.quantizer.n_q, codec.quantizer.codebook_size)
    rate = codec.sample_rate
    cap = None if max_seconds is None else round(max_seconds * rate)
    chunk = None if chunk_seconds is None else round(chunk_seconds * rate)
    si_snr, mel, sq_pred, sq_target, seconds, capped = [], [], 0.0, 0.0, 0.0, 0
    quality: dict[str, list[float]] = {"pesq": [], "stoi": [], "loudness": []}
    skipped_items: dict[str, list[str]] = {"pesq": [], "stoi": [], "loudness": []}
    notes: dict[str, str] = {}
    example = None
    with torch.no_grad():
        for item in items:
            audio = datamodule.load(item.path)[None]  # [1, 1, T]: the data module's pipeline (mono, rate, -16 LUFS)
            if cap is not None and audio.shape[-1] > cap:
                audio, capped = audio[..., :cap], capped + 1
            recon = reconstruct(codec, audio, chunk, usage=usage)
            si_snr.append(float(scale_invariant_signal_noise_ratio(recon, audio).mean()))
            mel.append(float(mel_distance(recon, audio, rate)))
            for key, (value, why) in _quality(recon, audio, rate).items():
                if why is not None and why.startswith("missing: "):
                    notes[key] = why.removeprefix("missing: ")
                    continue
                quality[key].append(value)
                if why is not None:
                    skipped_items[key].append(f"{item.name}: {why}")
            sq_pred += float(recon.pow(2).sum())
            sq_target += float(audio.pow(2).sum())
            seconds += audio.shape[-1] / rate
            if example is None:
                example = (item, audio, recon)
    item, audio, recon = example
    original_wav, recon_wav = out / "heldout_original.wav", out / "heldout_reconstruction.wav"
    sf.write(original_wav, audio[0, 0].numpy(), rate, subtype="FLOAT")
    sf.write(recon_wav, recon[0, 0].numpy(), rate, subtype="FLOAT")
    loudness = quality["loudness"]
    skipped = {k: sum(1 for v in vals if not math.isfinite(v)) for k, vals in quality.items() if k not in notes}
    notes.setdefault("pesq", f"wide-band PESQ (ITU-T P.862.2), both signals resampled from {rate} Hz to 16 kHz")
    notes.setdefault("stoi", f"STOI (pystoi; it resamples from {rate} Hz to its native 10 kHz)")
    notes.setdefault(
        "loudness", "BS.1770-4 integrated loudness (pyloudnorm): error = mean |L(recon) - L(original)|, diff = signed"
    )
    return {
        "num_utterances": len(items),
        "seconds": round(seconds, 2),
        "si_snr_db": sum(si_snr) / len(si_snr),
        "mel_distance": sum(mel) / len(mel),
        "rms_ratio": math.sqrt(sq_pred / sq_target) if sq_target > 0 else float("nan"),
        "pesq": _mean(quality["pesq"]),
        "stoi": _mean(quality["stoi"]),
        "loudness_error_lu": _mean([abs(v) for v in loudness]),
        "loudness_diff_lu": _mean(loudness),
        "skipped": skipped,
        "skipped_items": {k: v for k, v in skipped_items.items() if k in skipped},
        "metric_notes": notes,
        "num_capped": capped,
        "eval_max_seconds": max_seconds,
        "eval_chunk_seconds": chunk_seconds,
        "bitrate_kbps": codec.bitrate / 1000.0,
        **codebook_health(codec, usage),
        "example_name": item.name,
        "example_text": item.text,
        "example_voice": item.voice,
        "original_wav": str(original_wav),
        "reconstruction_wav": str(recon_wav),
    }


def check_data_folder(data: str | Path) -> Path:
    """``data`` as an existing folder, or :class:`DemoInputError` naming the path."""
    root = Path(data).expanduser()
    if not root.exists():
        raise DemoInputError(f"`--data` {str(root)!r} does not exist (expected a folder of wav/flac/ogg recordings)")
    if not root.is_dir():
        raise DemoInputError(f"`--data` {str(root)!r} is not a folder (pass the folder that holds the recordings)")
    return root


def prepare_folder(datamodule) -> dict[str, Any]:
    """Scan, check and split an :class:`AudioFolderDataModule`'s folder before training; describe what it found.

    Unusable input becomes a :class:`DemoInputError` naming the folder (no audio files, every file unreadable or
    silent, too few files to hold any out). Recordings totalling at most :data:`CACHE_MAX_SECONDS` are kept in
    memory once decoded; longer collections are read crop by crop from disk.
    """
    from lightning_stability.reference.data._audio import AudioFileError, scan_audio_files

    root = check_data_folder(datamodule.root)
    try:
        datamodule.setup("fit")
    except AudioFileError as err:
        raise DemoInputError(f"`--data` {str(root)!r}: {err}") from None
    except RuntimeError as err:  # no audio files, every file skipped, too few to split
        message = str(err)
        if "cannot hold out" in message:  # the demo needs a held-out file: val_fraction=0 is no way out here
            message = message.replace("; add files or set val_fraction=0", "")
            message += "; the demo trains on some files and evaluates on others: it needs at least 2 usable files"
        raise DemoInputError(f"`--data` {str(root)!r}: {message}") from None
    train, val = datamodule.clips("train"), datamodule.clips("val")
    used = {Path(c.path) for c in train + val}
    skipped = [str(p) for p in scan_audio_files(root, datamodule.extensions) if Path(p) not in used]
    total = sum(c.duration for c in train + val)
    if total <= CACHE_MAX_SECONDS:
        datamodule.cache_audio = True
        datamodule.setup("fit")  # rebuild the datasets with the in-memory cache
    return {
        "kind": "folder",
        "root": str(root.resolve()),
        "train_files": len(train),
        "val_files": len(val),
        "train_audio_seconds": round(sum(c.duration for c in train), 2),
        "val_audio_seconds": round(sum(c.duration for c in val), 2),
        "sample_rates": sorted({c.sample_rate for c in train + val}),
        "skipped_files": skipped,
        "cached_in_memory": bool(datamodule.cache_audio),
    }


def codebook_health(codec, usage) -> dict[str, Any]:
    """Per-stage codebook health of a trained codec: the quantizer's own view (EMA counts: the fraction of codes
    below its dead-code threshold, and the normalised entropy of the counts, 1 = uniform use) and the held-out view
    (``usage``, a :class:`~lightning_stability.metrics.CodebookUsage` over every held-out frame: perplexity and the
    fraction of codes never chosen, which also counts codes that are merely rare in a small held-out set)."""
    import math as _math

    dead, entropy = [], []
    for layer in codec.quantizer.layers:
        counts = layer.cluster_size.float()
        dead.append(float((counts < layer._dead_threshold()).float().mean()))
        p = counts / counts.sum().clamp(min=1e-12)
        entropy.append(float(-(p * p.clamp(min=1e-12).log()).sum()) / _math.log(layer.codebook_size))
    held_out = usage.compute()
    return {
        "codebook_size": codec.quantizer.codebook_size,
        "dead_codes": [round(v, 4) for v in dead],
        "codebook_entropy": [round(v, 4) for v in entropy],
        "heldout_perplexity": [round(float(v), 1) for v in held_out["perplexity"]],
        "heldout_unused_codes": [round(float(v), 4) for v in held_out["dead_fraction"]],
    }


def scale_factor_summary(trainer) -> dict[str, Any]:
    """Over the last quarter of training, per factor that ``ScaleFactorClamp`` watched: its mean value and the fraction
    of steps it sat at a bound (``{}`` without a ``ScaleFactorClamp``)."""
    from lightning_stability.callbacks import ScaleFactorClamp

    clamp = next((cb for cb in trainer.callbacks if isinstance(cb, ScaleFactorClamp)), None)
    if clamp is None:
        return {}
    start = 0.75 * trainer.global_step
    factors, at_bound = {}, {}
    for name, points in clamp.event_log.traces.items():
        tail = [v for step, v in points if step >= start and math.isfinite(v)]
        if not tail:
            continue
        if name.endswith("/clamped_fraction"):
            at_bound[name[: -len("/clamped_fraction")]] = round(sum(tail) / len(tail), 4)
        else:
            factors[name] = round(sum(tail) / len(tail), 4)
    return {"scale_factor_last_quarter": factors, "scale_factor_at_bound_last_quarter": at_bound}


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; returns the held-out metrics plus where the files went."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities import rank_zero_info

    out = Path(config.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    start = time.perf_counter()

    datamodule = _datamodule(config)
    t0 = time.perf_counter()
    if config.data is None:
        datamodule.prepare_data()
        rank_zero_info(f"speech corpus ({config.language}, {config.num_utterances} utterances): {datamodule.root}")
        data_info = {"kind": "corpus", "root": str(datamodule.root), "language": config.language}
    else:
        data_info = prepare_folder(datamodule)
        rank_zero_info(
            f"recordings: {data_info['root']}: {data_info['train_files']} files for training, "
            f"{data_info['val_files']} held out, {len(data_info['skipped_files'])} skipped"
        )
    corpus_seconds = time.perf_counter() - t0
    codec = _codec(config)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=config.max_steps,
        val_check_interval=config.val_every_n_steps,  # an int with check_val_every_n_epoch=None: every N batches
        check_val_every_n_epoch=None,
        callbacks=build_callbacks(config, out),
        logger=CSVLogger(out, name="logs"),
        default_root_dir=out,
        enable_progress_bar=config.progress,
        enable_model_summary=not config.quick,
        num_sanity_val_steps=0,
        log_every_n_steps=max(1, min(25, config.max_steps // 10)),
        gradient_clip_val=None,
    )
    t0 = time.perf_counter()
    trainer.fit(codec, datamodule=datamodule)
    train_seconds = time.perf_counter() - t0

    results = evaluate_held_out(
        codec, datamodule, out, chunk_seconds=config.eval_chunk_seconds, max_seconds=config.eval_max_seconds
    )
    results["data"] = data_info
    ckpt = next((cb for cb in trainer.callbacks if type(cb).__name__ == "ModelCheckpoint"), None)
    results.update(
        {
            **scale_factor_summary(trainer),
            "steps": int(trainer.global_step),
            "corpus_seconds": round(corpus_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": round(time.perf_counter() - start, 1),
            "checkpoint": getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", ""),
            "report_json": str(out / "stability_report.json"),
            "report_png": str(out / "stability_report.png"),
            "logs": str(trainer.logger.log_dir) if trainer.logger else "",
            "config": {k: v for k, v in asdict(config).items() if k != "extra"} | {"extra": dict(config.extra)},
        }
    )
    (out / "metrics.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    return results


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _summary(results: dict[str, Any]) -> str:
    data = results.get("data", {})
    skipped = results.get("skipped", {})

    def skips(key: str) -> str:
        return f" ({skipped[key]} of {results['num_utterances']} not scorable, skipped)" if skipped.get(key) else ""

    if data.get("kind") == "folder":
        source = (
            f"  data                : {data['root']} ({data['train_files']} files for training, "
            f"{data['val_files']} held out"
            + (f", {len(data['skipped_files'])} unusable skipped" if data["skipped_files"] else "")
            + ")"
        )
        held = f"  held-out files      : {results['num_utterances']} ({results['seconds']} s of audio"
    else:
        language, root = data.get("language", "?"), data.get("root", "")
        source = f"  data                : generated eSpeak NG corpus ({language}), {root}"
        held = f"  held-out utterances : {results['num_utterances']} ({results['seconds']} s of speech"
    if results.get("num_capped"):
        held += f"; {results['num_capped']} longer than {results['eval_max_seconds']:g} s cut to their start"
    lines = [
        "",
        "lightning-stability demo finished "
        f"({results['steps']} steps, {results['train_seconds']} s training, {results['total_seconds']} s total)",
        source,
        held + ")",
        f"  SI-SNR              : {results['si_snr_db']:.2f} dB",
        f"  mel distance (DAC)  : {results['mel_distance']:.3f}",
        f"  RMS ratio           : {results['rms_ratio']:.3f}",
        f"  PESQ (wide-band)    : {_fmt(results.get('pesq'), '.3f')} (P.862.2 at 16 kHz: both signals resampled)"
        + skips("pesq"),
        f"  STOI                : {_fmt(results.get('stoi'), '.3f')} (pystoi, at its 10 kHz)" + skips("stoi"),
        f"  loudness error      : {_fmt(results.get('loudness_error_lu'), '.2f', ' LU')} mean |L(recon) - L(orig)|, "
        f"signed mean {_fmt(results.get('loudness_diff_lu'), '+.2f', ' LU')} (BS.1770)" + skips("loudness"),
        *(
            f"  scale factor        : {name} {value:.3f} (at a bound {100 * bounds.get(name, 0.0):.0f} % of the last "
            "quarter)"
            for bounds in [results.get("scale_factor_at_bound_last_quarter", {})]
            for name, value in results.get("scale_factor_last_quarter", {}).items()
        ),
        f"  dead codes          : {100 * max(results['dead_codes']):.1f} % (worst stage; quantizer's EMA counts)",
        f"  held-out perplexity : {min(results['heldout_perplexity']):.0f} .. {max(results['heldout_perplexity']):.0f}"
        f" of {results['codebook_size']} codes per stage",
        f"  bitrate             : {results['bitrate_kbps']:.2f} kbps",
        f"  reconstruction      : {results['reconstruction_wav']}",
        f"  original            : {results['original_wav']}",
        f"  stability report    : {results['report_json']} (+ .png)",
        f"  checkpoint          : {results['checkpoint']}",
        f"  logs                : {results['logs']}",
        f"  metrics             : {Path(results['report_json']).parent / 'metrics.json'}",
    ]
    notes = results.get("metric_notes", {})
    for key, value_key in (("pesq", "pesq"), ("stoi", "stoi"), ("loudness", "loudness_error_lu")):
        if results.get(value_key) is None and key in notes:  # a missing package, or nothing scorable
            lines.append(f"  note ({key}): {notes[key]}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    d = DemoConfig()
    p = argparse.ArgumentParser(
        prog="lightning-stability demo",
        description="Train a small speech codec with the stability kit (about 6 min on 2 busy CPU cores) on generated "
        "speech, or on your own recordings with --data DIR, then reconstruct the held-out utterances/files and report "
        "SI-SNR, mel distance, RMS ratio, wide-band PESQ, STOI, loudness error and bitrate.",
    )
    p.add_argument("--out", default=d.out, help=f"output folder (default: {d.out})")
    p.add_argument(
        "--data",
        default=None,
        metavar="DIR",
        help="train and evaluate on the wav/flac/ogg files under DIR (recursive) instead of the generated corpus; "
        "a share of the files (--val-fraction) is held out and evaluated whole",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        help=f"with --data: share of the files held out (default: {d.val_fraction}; at least one file)",
    )
    p.add_argument(
        "--eval-max-seconds",
        type=float,
        default=d.eval_max_seconds,
        help=f"evaluate at most the first this-many seconds of each held-out file (default: {d.eval_max_seconds:g}; "
        "0 = whole files)",
    )
    p.add_argument("--cache-dir", default=None, help="speech corpus cache (default: OUT/speech_corpus)")
    p.add_argument("--language", default=d.language, help=f"eSpeak NG language of the corpus (default: {d.language})")
    p.add_argument("--num-utterances", type=int, default=None, help=f"corpus size (default: {d.num_utterances})")
    p.add_argument("--max-steps", type=int, default=None, help=f"optimizer steps (default: {d.max_steps})")
    p.add_argument("--batch-size", type=int, default=None, help=f"batch size (default: {d.batch_size})")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: CodecModule's, the recipe's 1e-3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, see DemoConfig.threads)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (tiny corpus and model)")
    return p


def _error(message: str) -> int:
    print(f"lightning-stability demo: {message}", file=sys.stderr)
    return 2


def run_demo_cli(argv: list[str]) -> int:
    """Entry point of ``lightning-stability demo``; returns the exit status (2 for unusable input, with a message)."""
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {"out": args.out, "cache_dir": args.cache_dir, "language": args.language}
    overrides["seed"] = args.seed
    if args.threads < 1:
        return _error(f"`--threads` must be >= 1, got {args.threads}")
    overrides["threads"] = args.threads
    for name in ("num_utterances", "max_steps", "batch_size", "lr"):
        value = getattr(args, name)
        if value is not None:
            if value <= 0:
                return _error(f"`--{name.replace('_', '-')}` must be > 0, got {value}")
            overrides[name] = value
    if not (math.isfinite(args.val_fraction) and 0.0 < args.val_fraction < 1.0):
        return _error(f"`--val-fraction` must be in (0, 1) (the demo needs held-out files), got {args.val_fraction}")
    overrides["val_fraction"] = args.val_fraction
    if args.eval_max_seconds is not None:
        if not (math.isfinite(args.eval_max_seconds) and args.eval_max_seconds >= 0):
            return _error(f"`--eval-max-seconds` must be >= 0 (0 = whole files), got {args.eval_max_seconds}")
        overrides["eval_max_seconds"] = args.eval_max_seconds or None
    if args.data is not None:
        try:
            overrides["data"] = str(check_data_folder(args.data))
        except DemoInputError as err:
            return _error(str(err))
    if args.no_progress:
        overrides["progress"] = False
    config = DemoConfig.quick_config(**overrides) if args.quick else DemoConfig(**overrides)
    try:
        results = run_demo(config)
    except DemoInputError as err:
        return _error(str(err))
    print(_summary(results))
    return 0


def main() -> int:  # pragma: no cover - convenience for `python -m lightning_stability.reference.codec.demo`
    return run_demo_cli(sys.argv[1:])
