"""Audio I/O shared by the datamodules: reading with soundfile, mono mixdown, resampling, BS.1770 loudness, crops.

Everything here works on plain numpy/torch and never imports lightning.
"""

from __future__ import annotations

import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class AudioFileError(RuntimeError):
    """An audio file could not be used (unreadable, corrupt, empty, zero-length or silent); ``path`` names it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass(frozen=True)
class ClipInfo:
    """What a scan learned about one file.

    ``frames``/``sample_rate``/``channels`` are the file's own; ``rms_db`` is the RMS level (dBFS) of the mono
    mixdown; ``loudness_lufs`` its BS.1770 integrated loudness (``None`` when not measured, ``-inf`` when every
    block is below the -70 LUFS absolute gate).
    """

    path: Path
    sample_rate: int
    frames: int
    channels: int
    rms_db: float
    loudness_lufs: float | None = None

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    def frames_at(self, sample_rate: int) -> int:
        """Length in samples after resampling to ``sample_rate`` (torchaudio's ``ceil(frames * new / orig)``)."""
        return math.ceil(self.frames * sample_rate / self.sample_rate)


# --------------------------------------------------------------------------------------------------- file access


def scan_audio_files(root: Path, extensions: Sequence[str]) -> list[Path]:
    """Files under ``root`` (recursively) whose extension is one of ``extensions`` (case-insensitive), sorted.

    Hidden files and folders (names starting with ``.``, e.g. macOS ``._x.wav`` resource forks or an unfinished
    corpus's temporary folder) are ignored.
    """
    wanted = {"." + e.lower().lstrip(".") for e in extensions}
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in wanted:
                found.append(Path(dirpath) / name)
    return sorted(found)


def read_mono(path: Path, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, int]:
    """Frames ``[start, stop)`` of ``path`` as a float32 mono array (channels averaged) and the file's rate.

    Raises:
        AudioFileError: the file cannot be opened or decoded (the message names the path and soundfile's reason).
    """
    try:
        data, rate = sf.read(str(path), start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as err:
        raise AudioFileError(path, f"cannot read audio ({type(err).__name__}: {err})") from None
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0], int(rate)


def analyze_file(path: Path, *, measure_loudness: bool) -> ClipInfo:
    """Open and fully decode ``path`` once: metadata, RMS level and (optionally) integrated loudness.

    Raises:
        AudioFileError: unreadable/corrupt/empty file, or a clip with zero frames.
    """
    try:
        if os.path.getsize(path) == 0:
            raise AudioFileError(path, "empty file (0 bytes)")
        info = sf.info(str(path))
    except AudioFileError:
        raise
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as err:
        raise AudioFileError(path, f"not a readable audio file ({type(err).__name__}: {err})") from None
    if info.frames <= 0:
        raise AudioFileError(path, "zero-length clip (0 frames)")
    mono, rate = read_mono(path)
    if mono.shape[0] == 0:
        raise AudioFileError(path, "zero-length clip (no frames could be decoded)")
    if not np.isfinite(mono).all():
        raise AudioFileError(path, "contains NaN or infinite samples")
    power = float(np.mean(np.square(mono, dtype=np.float64)))
    rms_db = 10.0 * math.log10(power) if power > 0 else -math.inf
    loudness = integrated_loudness(mono, rate) if measure_loudness else None
    return ClipInfo(Path(path), rate, int(mono.shape[0]), int(info.channels), rms_db, loudness)


def write_wav_atomic(path: Path, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write a wav file through a temporary name in the same folder and ``os.replace`` it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        sf.write(str(tmp), samples, sample_rate, subtype=subtype, format="WAV")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ------------------------------------------------------------------------------------------------ resampling


@lru_cache(maxsize=16)
def _resampler(orig: int, new: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig, new)  # caches the sinc kernel for this pair of rates


def resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """Band-limited sinc resampling of ``x`` (``(..., time)``) from ``orig`` to ``new`` Hz (torchaudio)."""
    if orig == new:
        return x
    with torch.no_grad():
        return _resampler(int(orig), int(new))(x)


# ------------------------------------------------------------------------------------------ loudness (BS.1770)


def _biquad_high_shelf(rate: float, gain_db: float, q: float, fc: float) -> tuple[list[float], list[float]]:
    a = 10.0 ** (gain_db / 40.0)
    w0 = 2.0 * math.pi * fc / rate
    alpha = math.sin(w0) / (2.0 * q)
    cos, sq = math.cos(w0), 2.0 * math.sqrt(a) * alpha
    b = [a * ((a + 1) + (a - 1) * cos + sq), -2 * a * ((a - 1) + (a + 1) * cos), a * ((a + 1) + (a - 1) * cos - sq)]
    den = [(a + 1) - (a - 1) * cos + sq, 2 * ((a - 1) - (a + 1) * cos), (a + 1) - (a - 1) * cos - sq]
    return b, den


def _biquad_high_pass(rate: float, q: float, fc: float) -> tuple[list[float], list[float]]:
    w0 = 2.0 * math.pi * fc / rate
    alpha = math.sin(w0) / (2.0 * q)
    cos = math.cos(w0)
    return [(1 + cos) / 2, -(1 + cos), (1 + cos) / 2], [1 + alpha, -2 * cos, 1 - alpha]


def k_weighting(x: np.ndarray, rate: int) -> np.ndarray:
    """ITU-R BS.1770 K-weighting: a +4 dB high shelf (1.5 kHz, Q 1/sqrt 2) then a 38 Hz high pass (Q 0.5).

    The two RBJ-cookbook biquads are designed at ``rate`` (equal to the standard's 48 kHz coefficients there), the
    same construction as pyloudnorm's default "K-weighting" meter.
    """
    import torchaudio.functional as F

    y = torch.as_tensor(np.asarray(x, dtype=np.float64))
    for b, a in (_biquad_high_shelf(rate, 4.0, 1 / math.sqrt(2), 1500.0), _biquad_high_pass(rate, 0.5, 38.0)):
        y = F.lfilter(y, torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), clamp=False)
    return y.numpy()


def integrated_loudness(x: np.ndarray, rate: int) -> float:
    """Integrated loudness of a mono signal in LUFS (ITU-R BS.1770-4), ``-inf`` for silence.

    ``y = K(x)``; 400 ms blocks with 75 % overlap, ``z_j = mean(y_j^2)``, ``l_j = -0.691 + 10 log10 z_j``;
    absolute gate ``l_j > -70``; relative gate ``l_j > L_abs - 10`` where ``L_abs`` is the loudness of the mean
    power of the blocks passing the absolute gate; the result is ``-0.691 + 10 log10`` of the mean power of the
    blocks passing both gates. A clip shorter than one block is measured as a single block.
    """
    y = k_weighting(np.asarray(x, dtype=np.float64), rate)
    block, step = round(0.4 * rate), round(0.1 * rate)
    if y.shape[0] < block:
        z = np.array([np.mean(y**2)]) if y.shape[0] else np.zeros(0)
    else:
        csum = np.concatenate([[0.0], np.cumsum(y**2)])
        starts = np.arange(0, y.shape[0] - block + 1, step)
        z = (csum[starts + block] - csum[starts]) / block
    with np.errstate(divide="ignore"):
        levels = -0.691 + 10 * np.log10(z)
    z_abs = z[levels > -70.0]
    if z_abs.size == 0:
        return -math.inf
    relative = -0.691 + 10 * math.log10(float(np.mean(z_abs))) - 10.0
    z_rel = z[(levels > -70.0) & (levels > relative)]
    return -0.691 + 10 * math.log10(float(np.mean(z_rel)))


# ------------------------------------------------------------------------------------------------ datasets


class EpochShuffleSampler(Sampler):
    """Yields ``(index, epoch)`` keys: a permutation seeded by ``(seed, epoch)`` (or the identity order).

    The epoch is read from ``epoch_fn()`` (the trainer's ``current_epoch``) each time iteration starts, so crops
    and order depend only on ``(seed, epoch, index)``: reproducible whatever ``num_workers`` is, and a resumed run
    continues with the crops of the uninterrupted one. Without an ``epoch_fn`` the epoch counts iterations.
    """

    def __init__(self, size: int, seed: int, *, shuffle: bool = True, epoch_fn: Callable[[], int] | None = None):
        self.size, self.seed, self.shuffle, self.epoch_fn = size, seed, shuffle, epoch_fn
        self._iterations = 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        order = np.arange(self.size)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(self.size)
        return iter([(int(i), int(epoch)) for i in order])


class _SkippingBatchSampler:
    """The loader's batch sampler, minus the first ``owner._take_skip()`` batches of the next iteration (indices only:
    the skipped batches are never loaded). Its length is the full epoch's, as Lightning expects on a resume."""

    def __init__(self, base: Iterable[list[int]], owner: ResumableDataLoader) -> None:
        self.base, self.owner = base, owner

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        skip = self.owner._take_skip()
        it = iter(self.base)
        for _ in range(skip):
            if next(it, None) is None:
                return
        yield from it


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that a checkpoint can resume in the middle of an epoch.

    Lightning saves the ``state_dict()`` of a training loader that has one with the checkpoint and hands it back to
    ``load_state_dict()`` before the first batch of the resumed run (``FitLoop.on_save_checkpoint``); a plain
    ``DataLoader`` has no state, so Lightning restarts an interrupted epoch from its first batch and the resumed run
    trains on batches the interrupted one had already used. The state here is the number of batches of the current
    epoch handed out so far (Lightning's data fetcher does not pre-fetch from a loader with a length, so this is the
    number the training loop consumed); on restore the next iteration skips that many batches at the index level, so
    nothing is loaded twice. The order of an epoch must not depend on anything but the epoch (as with
    :class:`EpochShuffleSampler`, whose epoch comes from the restored trainer), and under DDP each rank skips its own
    batches of the distributed sampler. A state saved at the very end of an epoch restores to "nothing to skip".
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._consumed = 0
        self._skip = 0
        self._skipping: _SkippingBatchSampler | None = None

    @property
    def _index_sampler(self):  # the batch sampler the DataLoader iterators draw indices from
        base = super()._index_sampler
        if not self._auto_collation:
            return base
        if self._skipping is None or self._skipping.base is not base:
            self._skipping = _SkippingBatchSampler(base, self)
        return self._skipping

    def _take_skip(self) -> int:
        skip, self._skip = self._skip, 0
        return skip

    def __iter__(self) -> Iterator[Any]:
        self._consumed = self._skip
        for batch in super().__iter__():
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self._consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        consumed = int(state_dict.get("consumed", 0))
        self._skip = consumed if 0 < consumed < len(self) else 0


class AudioSegmentDataset(Dataset):
    """Fixed-length mono segments ``[1, T]`` (float32) of a list of clips, resampled to ``sample_rate``.

    A key is either ``(index, epoch)`` (training: a random crop whose offset is drawn from a generator seeded by
    ``(seed, epoch, index)``) or a plain ``index`` (validation: the centred crop, the same every time). A clip
    shorter than ``T`` is returned whole, zero-padded at the end. ``gains[i]`` (linear) multiplies clip ``i``
    (loudness normalisation). With ``cache=True`` each decoded, resampled clip is kept in memory (per process).
    """

    _MARGIN = 256  # source samples read beyond each side of a crop: more than the resampling filter's half-width

    def __init__(
        self,
        clips: Sequence[ClipInfo],
        *,
        sample_rate: int,
        segment_samples: int,
        seed: int = 0,
        gains: Sequence[float] | None = None,
        cache: bool = False,
    ) -> None:
        self.clips = list(clips)
        self.sample_rate = int(sample_rate)
        self.segment_samples = int(segment_samples)
        self.seed = int(seed)
        self.gains = [1.0] * len(self.clips) if gains is None else [float(g) for g in gains]
        self.cache = cache
        self._cache: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.clips)

    def offset(self, key: int | tuple[int, int]) -> tuple[int, int]:
        """``(index, start)``: the clip and the first sample (at the target rate) of the crop for ``key``."""
        if isinstance(key, tuple):
            index, epoch = key
            span = self.clips[index].frames_at(self.sample_rate) - self.segment_samples
            start = int(np.random.default_rng([self.seed, epoch, index]).integers(0, span + 1)) if span > 0 else 0
        else:
            index = int(key)
            span = self.clips[index].frames_at(self.sample_rate) - self.segment_samples
            start = span // 2 if span > 0 else 0
        return index, start

    def _full(self, index: int) -> torch.Tensor:
        clip = self.clips[index]
        audio = self._cache.get(index)
        if audio is None:
            mono, rate = read_mono(clip.path)
            audio = resample(torch.from_numpy(mono), rate, self.sample_rate).contiguous()
            if self.cache:
                self._cache[index] = audio
        return audio

    def _crop(self, index: int, start: int) -> torch.Tensor:
        clip, length = self.clips[index], self.segment_samples
        if self.cache or clip.frames_at(self.sample_rate) <= length:
            return self._full(index)[start : start + length]
        if clip.sample_rate == self.sample_rate:
            return torch.from_numpy(read_mono(clip.path, start, start + length)[0])
        # Read only the source span around the crop. The sinc resampler maps blocks of `step_in` source samples to
        # `step_out` output samples, so starting the read on a block boundary (plus a margin wider than the filter)
        # makes the partial resample identical to the same samples of a full-clip resample.
        g = math.gcd(clip.sample_rate, self.sample_rate)
        step_in, step_out = clip.sample_rate // g, self.sample_rate // g
        src_start = math.floor(start * clip.sample_rate / self.sample_rate)
        src_stop = math.ceil((start + length) * clip.sample_rate / self.sample_rate)
        lo = max(0, (src_start - self._MARGIN) // step_in) * step_in
        hi = min(clip.frames, src_stop + self._MARGIN)
        mono, rate = read_mono(clip.path, lo, hi)
        audio = resample(torch.from_numpy(mono), rate, self.sample_rate)
        first = start - (lo // step_in) * step_out
        return audio[first : first + length]

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        index, start = self.offset(key)
        audio = self._crop(index, start).to(torch.float32)
        if self.gains[index] != 1.0:
            audio = audio * self.gains[index]
        if audio.shape[0] < self.segment_samples:  # short clip (or the tail of a resampled read): zero-pad the end
            audio = torch.nn.functional.pad(audio, (0, self.segment_samples - audio.shape[0]))
        return audio[None, :]  # [1, T]
