"""``LatentPairDataModule``: (source, conditioning, target) codec-latent triplets for the cascade transformer.

Two ways to get latents:

1. **A folder of saved tensors** (``latents_dir``). Every ``*.pt`` file under it (recursively, sorted, hidden files
   skipped) is one example, written with ``torch.save`` and read with ``torch.load(weights_only=True)``::

       {
           "source": Tensor[D, T],         # latents to refine (e.g. of a degraded utterance), float
           "target": Tensor[D, T],         # the latents the model should produce, same shape as "source"
           "conditioning": Tensor[Dc, Tc], # optional: conditioning latents (any length; cropped/padded to T)
           "voice": str,                   # optional: speaker id, used to draw conditioning (see below)
           "utterance": str,               # optional: utterance id (files of one utterance are split together)
       }

   When a file has no ``"conditioning"``, the conditioning is the ``"target"`` of *another utterance of the same
   voice* (drawn per epoch for training, fixed for validation). ``D`` must equal ``latent_dim`` and ``Dc``
   ``cond_dim``; anything else is an error naming the file and the shape.

2. **A frozen encoder applied to audio** (``latents_dir=None``): ``encoder`` is a ``CodecModule`` checkpoint path (its
   latents before quantisation: the reference codec's
   :class:`~lightning_stability.reference.codec.latents.CodecLatentEncoder` loads it), any callable ``audio [B, 1, S] ->
   latents [B, D, T]``, or ``None`` for a fixed random convolutional encoder (:class:`RandomConvEncoder`, hop 320) when
   no trained codec exists (``fallback_to_random=True`` falls back to it when the checkpoint is missing). The audio is
   the eSpeak NG speech corpus by default (``SpeechCorpusDataModule``; ``corpus`` passes its options), or ``audio``: an
   object with ``utterances(split="all")`` returning items with ``.path``, ``.voice`` and ``.id`` (as
   ``SpeechCorpusDataModule``), or a folder of audio files laid out ``<voice>/<utterance>.<ext>`` (real recordings, e.g.
   VCTK).

   Default task, **latent-space enhancement**: for each utterance, ``degradations`` degraded versions are made
   (a steep low-pass at a random cutoff, additive noise at a random SNR, a random gain change; every draw
   seeded by ``(seed, utterance, version)``), and the example is ``source = E(degraded)``, ``target = E(clean)``,
   ``conditioning = E(another clean utterance of the same voice)``.

   Because the encoder is frozen, the latents are computed once (``prepare_data``, one process per node) and cached
   in the folder layout of (1) under ``cache_dir/latents-<key>``, where ``key`` hashes the encoder (its weights, or
   the checkpoint file's bytes), the audio files, the degradation settings and the seed. The cache is written into
   a hidden temporary folder and renamed into place when complete, so an interrupted run never leaves a partial
   cache that would be used.

Batches are dicts::

    {"source": [B, D, L], "conditioning": [B, Dc, L], "target": [B, D, L], "mask": [B, L] bool, "lengths": [B]}

with ``L = segment_frames`` (training: a random window seeded by ``(seed, epoch, index)``; validation: the centred
window), or, with ``segment_frames=None``, the longest item of the batch. Items shorter than ``L`` are zero-padded at
the end and ``mask`` is ``False`` there; the conditioning is cropped/padded to ``L`` independently (its padding is
zeros). Splits are by utterance, seeded; conditioning is drawn from the same split when possible (validation falls
back to training utterances of the voice, like a speaker enrolment, never the other way round).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_stability._checks import (
    check_bool,
    check_int,
    check_interval,
    check_mapping,
    check_pair,
    check_path,
    check_positive,
    check_str,
)
from lightning_stability.reference.data._audio import (
    EpochShuffleSampler,
    ResumableDataLoader,
    read_mono,
    resample,
    scan_audio_files,
)

__all__ = [
    "LatentItem",
    "LatentPairDataModule",
    "LatentPairDataset",
    "RandomConvEncoder",
    "degrade",
]

CACHE_VERSION = 2  # bump when the cached layout or the degradation changes
_AUDIO_EXTENSIONS = ("wav", "flac", "ogg")


# ---------------------------------------------------------------------------------------------------------------------
# the fallback encoder
# ---------------------------------------------------------------------------------------------------------------------
class RandomConvEncoder(nn.Module):
    """A fixed, randomly initialised SEANet-shaped convolutional encoder: ``audio [B, 1, S] -> [B, D, S // hop]``.

    Strided ``Conv1d`` layers with ``ratios`` (default ``(8, 5, 4, 2)``: hop 320, 75 frames/s at 24 kHz) and ELU,
    weights from ``torch.Generator().manual_seed(seed)``, then a fixed gain so latents of speech at about -20 dBFS
    have an RMS of a few units, like EnCodec's (the post-mortem quotes 5.7). It has no trained meaning; it stands in
    for a codec encoder so the cascade can be trained and tested before a codec checkpoint exists. Never trained
    (parameters have ``requires_grad=False``).
    """

    def __init__(
        self, latent_dim: int = 128, *, ratios: Sequence[int] = (8, 5, 4, 2), channels: int = 32, seed: int = 0
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.ratios = tuple(int(r) for r in ratios)
        self.hop = math.prod(self.ratios)
        g = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        c_in = 1
        for k, r in enumerate(self.ratios):
            c_out = channels * 2**k
            conv = nn.Conv1d(c_in, c_out, kernel_size=2 * r, stride=r, padding=math.ceil(r / 2))
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / (c_in * 2 * r)))
                conv.bias.zero_()
            layers += [conv, nn.ELU()]
            c_in = c_out
        proj = nn.Conv1d(c_in, latent_dim, kernel_size=3, padding=1)
        with torch.no_grad():
            proj.weight.copy_(torch.randn(proj.weight.shape, generator=g) * math.sqrt(1.0 / (c_in * 3)))
            proj.bias.zero_()
        layers.append(proj)
        self.net = nn.Sequential(*layers)
        self.gain = 20.0  # fixed: latents of eSpeak speech get an RMS of about 6, like EnCodec latents (5.7)
        self.requires_grad_(False)

    def forward(self, audio: Tensor) -> Tensor:
        frames = audio.shape[-1] // self.hop
        return self.gain * self.net(audio)[..., :frames]  # [B, D, S // hop]


# ---------------------------------------------------------------------------------------------------------------------
# degradation
# ---------------------------------------------------------------------------------------------------------------------
def degrade(
    audio: Tensor,
    sample_rate: int,
    *,
    snr_db: float,
    gain_db: float,
    cutoff_hz: float | None,
    generator: torch.Generator,
) -> Tensor:
    """Band-limit, add noise, change gain: the degraded input of the enhancement task.

    ``audio [..., S]`` -> low-pass at ``cutoff_hz`` (the magnitude response of an 8th-order Butterworth,
    ``|H(f)| = 1 / sqrt(1 + (f / f_c)^16)``, applied with zero phase in the frequency domain: -48 dB/octave, one FFT;
    ``None`` or a cutoff at or above 0.45 * rate skips it) -> plus white Gaussian noise scaled so
    ``10 log10(P_signal / P_noise) = snr_db``, with ``P_signal`` the mean power of the band-limited signal -> times
    ``10^(gain_db / 20)``. Silent audio gets noise of power ``1e-8`` (no division by zero).
    """
    x = audio.float()
    if cutoff_hz is not None and cutoff_hz < 0.45 * sample_rate:
        n = x.shape[-1]
        freqs = torch.fft.rfftfreq(n, d=1.0 / sample_rate)  # [S // 2 + 1]
        response = torch.rsqrt(1.0 + (freqs / cutoff_hz) ** 16)
        x = torch.fft.irfft(torch.fft.rfft(x) * response, n=n)
    power = float(x.pow(2).mean())
    noise_power = max(power, 1e-8) * 10.0 ** (-snr_db / 10.0)
    noise = torch.randn(x.shape, generator=generator) * math.sqrt(noise_power)
    return (x + noise) * 10.0 ** (gain_db / 20.0)


# ---------------------------------------------------------------------------------------------------------------------
# items and dataset
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class LatentItem:
    """One example: ``source``/``target`` ``[D, T]``, optional own ``conditioning`` ``[Dc, Tc]``, voice, utterance."""

    source: Tensor
    target: Tensor
    conditioning: Tensor | None
    voice: str | None
    utterance: str
    path: Path | None = None


def _crop_pad(x: Tensor, start: int, length: int) -> tuple[Tensor, int]:
    """``x[:, start:start + length]`` zero-padded at the end to ``length``; returns it and the number of real frames."""
    window = x[:, start : start + length]
    real = window.shape[1]
    if real < length:
        window = torch.nn.functional.pad(window, (0, length - real))
    return window, real


class LatentPairDataset(Dataset):
    """Triplets from :class:`LatentItem` s with crops seeded by ``(seed, epoch, index)``.

    A key is ``(index, epoch)`` (training: random window, random conditioning utterance) or a plain ``index``
    (validation: centred window, a fixed conditioning utterance). ``cond_pool[i]`` lists the items whose ``target``
    may serve as conditioning for item ``i`` (ignored when the item has its own conditioning).
    """

    def __init__(
        self,
        items: Sequence[LatentItem],
        *,
        segment_frames: int | None,
        seed: int,
        cond_pool: Sequence[Sequence[LatentItem]] | None,
        use_conditioning: bool,
    ) -> None:
        self.items = list(items)
        self.segment_frames = segment_frames
        self.seed = seed
        self.cond_pool = cond_pool
        self.use_conditioning = use_conditioning

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        train = isinstance(key, tuple)
        index, epoch = key if train else (int(key), -1)
        item = self.items[index]
        rng = np.random.default_rng([self.seed, epoch + 1, index])  # fixed per (epoch, index); epoch -1 = validation
        frames = item.source.shape[1]
        length = frames if self.segment_frames is None else self.segment_frames
        span = frames - length
        start = (int(rng.integers(0, span + 1)) if train else span // 2) if span > 0 else 0
        source, real = _crop_pad(item.source, start, length)
        target, _ = _crop_pad(item.target, start, length)
        mask = torch.zeros(length, dtype=torch.bool)
        mask[:real] = True
        out = {"source": source, "target": target, "mask": mask, "lengths": torch.tensor(real)}
        if self.use_conditioning:
            if item.conditioning is not None:
                cond_full = item.conditioning
            else:
                assert self.cond_pool is not None
                pool = self.cond_pool[index]
                cond_full = pool[int(rng.integers(0, len(pool))) if train else 0].target
            c_span = cond_full.shape[1] - length
            c_start = (int(rng.integers(0, c_span + 1)) if train else c_span // 2) if c_span > 0 else 0
            out["conditioning"], _ = _crop_pad(cond_full, c_start, length)
        return out


def collate_latents(batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack items, zero-padding every ``[C, L]`` tensor (and ``mask`` with False) to the longest ``L``."""
    longest = max(item["source"].shape[1] for item in batch)
    out: dict[str, Tensor] = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        if key == "lengths":
            out[key] = torch.stack(values)
        elif key == "mask":
            out[key] = torch.stack([torch.nn.functional.pad(v, (0, longest - v.shape[0]), value=False) for v in values])
        else:
            out[key] = torch.stack([torch.nn.functional.pad(v, (0, longest - v.shape[1])) for v in values])
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the data module
# ---------------------------------------------------------------------------------------------------------------------
class LatentPairDataModule(pl.LightningDataModule):
    """(source, conditioning, target) latent triplets from saved tensors or a frozen encoder (see the module doc).

    Args:
        latents_dir: folder of ``.pt`` examples (layout in the module docstring). ``None``: compute latents with
            ``encoder`` from audio.
        encoder: ``CodecModule`` checkpoint path, a callable ``audio [B, 1, S] -> latents [B, D, T]`` (an
            ``nn.Module`` is put in eval mode and run under ``no_grad``), or ``None`` for :class:`RandomConvEncoder`.
        audio: the utterances to encode: an object with ``utterances("all")`` (items with ``.path``, ``.voice``,
            ``.id``), a folder ``<voice>/<utterance>.<ext>``, or ``None`` for the eSpeak NG speech corpus.
        corpus: options of the default ``SpeechCorpusDataModule`` (e.g. ``num_utterances``, ``num_voices``,
            ``language``); ``cache_dir`` defaults to ``<cache_dir>/speech``.
        cache_dir: where computed latents (and the default corpus) are cached.
        fallback_to_random: when ``encoder`` is a checkpoint path that does not exist, use :class:`RandomConvEncoder`
            (with an info message) instead of raising; lets one config train on the demo codec's latents when the
            demo has run and on the random encoder's otherwise.
        encoder_key: identifies a callable encoder in the cache key; default: a hash of an ``nn.Module``'s
            state_dict, or the callable's qualified name (pass a key when a plain function's behaviour changes).
        latent_dim: expected ``D`` of source/target latents.
        cond_dim: expected ``Dc`` of conditioning latents (``None``: ``latent_dim``; 0: no conditioning in batches).
        segment_frames: window length ``L`` in latent frames (150 = 2 s at 75 frames/s); ``None``: whole items,
            padded per batch.
        batch_size, num_workers: DataLoader options.
        val_fraction: share of utterances held out, in [0, 1).
        seed: seeds the split, the crops, the conditioning draws and the degradations.
        sample_rate: rate the encoder expects (audio is resampled to it).
        degradations: degraded versions per utterance (examples per utterance).
        snr_db, gain_db, cutoff_hz: ``(low, high)`` ranges of the uniform draws of :func:`degrade`.
        max_seconds: utterances longer than this are truncated before encoding.

    Raises:
        ValueError / TypeError: bad arguments; at ``setup``, a file with the wrong content or shapes (named), an
            encoder returning the wrong rank or latent dim (the shapes named), a voice with a single utterance
            when conditioning must be drawn from another one.
        FileNotFoundError: ``latents_dir`` or the ``audio`` folder does not exist, or holds no files.
    """

    def __init__(
        self,
        latents_dir: str | Path | None = None,
        *,
        encoder: str | Path | Callable[[Tensor], Tensor] | None = None,
        audio: str | Path | Any | None = None,
        corpus: Mapping[str, Any] | None = None,
        cache_dir: str | Path = "latent_cache",
        encoder_key: str | None = None,
        fallback_to_random: bool = False,
        latent_dim: int = 128,
        cond_dim: int | None = None,
        segment_frames: int | None = 150,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        sample_rate: int = 24000,
        degradations: int = 2,
        snr_db: tuple[float, float] = (0.0, 20.0),
        gain_db: tuple[float, float] = (-12.0, 6.0),
        cutoff_hz: tuple[float, float] = (2000.0, 8000.0),
        max_seconds: float = 30.0,
    ) -> None:
        super().__init__()
        check_path("latents_dir", latents_dir, allow_none=True)
        if latents_dir is not None and (encoder is not None or audio is not None):
            raise ValueError(
                "give either `latents_dir` (saved tensors) or `encoder`/`audio` (computed latents), not both"
            )
        if encoder is not None and not isinstance(encoder, (str, os.PathLike)) and not callable(encoder):
            raise TypeError(
                f"`encoder` must be a checkpoint path, a callable audio -> latents, or None, got {encoder!r}"
            )
        if isinstance(encoder, str):
            check_path("encoder", encoder)
        check_mapping("corpus", corpus, min_length=0, allow_none=True, noun="a dict of SpeechCorpusDataModule options")
        check_path("cache_dir", cache_dir)
        check_str("encoder_key", encoder_key, allow_none=True, allow_empty=True)
        check_bool("fallback_to_random", fallback_to_random)
        check_int("latent_dim", latent_dim, 1)
        check_int("cond_dim", cond_dim, 0, allow_none=True)
        check_int("segment_frames", segment_frames, 1, allow_none=True)
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        check_int("seed", seed)
        check_int("sample_rate", sample_rate, 1)
        check_int("degradations", degradations, 1)
        check_interval("val_fraction", val_fraction, 0, 1, high_open=True)
        check_pair("snr_db", snr_db, ordered=True)
        check_pair("gain_db", gain_db, ordered=True)
        check_pair("cutoff_hz", cutoff_hz, check_positive, ordered=True)
        check_positive("max_seconds", max_seconds)
        self.latents_dir = None if latents_dir is None else Path(latents_dir)
        self.encoder = encoder
        self.audio = audio
        self.corpus_options = dict(corpus or {})
        self.cache_dir = Path(cache_dir)
        self.encoder_key = encoder_key
        self.fallback_to_random = fallback_to_random
        self.latent_dim = latent_dim
        self.cond_dim = latent_dim if cond_dim is None else cond_dim
        self.segment_frames = segment_frames
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.sample_rate = sample_rate
        self.degradations = degradations
        self.snr_db = (float(snr_db[0]), float(snr_db[1]))
        self.gain_db = (float(gain_db[0]), float(gain_db[1]))
        self.cutoff_hz = (float(cutoff_hz[0]), float(cutoff_hz[1]))
        self.max_seconds = float(max_seconds)
        self._resolved: tuple[Callable[[Tensor], Tensor], str] | None = None
        self._corpus: Any = None
        self._items: dict[str, list[LatentItem]] | None = None
        self.train_dataset: LatentPairDataset | None = None
        self.val_dataset: LatentPairDataset | None = None

    # -- audio and encoder -------------------------------------------------------------------------------------------
    def _utterances(self) -> list[tuple[Path, str, str]]:
        """``(path, voice, utterance id)`` of every utterance to encode, sorted by id."""
        source = self.audio
        if source is None:
            if self._corpus is None:
                from lightning_stability.reference.data.speech_corpus import SpeechCorpusDataModule

                options = {"cache_dir": self.cache_dir / "speech", "seed": self.seed, **self.corpus_options}
                self._corpus = SpeechCorpusDataModule(**options)
            source = self._corpus
        if isinstance(source, (str, Path)):
            root = Path(source)
            if not root.is_dir():
                raise FileNotFoundError(f"`audio` folder {str(root)!r} does not exist")
            files = scan_audio_files(root, _AUDIO_EXTENSIONS)
            if not files:
                raise FileNotFoundError(f"`audio` folder {str(root)!r} holds no {'/'.join(_AUDIO_EXTENSIONS)} files")
            return [(f, f.parent.name, str(f.relative_to(root).with_suffix(""))) for f in files]
        if not callable(getattr(source, "utterances", None)):
            raise TypeError(
                f"`audio` must be a folder or an object with `utterances()` (SpeechCorpusDataModule), got "
                f"{type(source).__name__}"
            )
        if callable(getattr(source, "prepare_data", None)):
            source.prepare_data()
        return sorted(((Path(u.path), str(u.voice), str(u.id)) for u in source.utterances("all")), key=lambda u: u[2])

    def _resolve_encoder(self) -> tuple[Callable[[Tensor], Tensor], str]:
        """The encoder function and its cache identity (resolved once: a checkpoint is loaded once)."""
        if self._resolved is None:
            self._resolved = self._build_encoder()
        return self._resolved

    def _build_encoder(self) -> tuple[Callable[[Tensor], Tensor], str]:
        enc = self.encoder
        if enc is None:
            module = RandomConvEncoder(self.latent_dim, seed=self.seed)
            return _module_fn(module), self.encoder_key or f"random-conv-{self.latent_dim}-{self.seed}"
        if isinstance(enc, (str, Path)):
            path = Path(enc)
            if not path.is_file():
                if self.fallback_to_random:
                    rank_zero_info(
                        f"LatentPairDataModule: no codec checkpoint at {str(path)!r}; using the fixed random encoder "
                        "(RandomConvEncoder) instead"
                    )
                    module = RandomConvEncoder(self.latent_dim, seed=self.seed)
                    return _module_fn(module), self.encoder_key or f"random-conv-{self.latent_dim}-{self.seed}"
                raise FileNotFoundError(f"`encoder` checkpoint {str(path)!r} does not exist")
            # the codec side turns its checkpoint into the encoder callable; this module only runs callables
            from lightning_stability.reference.codec.latents import load_codec_encoder

            key = self.encoder_key or f"codec-{_file_digest(path)}"
            return _module_fn(load_codec_encoder(path, sample_rate=self.sample_rate)), key
        if isinstance(enc, nn.Module):
            return _module_fn(enc), self.encoder_key or f"{type(enc).__qualname__}-{_module_digest(enc)}"
        name = getattr(enc, "__qualname__", type(enc).__qualname__)
        return enc, self.encoder_key or f"callable-{getattr(enc, '__module__', '')}.{name}"

    def cache_key(self, utterances: Sequence[tuple[Path, str, str]], encoder_id: str) -> str:
        """Hash of everything that determines the cached latents."""
        h = hashlib.sha256()
        params = {
            "version": CACHE_VERSION,
            "encoder": encoder_id,
            "sample_rate": self.sample_rate,
            "degradations": self.degradations,
            "snr_db": self.snr_db,
            "gain_db": self.gain_db,
            "cutoff_hz": self.cutoff_hz,
            "max_seconds": self.max_seconds,
            "seed": self.seed,
            "utterances": [(str(p.resolve()), v, u, p.stat().st_size, p.stat().st_mtime_ns) for p, v, u in utterances],
        }
        h.update(json.dumps(params, sort_keys=True).encode())
        return h.hexdigest()

    def _encode(self, fn: Callable[[Tensor], Tensor], audio: Tensor, path: Path) -> Tensor:
        """``fn(audio [1, 1, S]) -> [D, T]`` with the output checked."""
        with torch.no_grad():
            latents = fn(audio[None, None, :])
        if isinstance(latents, (tuple, list)):
            raise TypeError(
                f"the encoder must return one latents tensor [B, {self.latent_dim}, T], got a {type(latents).__name__} "
                f"of {len(latents)} items (for {path})"
            )
        if not torch.is_tensor(latents) or latents.ndim != 3 or latents.shape[0] != 1:
            shape = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(
                f"the encoder must map audio [B=1, 1, S={audio.shape[0]}] to latents [B=1, D={self.latent_dim}, T] "
                f"(rank 3), got {shape} (for {path})"
            )
        if latents.shape[1] != self.latent_dim:
            raise ValueError(
                f"the encoder returned latents of shape {tuple(latents.shape)}: D={latents.shape[1]} but "
                f"`latent_dim`={self.latent_dim} (for {path})"
            )
        if latents.shape[2] == 0:
            raise ValueError(f"the encoder returned 0 frames for {path} ({audio.shape[0]} samples)")
        if not torch.isfinite(latents).all():
            raise ValueError(f"the encoder returned non-finite latents for {path}")
        return latents[0].float().cpu().contiguous()

    def computed_dir(self) -> Path:
        """The cache folder of the computed latents (encoder mode)."""
        utterances = self._utterances()
        _, encoder_id = self._resolve_encoder()
        return self.cache_dir / f"latents-{self.cache_key(utterances, encoder_id)[:16]}"

    def prepare_data(self) -> None:
        """Encoder mode: compute and cache the latents (once; reused when the cache exists)."""
        if self.latents_dir is not None:
            return
        utterances = self._utterances()
        fn, encoder_id = self._resolve_encoder()
        final = self.cache_dir / f"latents-{self.cache_key(utterances, encoder_id)[:16]}"
        if (final / "manifest.json").is_file():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            records = []
            for index, (path, voice, utt) in enumerate(utterances):
                mono, rate = read_mono(path)
                clean = resample(torch.from_numpy(mono), rate, self.sample_rate).float()
                clean = clean[: int(self.max_seconds * self.sample_rate)]
                target = self._encode(fn, clean, path)
                for version in range(self.degradations):
                    rng = np.random.default_rng([self.seed, index, version, 0xDE6])
                    g = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
                    noisy = degrade(
                        clean,
                        self.sample_rate,
                        snr_db=float(rng.uniform(*self.snr_db)),
                        gain_db=float(rng.uniform(*self.gain_db)),
                        cutoff_hz=float(rng.uniform(*self.cutoff_hz)),
                        generator=g,
                    )
                    source = self._encode(fn, noisy, path)
                    name = f"{index:06d}-{version}.pt"
                    torch.save({"source": source, "target": target, "voice": voice, "utterance": utt}, tmp / name)
                    records.append({"file": name, "audio": str(path), "voice": voice, "utterance": utt})
            manifest = {"version": CACHE_VERSION, "latent_dim": self.latent_dim, "items": records}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished first: keep its cache
                if not (final / "manifest.json").is_file():
                    raise
            rank_zero_info(f"LatentPairDataModule: cached {len(records)} latent pairs in {final}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # -- loading -----------------------------------------------------------------------------------------------------
    def _load_item(self, path: Path) -> LatentItem:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling problem is reported by path
            raise ValueError(f"cannot load latent file {path}: {type(err).__name__}: {err}") from None
        if not isinstance(data, Mapping) or "source" not in data or "target" not in data:
            keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"latent file {path} must hold a dict with 'source' and 'target' tensors, got {keys}")
        source, target = data["source"], data["target"]
        for name, x in (("source", source), ("target", target)):
            if not torch.is_tensor(x) or not x.is_floating_point() or x.ndim != 2:
                got = f"shape {tuple(x.shape)} {x.dtype}" if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"'{name}' in {path} must be a float tensor [D={self.latent_dim}, T], got {got}")
            if x.shape[0] != self.latent_dim:
                raise ValueError(
                    f"'{name}' in {path} has shape {tuple(x.shape)}: D={x.shape[0]} but `latent_dim`={self.latent_dim}"
                )
            if x.shape[1] == 0:
                raise ValueError(f"'{name}' in {path} has no frames (shape {tuple(x.shape)})")
        if source.shape != target.shape:
            raise ValueError(
                f"'source' {tuple(source.shape)} and 'target' {tuple(target.shape)} in {path} must have the same shape"
            )
        cond = data.get("conditioning")
        if cond is not None:
            if not torch.is_tensor(cond) or cond.ndim != 2 or cond.shape[0] != self.cond_dim or cond.shape[1] == 0:
                got = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
                raise ValueError(f"'conditioning' in {path} must be a tensor [Dc={self.cond_dim}, T>0], got {got}")
            cond = cond.float()
        voice = data.get("voice")
        utterance = data.get("utterance", str(path))
        return LatentItem(
            source.float(), target.float(), cond, None if voice is None else str(voice), str(utterance), path
        )

    def _load_folder(self, folder: Path) -> list[LatentItem]:
        if not folder.is_dir():
            raise FileNotFoundError(f"`latents_dir` {str(folder)!r} does not exist")
        files = sorted(
            p for p in folder.rglob("*.pt") if not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        if not files:
            raise FileNotFoundError(f"`latents_dir` {str(folder)!r} holds no .pt files")
        return [self._load_item(p) for p in files]

    def _split(self, items: list[LatentItem]) -> dict[str, list[LatentItem]]:
        utterances = sorted({it.utterance for it in items})
        n_val = math.ceil(self.val_fraction * len(utterances)) if self.val_fraction > 0 else 0
        if n_val >= len(utterances) and n_val > 0:
            raise ValueError(
                f"`val_fraction`={self.val_fraction} holds out all {len(utterances)} utterances; lower it or add data"
            )
        order = np.random.default_rng([self.seed, 0x5B11]).permutation(len(utterances))
        held = {utterances[i] for i in order[:n_val]}
        return {
            "train": [it for it in items if it.utterance not in held],
            "val": [it for it in items if it.utterance in held],
        }

    def _pools(self, items: list[LatentItem], fallback: list[LatentItem]) -> list[list[LatentItem]] | None:
        """For each item without own conditioning: the other utterances of its voice (one item per utterance)."""
        if not self.cond_dim or all(it.conditioning is not None for it in items):
            return None

        def by_voice(pool: list[LatentItem]) -> dict[str, dict[str, LatentItem]]:
            out: dict[str, dict[str, LatentItem]] = {}
            for it in pool:
                if it.voice is not None:
                    out.setdefault(it.voice, {}).setdefault(it.utterance, it)
            return out

        own, other = by_voice(items), by_voice(fallback)
        pools = []
        for it in items:
            if it.conditioning is not None:
                pools.append([])
                continue
            if it.voice is None:
                raise ValueError(
                    f"{it.path or it.utterance}: no 'conditioning' and no 'voice' to draw it from another utterance "
                    "of the same voice (add either, or use cond_dim=0)"
                )
            candidates = [c for u, c in sorted(own.get(it.voice, {}).items()) if u != it.utterance]
            if not candidates:
                candidates = [c for u, c in sorted(other.get(it.voice, {}).items()) if u != it.utterance]
            if not candidates:
                raise ValueError(
                    f"voice {it.voice!r} has a single utterance ({it.utterance!r}): conditioning is the latents of "
                    "another utterance of the same voice; add utterances or give files their own 'conditioning'"
                )
            pools.append(candidates)
        return pools

    def setup(self, stage: str | None = None) -> None:
        """Load (and check) every example once, split by utterance, build the datasets."""
        if self._items is None:
            if self.latents_dir is not None:
                items = self._load_folder(self.latents_dir)
            else:
                folder = self.computed_dir()
                if not (folder / "manifest.json").is_file():
                    self.prepare_data()  # outside a Trainer (or prepare_data_per_node=False on another node)
                items = self._load_folder(folder)
            self._items = self._split(items)
        train, val = self._items["train"], self._items["val"]
        use_cond = self.cond_dim > 0
        self.train_dataset = LatentPairDataset(
            train,
            segment_frames=self.segment_frames,
            seed=self.seed,
            cond_pool=self._pools(train, []),
            use_conditioning=use_cond,
        )
        self.val_dataset = LatentPairDataset(
            val,
            segment_frames=self.segment_frames,
            seed=self.seed,
            cond_pool=self._pools(val, train),
            use_conditioning=use_cond,
        )

    def items(self, split: str = "train") -> list[LatentItem]:
        """The loaded examples of ``split`` ("train" or "val")."""
        if self._items is None:
            self.setup()
        assert self._items is not None
        return list(self._items[split])

    def _current_epoch(self) -> int:
        trainer = self.trainer
        return int(trainer.current_epoch) if trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        epoch_fn = self._current_epoch if self.trainer is not None else None
        sampler = EpochShuffleSampler(len(self.train_dataset), self.seed, shuffle=True, epoch_fn=epoch_fn)
        return ResumableDataLoader(  # resumes mid-epoch from a checkpoint
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_latents,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            self.setup("validate")
        assert self.val_dataset is not None
        if len(self.val_dataset) == 0:
            return []
        return DataLoader(
            self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=collate_latents
        )


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------
def _module_fn(module: nn.Module) -> Callable[[Tensor], Tensor]:
    module.eval()
    module.requires_grad_(False)

    def fn(audio: Tensor) -> Tensor:
        with torch.no_grad():
            return module(audio)

    return fn


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def __getattr__(name: str) -> Any:
    # 0.1 defined the codec's latent encoder here; it lives with the codec now (this module never loads a codec)
    if name == "CodecLatentEncoder":
        from lightning_stability.reference.codec.latents import CodecLatentEncoder

        return CodecLatentEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
