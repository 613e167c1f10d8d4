"""``AudioFolderDataModule``: fixed-length mono crops of every audio file under a folder."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_stability._checks import (
    check_bool,
    check_choice,
    check_int,
    check_interval,
    check_number,
    check_path,
    check_positive,
    check_sequence,
    check_str,
)
from lightning_stability.reference.data._audio import (
    AudioFileError,
    AudioSegmentDataset,
    ClipInfo,
    EpochShuffleSampler,
    ResumableDataLoader,
    analyze_file,
    read_mono,
    resample,
    scan_audio_files,
)

_ON_ERROR = ("raise", "skip")
_ON_SILENT = ("raise", "skip", "keep")


class AudioFolderDataModule(pl.LightningDataModule):
    """Train/validation crops of the audio files under ``root``, as ``[B, 1, T]`` float32 batches.

    Pipeline (per clip): decode with soundfile -> mono (channels averaged) -> resample to ``sample_rate``
    (torchaudio's band-limited sinc) -> optional gain to ``loudness_lufs`` -> crop of ``T = round(segment_seconds
    * sample_rate)`` samples. A batch is a plain tensor ``[B, 1, T]``; clips shorter than ``T`` are zero-padded at
    the end (drop them with ``min_seconds``).

    - **Scan** (``setup``, identical on every rank): recursive, sorted, extensions matched case-insensitively, hidden
      files/folders skipped. Each file is decoded once to check it and measure its level: an unreadable/corrupt/
      empty or zero-length file raises :class:`~lightning_stability.reference.data._audio.AudioFileError` naming the
      path (``on_error="skip"``: a warning naming the path, file excluded); a silent clip (mono RMS below
      ``silence_threshold_db`` dBFS) is skipped with a warning by default (``on_silent``: "skip" / "raise" / "keep").
    - **Split**: a permutation of the sorted file list seeded by ``seed``; the first ``ceil(val_fraction * N)``
      files (at least one when ``val_fraction > 0``) are the validation set. Same files, same seed -> same split.
    - **Training crops**: offsets from a generator seeded by ``(seed, epoch, index)`` and the order from
      ``(seed, epoch)`` (the epoch is the trainer's ``current_epoch``), so crops are reproducible whatever
      ``num_workers`` is and a resumed run sees the crops an uninterrupted one would.
    - **Validation crops**: the centred ``val_segment_seconds`` of each clip (default: ``segment_seconds``),
      identical every epoch.
    - **Loudness** (``loudness_lufs``, e.g. -16.0 as DAC): each clip's gain is ``10^((target - L) / 20)`` with ``L``
      the ITU-R BS.1770-4 integrated loudness of the whole mono clip at its own rate (so the whole clip, not each
      crop, sits at the target; quiet pauses stay quiet). Gains are capped at ``max_gain_db``.

    Args:
        root: folder to scan.
        sample_rate: output rate in Hz (the model's).
        segment_seconds: training crop length.
        batch_size: batch size of both loaders.
        num_workers: DataLoader workers.
        val_fraction: share of files held out for validation, in [0, 1).
        seed: seeds the split and the crops.
        loudness_lufs: target integrated loudness, or ``None`` to keep levels.
        extensions: file extensions to include.
        on_error: "raise" or "skip" for unreadable, corrupt, empty or zero-length files.
        on_silent: "skip" (default), "raise" or "keep" for clips below ``silence_threshold_db``.
        silence_threshold_db: RMS level (dBFS) below which a clip counts as silent.
        min_seconds: drop (with an info message) clips shorter than this.
        val_segment_seconds: validation crop length (``None``: ``segment_seconds``).
        max_gain_db: upper bound of the loudness gain.
        cache_audio: keep decoded, resampled clips in memory (per worker process).
        pin_memory, persistent_workers, drop_last: passed to the training DataLoader.

    Raises:
        ValueError / TypeError: a bad argument (the message names it and shows the value).
        FileNotFoundError: ``root`` does not exist (at ``setup``).
        RuntimeError: no usable audio files, or too few to split.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        sample_rate: int = 24000,
        segment_seconds: float = 1.0,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        loudness_lufs: float | None = None,
        extensions: Sequence[str] = ("wav", "flac", "ogg"),
        on_error: Literal["raise", "skip"] = "raise",
        on_silent: Literal["raise", "skip", "keep"] = "skip",
        silence_threshold_db: float = -60.0,
        min_seconds: float = 0.0,
        val_segment_seconds: float | None = None,
        max_gain_db: float = 30.0,
        cache_audio: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        root = check_path("root", root)
        check_int("sample_rate", sample_rate, 1)
        check_positive("segment_seconds", segment_seconds)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed)
        check_interval("val_fraction", val_fraction, 0, 1, high_open=True)
        check_interval("loudness_lufs", loudness_lufs, -70, 0, low_open=True, allow_none=True)
        check_sequence("extensions", extensions, check_str, noun="a sequence of extensions like ('wav', 'flac')")
        check_choice("on_error", on_error, _ON_ERROR)
        check_choice("on_silent", on_silent, _ON_SILENT)
        check_number("silence_threshold_db", silence_threshold_db)
        check_number("min_seconds", min_seconds, minimum=0)
        check_positive("val_segment_seconds", val_segment_seconds, allow_none=True)
        check_number("max_gain_db", max_gain_db)
        for name, flag in (
            ("cache_audio", cache_audio),
            ("pin_memory", pin_memory),
            ("persistent_workers", persistent_workers),
            ("drop_last", drop_last),
        ):
            check_bool(name, flag)
        self.root = Path(root)
        self.sample_rate = int(sample_rate)
        self.segment_seconds = float(segment_seconds)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.loudness_lufs = None if loudness_lufs is None else float(loudness_lufs)
        self.extensions = tuple(e.lower().lstrip(".") for e in extensions)
        self.on_error = on_error
        self.on_silent = on_silent
        self.silence_threshold_db = float(silence_threshold_db)
        self.min_seconds = float(min_seconds)
        self.val_segment_seconds = self.segment_seconds if val_segment_seconds is None else float(val_segment_seconds)
        self.max_gain_db = float(max_gain_db)
        self.cache_audio = cache_audio
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self._clips: dict[str, list[ClipInfo]] | None = None
        self.train_dataset: AudioSegmentDataset | None = None
        self.val_dataset: AudioSegmentDataset | None = None

    # ---------------------------------------------------------------------------------------------- sizes

    @property
    def segment_samples(self) -> int:
        """Training crop length ``T`` in samples."""
        return round(self.segment_seconds * self.sample_rate)

    @property
    def val_segment_samples(self) -> int:
        """Validation crop length in samples."""
        return round(self.val_segment_seconds * self.sample_rate)

    # ---------------------------------------------------------------------------------------------- scan

    def _candidate_files(self) -> list[Path]:
        """The files to consider (sorted). Subclasses with a manifest override this."""
        if not self.root.exists():
            raise FileNotFoundError(f"`root` {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"`root` {str(self.root)!r} is not a folder")
        files = scan_audio_files(self.root, self.extensions)
        if not files:
            raise RuntimeError(
                f"no audio files under `root` {str(self.root)!r}: searched recursively for the extensions "
                f"{list(self.extensions)} (case-insensitive; hidden files ignored)"
            )
        return files

    def _scan(self) -> list[ClipInfo]:
        started = time.perf_counter()
        clips: list[ClipInfo] = []
        for path in self._candidate_files():
            try:
                clip = analyze_file(path, measure_loudness=self.loudness_lufs is not None)
            except AudioFileError as err:
                if self.on_error == "raise":
                    raise
                rank_zero_warn(f"AudioFolderDataModule: skipping {err} (on_error='skip')")
                continue
            if clip.rms_db < self.silence_threshold_db:
                problem = f"silent clip (RMS {clip.rms_db:.1f} dBFS < silence_threshold_db={self.silence_threshold_db})"
                if self.on_silent == "raise":
                    raise AudioFileError(path, problem + "; pass on_silent='skip' to exclude such files")
                if self.on_silent == "skip":
                    rank_zero_warn(f"AudioFolderDataModule: skipping {path}: {problem} (on_silent='skip')")
                    continue
            if clip.duration < self.min_seconds:
                rank_zero_info(f"AudioFolderDataModule: skipping {path}: {clip.duration:.3f} s < min_seconds")
                continue
            clips.append(clip)
        if not clips:
            raise RuntimeError(f"no usable audio files under {str(self.root)!r}: every file was skipped (see warnings)")
        hours, seconds = sum(c.duration for c in clips) / 3600, time.perf_counter() - started
        rank_zero_info(f"{type(self).__name__}: {len(clips)} clips ({hours:.2f} h) checked in {seconds:.1f} s")
        return clips

    def _split(self, clips: list[ClipInfo]) -> dict[str, list[ClipInfo]]:
        """Seeded split of the sorted clips into ``{"train": [...], "val": [...]}`` (both sorted by path)."""
        n_val = math.ceil(self.val_fraction * len(clips)) if self.val_fraction > 0 else 0
        if n_val >= len(clips):
            raise RuntimeError(
                f"cannot hold out `val_fraction`={self.val_fraction} of {len(clips)} usable file(s) and keep any for "
                f"training; add files or set val_fraction=0"
            )
        order = np.random.default_rng(self.seed).permutation(len(clips))
        val = sorted(int(i) for i in order[:n_val])
        train = sorted(int(i) for i in order[n_val:])
        return {"train": [clips[i] for i in train], "val": [clips[i] for i in val]}

    def clips(self, split: Literal["train", "val"]) -> list[ClipInfo]:
        """The clips of ``split`` ("train" or "val") after ``setup``: path, rate, frames, channels, levels."""
        if split not in ("train", "val"):
            raise ValueError(f"`split` must be 'train' or 'val', got {split!r}")
        if self._clips is None:
            raise RuntimeError("call `setup()` (or let the Trainer do it) before asking for clips")
        return list(self._clips[split])

    def _gain(self, clip: ClipInfo) -> float:
        if self.loudness_lufs is None or clip.loudness_lufs is None or not math.isfinite(clip.loudness_lufs):
            return 1.0  # silent clips kept with on_silent="keep" stay as they are
        return 10.0 ** (min(self.loudness_lufs - clip.loudness_lufs, self.max_gain_db) / 20.0)

    # ---------------------------------------------------------------------------------------------- hooks

    def load(self, path: str | Path) -> torch.Tensor:
        """Any audio file through this module's pipeline: the whole clip as float32 ``[1, T]`` at ``sample_rate``.

        Mono mixdown, resampling and (when ``loudness_lufs`` is set) loudness normalisation exactly as for the
        training data, without cropping or padding (e.g. to reconstruct a held-out utterance).

        Raises:
            AudioFileError: unreadable, empty or zero-length file (the message names it).
        """
        clip = analyze_file(Path(path), measure_loudness=self.loudness_lufs is not None)
        audio = resample(torch.from_numpy(read_mono(clip.path)[0]), clip.sample_rate, self.sample_rate)
        return (audio * self._gain(clip)).to(torch.float32)[None, :]

    def _check_model_rate(self) -> None:
        model = self.trainer.lightning_module if self.trainer is not None else None
        rate = getattr(model, "sample_rate", None)
        if isinstance(rate, int) and not isinstance(rate, bool) and rate != self.sample_rate:
            raise RuntimeError(
                f"{type(self).__name__} yields audio at `sample_rate`={self.sample_rate} Hz but the model "
                f"{type(model).__name__} has sample_rate={rate} Hz; pass sample_rate={rate}"
            )

    def setup(self, stage: str | None = None) -> None:
        """Scan, check and split the files (once), and build the datasets.

        Raises:
            RuntimeError: the trainer's model has an int ``sample_rate`` different from this module's.
        """
        self._check_model_rate()
        if self._clips is None:
            self._clips = self._split(self._scan())
        make = AudioSegmentDataset
        train, val = self._clips["train"], self._clips["val"]
        self.train_dataset = make(
            train,
            sample_rate=self.sample_rate,
            segment_samples=self.segment_samples,
            seed=self.seed,
            gains=[self._gain(c) for c in train],
            cache=self.cache_audio,
        )
        self.val_dataset = make(
            val,
            sample_rate=self.sample_rate,
            segment_samples=self.val_segment_samples,
            seed=self.seed,
            gains=[self._gain(c) for c in val],
            cache=self.cache_audio,
        )

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def _loader(self, dataset: AudioSegmentDataset, sampler: EpochShuffleSampler | None, train: bool) -> DataLoader:
        # the training loader resumes mid-epoch from a checkpoint (see ResumableDataLoader)
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            drop_last=self.drop_last and train,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled random crops, ``[B, 1, T]`` float32 batches (order and crops seeded by seed and epoch)."""
        if self.train_dataset is None:
            self.setup("fit")
        epoch_fn = self._current_epoch if self.trainer is not None else None
        sampler = EpochShuffleSampler(len(self.train_dataset), self.seed, shuffle=True, epoch_fn=epoch_fn)
        return self._loader(self.train_dataset, sampler, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Centred crops of the held-out clips in path order; ``[]`` (no validation) when nothing is held out."""
        if self.val_dataset is None:
            self.setup("validate")
        if len(self.val_dataset) == 0:
            return []
        return self._loader(self.val_dataset, None, train=False)
