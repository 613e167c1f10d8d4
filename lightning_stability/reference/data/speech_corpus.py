"""``SpeechCorpusDataModule``: a synthetic multi-voice speech corpus generated with eSpeak NG, cached on disk."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

from lightning_stability._checks import check_choice, check_int, check_pair, check_path, check_sequence, check_str
from lightning_stability.reference.data._audio import ClipInfo, write_text_atomic
from lightning_stability.reference.data.audio_folder import AudioFolderDataModule

GENERATOR_VERSION = 1  # bump when the plan or the audio written for the same parameters changes
CHUNK_SIZE = 32  # utterances per synthesis subprocess (part of the corpus key: output depends on chunking)
MANIFEST = "manifest.json"
DEFAULT_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3", "klatt4",
)  # fmt: skip
"""eSpeak NG variants used for the corpus voices: human-like male/female formant voices and the Klatt synthesiser."""


def default_cache_dir() -> Path:
    """``$LIGHTNING_STABILITY_CACHE/speech`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)
    ``/lightning_stability/speech``."""
    root = os.environ.get("LIGHTNING_STABILITY_CACHE")
    if root:
        return Path(root) / "speech"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lightning_stability" / "speech"


def bundled_languages() -> list[str]:
    """Languages with a bundled sentence list (``lightning_stability/reference/data/texts/<language>.txt``)."""
    folder = resources.files("lightning_stability.reference.data") / "texts"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def bundled_sentences(language: str) -> list[str]:
    """The bundled sentences of ``language`` (one per line in ``texts/<language>.txt``).

    ``te``: 79 simple everyday Telugu sentences in Telugu script; ``en``: 50 English ones.
    """
    path = resources.files("lightning_stability.reference.data") / "texts" / f"{language}.txt"
    if not path.is_file():
        raise ValueError(
            f"`language` {language!r} has no bundled sentence list (bundled: {bundled_languages()}); "
            f"pass your own with `sentences=[...]`"
        )
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass(frozen=True)
class Utterance:
    """One corpus utterance: its wav ``path`` (22 050 Hz, 16-bit), text and how eSpeak NG spoke it.

    ``voice_id`` is the corpus speaker index (0 .. num_voices-1); ``voice`` the eSpeak voice name (``"te+f2"``);
    ``pitch``/``pitch_range`` (0-99) and ``rate`` (words per minute) the eSpeak parameters.
    """

    id: str
    path: Path
    text: str
    language: str
    voice: str
    voice_id: int
    variant: str
    pitch: int
    pitch_range: int
    rate: int
    seed: int
    num_samples: int
    sample_rate: int

    @property
    def duration(self) -> float:
        return self.num_samples / self.sample_rate


class SpeechCorpusDataModule(AudioFolderDataModule):
    """Multi-voice synthetic speech (eSpeak NG, Telugu by default) generated once into ``cache_dir``, then loaded
    exactly as :class:`AudioFolderDataModule` loads a folder (same resampling, crops, loudness, batches ``[B, 1, T]``).

    Generation (``prepare_data``; on one process per node under DDP):

    - ``num_voices`` speakers, each an eSpeak variant (from ``variants``, default :data:`DEFAULT_VARIANTS`, drawn
      without repetition while possible) with its own base pitch (35-65) and pitch range (30-80);
    - ``num_utterances`` utterances, speakers assigned round robin, each joining 1 to ``max_sentences`` different
      sentences (bundled list for ``language``, or ``sentences``), spoken at a rate drawn from ``rate_range``
      words/min with the speaker's pitch +-6;
    - everything drawn from ``numpy.random.default_rng(seed)``; synthesis runs in fresh subprocesses of
      :data:`CHUNK_SIZE` utterances (see :mod:`lightning_stability.reference.data.espeak`), so the same parameters give
      byte-identical wav files with the same eSpeak NG build (checked across processes and worker counts;
      the Klatt voices use floating-point maths, so a different libm could differ in the last bits).

    Cache: the corpus lives in ``cache_dir/<language>-<key>`` where ``key`` hashes every generation parameter, the
    sentence list, the eSpeak NG package version and :data:`GENERATOR_VERSION`; any change generates a new folder, an
    existing one is reused untouched. A corpus is written into a hidden temporary folder (``.tmp-...``) and renamed
    into place only once every wav and finally ``manifest.json`` are complete, so an interrupted generation never
    leaves a usable partial corpus; leftovers of dead processes are removed by the next generation.

    Split: ``holdout="utterance"`` (default) holds out a seeded ``val_fraction`` of the utterances, so the
    validation voices also occur in training (the voices overlap; the sentence combinations rarely repeat);
    ``holdout="voice"`` holds out ``ceil(val_fraction * num_voices)`` whole voices (unseen speakers).

    The manifest (``manifest.json``) records, per utterance: ``id``, ``path`` (relative), ``text``, ``voice``,
    ``voice_id``, ``variant``, ``pitch``, ``pitch_range``, ``rate``, ``seed``, ``num_samples``, ``duration``; and
    the generation parameters, key, eSpeak version and generation time. Read it with :meth:`utterances`.

    Args:
        cache_dir: folder holding generated corpora (default: :func:`default_cache_dir`).
        language: eSpeak NG language code ("te", "en", ...; see ``espeak.list_voices()``).
        num_utterances: corpus size.
        num_voices: number of distinct speakers.
        sentences: text to speak instead of the bundled list (required for a language without one).
        max_sentences: an utterance joins 1..max_sentences sentences.
        rate_range: (min, max) speaking rate in words per minute.
        variants: eSpeak variants to draw speakers from.
        holdout: "utterance" or "voice" (see above).
        generation_workers: parallel synthesis subprocesses (default min(2, CPUs); does not change the audio).
        sample_rate, segment_seconds, batch_size, val_fraction, seed, num_workers, loudness_lufs, on_silent,
            min_seconds, val_segment_seconds, max_gain_db, cache_audio, pin_memory, persistent_workers, drop_last:
            as for :class:`AudioFolderDataModule` (``seed`` also seeds the generation). An unreadable corpus file
            always raises (a damaged cache; delete the corpus folder to regenerate it).
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        language: str = "te",
        num_utterances: int = 240,
        num_voices: int = 8,
        sentences: Sequence[str] | None = None,
        max_sentences: int = 2,
        rate_range: tuple[int, int] = (140, 200),
        variants: Sequence[str] | None = None,
        holdout: Literal["utterance", "voice"] = "utterance",
        generation_workers: int | None = None,
        sample_rate: int = 24000,
        segment_seconds: float = 1.0,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        seed: int = 0,
        num_workers: int = 0,
        loudness_lufs: float | None = None,
        on_silent: Literal["raise", "skip", "keep"] = "skip",
        min_seconds: float = 0.0,
        val_segment_seconds: float | None = None,
        max_gain_db: float = 30.0,
        cache_audio: bool = False,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        drop_last: bool = False,
    ) -> None:
        if cache_dir is None:
            cache_dir = default_cache_dir()
        cache_dir = check_path("cache_dir", cache_dir)
        check_str("language", language)
        if "+" in language or "/" in language:
            raise ValueError(f"`language` must be an eSpeak NG language code such as 'te' or 'en', got {language!r}")
        check_int("num_utterances", num_utterances, 1)
        check_int("num_voices", num_voices, 1)
        check_int("max_sentences", max_sentences, 1)
        # words per minute, within eSpeak NG's range
        rate_range = check_pair("rate_range", rate_range, partial(check_int, minimum=80, maximum=450), ordered=True)
        check_choice("holdout", holdout, ("utterance", "voice"))
        if sentences is not None:
            sentences = check_sequence(
                "sentences", sentences, partial(check_str, allow_empty=True), min_length=0, noun="a sequence of str"
            )
            sentences = [s.strip() for s in sentences if s.strip()]
            if not sentences:
                raise ValueError("`sentences` must hold at least one non-empty sentence, got only empty ones")
        else:
            sentences = bundled_sentences(language)
        if variants is not None:
            variants = list(check_sequence("variants", variants, check_str, noun="a sequence of eSpeak variant names"))
        else:
            variants = list(DEFAULT_VARIANTS)
        check_int("generation_workers", generation_workers, 1, allow_none=True)
        self.cache_dir = Path(cache_dir)
        self.language = language
        self.num_utterances = num_utterances
        self.num_voices = num_voices
        self.sentences = list(sentences)
        self.max_sentences = min(max_sentences, len(self.sentences))
        self.rate_range = (int(rate_range[0]), int(rate_range[1]))
        self.variants = variants
        self.holdout = holdout
        self.generation_workers = generation_workers or max(1, min(2, os.cpu_count() or 1))
        check_int("seed", seed)
        self.seed = seed  # the parent sets it too; the corpus key below needs it first
        super().__init__(
            self.cache_dir / f"{language}-{self.corpus_key()[:12]}",
            sample_rate=sample_rate,
            segment_seconds=segment_seconds,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            loudness_lufs=loudness_lufs,
            extensions=("wav",),
            on_error="raise",  # a generated file that cannot be read means a damaged cache: never skip silently
            on_silent=on_silent,
            min_seconds=min_seconds,
            val_segment_seconds=val_segment_seconds,
            max_gain_db=max_gain_db,
            cache_audio=cache_audio,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            drop_last=drop_last,
        )
        if holdout == "voice" and self.val_fraction > 0 and math.ceil(self.val_fraction * num_voices) >= num_voices:
            raise ValueError(
                f"`holdout`='voice' with `val_fraction`={val_fraction} holds out every one of the {num_voices} voices"
            )

    # ------------------------------------------------------------------------------------------ identity

    def generation_params(self) -> dict[str, Any]:
        """Everything that determines the generated audio (hashed into the corpus key)."""
        try:
            espeak_package = metadata.version("espeakng-loader")
        except metadata.PackageNotFoundError:
            espeak_package = "missing"
        return {
            "generator": GENERATOR_VERSION,
            "chunk_size": CHUNK_SIZE,
            "espeakng_loader": espeak_package,
            "language": self.language,
            "num_utterances": self.num_utterances,
            "num_voices": self.num_voices,
            "max_sentences": self.max_sentences,
            "rate_range": list(self.rate_range),
            "variants": list(self.variants),
            "seed": self.seed,
            "sentences_sha256": hashlib.sha256("\n".join(self.sentences).encode()).hexdigest(),
        }

    def corpus_key(self) -> str:
        """SHA-256 of :meth:`generation_params` (its first 12 hex digits name the corpus folder)."""
        params = self.generation_params()
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()

    @property
    def corpus_dir(self) -> Path:
        """The folder of this corpus (``cache_dir/<language>-<key>``); it exists once generated."""
        return self.root

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def is_generated(self) -> bool:
        return self.manifest_path.is_file()

    # ------------------------------------------------------------------------------------------ generation

    def plan(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The seeded generation plan: ``(voices, utterances)`` as manifest records (without lengths)."""
        rng = np.random.default_rng([self.seed, 0x5EEC])
        order = [self.variants[i] for i in rng.permutation(len(self.variants))]
        voices = []
        for k in range(self.num_voices):
            variant = order[k % len(order)]
            voices.append(
                {
                    "voice_id": k,
                    "variant": variant,
                    "voice": f"{self.language}+{variant}",
                    "pitch": int(rng.integers(35, 66)),
                    "pitch_range": int(rng.integers(30, 81)),
                }
            )
        utterances = []
        width = max(5, len(str(self.num_utterances - 1)))
        for i in range(self.num_utterances):
            voice = voices[i % self.num_voices]
            count = int(rng.integers(1, self.max_sentences + 1))
            picks = rng.choice(len(self.sentences), size=count, replace=False)
            uid = f"{self.language}_{i:0{width}d}"
            utterances.append(
                {
                    "id": uid,
                    "path": f"wavs/{uid}.wav",
                    "text": " ".join(self.sentences[int(j)] for j in picks),
                    "voice": voice["voice"],
                    "voice_id": voice["voice_id"],
                    "variant": voice["variant"],
                    "pitch": int(np.clip(voice["pitch"] + rng.integers(-6, 7), 0, 99)),
                    "pitch_range": voice["pitch_range"],
                    "rate": int(rng.integers(self.rate_range[0], self.rate_range[1] + 1)),
                    "seed": int(rng.integers(0, 2**31 - 1)),
                }
            )
        return voices, utterances

    def prepare_data(self) -> None:
        """Generate the corpus into :attr:`corpus_dir` unless it already exists (then nothing is written)."""
        if self.is_generated():
            return
        self.generate()

    def generate(self) -> Path:
        """Synthesise the corpus atomically (temporary folder + rename) and return its folder."""
        from lightning_stability.reference.data import espeak

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        engine = espeak.engine()  # clear errors (missing package, unknown language/variant) before any work
        try:
            engine.check_voice(self.language)
        except ValueError as err:
            raise ValueError(f"`language` {self.language!r} cannot be spoken: {err}") from None
        for variant in sorted(set(self.variants)):
            try:
                engine.check_voice(f"{self.language}+{variant}")
            except ValueError as err:
                raise ValueError(f"`variants` contains {variant!r}, which eSpeak NG does not have: {err}") from None
        voices, utterances = self.plan()
        tmp = self.cache_dir / f".tmp-{self.root.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        started = time.perf_counter()
        try:
            (tmp / "wavs").mkdir(parents=True)
            jobs = [
                espeak.SynthesisJob(
                    text=u["text"],
                    path=str(tmp / u["path"]),
                    voice=u["voice"],
                    rate=u["rate"],
                    pitch=u["pitch"],
                    pitch_range=u["pitch_range"],
                    seed=u["seed"],
                )
                for u in utterances
            ]
            chunks = [jobs[i : i + CHUNK_SIZE] for i in range(0, len(jobs), CHUNK_SIZE)]
            lengths = [n for chunk in self._synthesize(chunks) for n in chunk]
            if len(lengths) != len(utterances):
                raise RuntimeError(f"synthesis returned {len(lengths)} lengths for {len(utterances)} utterances")
            for record, n in zip(utterances, lengths):
                if n <= 0:
                    raise RuntimeError(f"eSpeak NG produced no audio for utterance {record['id']}: {record['text']!r}")
                record["num_samples"] = n
                record["duration"] = round(n / espeak.SAMPLE_RATE, 6)
            seconds = time.perf_counter() - started
            manifest = {
                "format": 1,
                "key": self.corpus_key(),
                "params": self.generation_params(),
                "espeak_version": engine.version,
                "sample_rate": espeak.SAMPLE_RATE,
                "voices": voices,
                "utterances": utterances,
                "total_seconds": round(sum(u["duration"] for u in utterances), 3),
            }
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, ensure_ascii=False, indent=1))
            try:
                os.rename(tmp, self.root)
            except OSError:
                if not self.is_generated():  # not a lost race with another process: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        rank_zero_info(
            f"SpeechCorpusDataModule: generated {len(utterances)} {self.language} utterances "
            f"({manifest['total_seconds'] / 60:.1f} min of audio, {self.num_voices} voices) in {seconds:.1f} s "
            f"into {self.root}"
        )
        return self.root

    def _synthesize(self, chunks):
        from lightning_stability.reference.data import espeak

        return espeak.synthesize_to_files(chunks, workers=self.generation_workers)

    def _remove_stale_temporaries(self) -> None:
        """Delete ``.tmp-*`` folders of this corpus left by processes that no longer run on this host."""
        host = socket.gethostname()
        for path in self.cache_dir.glob(f".tmp-{self.root.name}-*"):
            parts = path.name[len(f".tmp-{self.root.name}-") :].rsplit("-", 2)  # host (may hold '-'), pid, random
            owner_host, pid = (parts[0], parts[1]) if len(parts) == 3 else ("", "")
            alive = owner_host == host and pid.isdigit() and _pid_alive(int(pid))
            too_old = time.time() - path.stat().st_mtime > 24 * 3600
            if not alive and (owner_host == host or too_old):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ loading

    def manifest(self) -> dict[str, Any]:
        """The parsed ``manifest.json`` of this corpus (generating the corpus first if needed)."""
        if not self.is_generated():
            self._generate_if_allowed()
        with open(self.manifest_path, encoding="utf-8") as f:
            return json.load(f)

    def _generate_if_allowed(self) -> None:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            raise RuntimeError(
                f"the speech corpus {str(self.root)!r} does not exist on this rank: `prepare_data()` generates it on "
                f"local rank 0; make `cache_dir` a folder every rank of a node shares"
            )
        self.prepare_data()

    def _candidate_files(self) -> list[Path]:
        files = [self.root / u["path"] for u in self.manifest()["utterances"]]
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise RuntimeError(
                f"the speech corpus {str(self.root)!r} is damaged: {len(missing)} file(s) listed in its manifest are "
                f"missing (first: {str(missing[0])!r}); delete the folder to regenerate it"
            )
        return files

    def _split(self, clips: list[ClipInfo]) -> dict[str, list[ClipInfo]]:
        if self.holdout == "utterance":
            return super()._split(clips)
        voice_of = {self.root / u["path"]: u["voice_id"] for u in self.manifest()["utterances"]}
        n_val = math.ceil(self.val_fraction * self.num_voices) if self.val_fraction > 0 else 0
        held = {int(v) for v in np.random.default_rng(self.seed).permutation(self.num_voices)[:n_val]}
        return {
            "train": [c for c in clips if voice_of[c.path] not in held],
            "val": [c for c in clips if voice_of[c.path] in held],
        }

    def utterances(self, split: Literal["all", "train", "val"] = "all") -> list[Utterance]:
        """The corpus utterances with their metadata, in id order.

        ``"all"`` reads the manifest only (generating the corpus when missing, outside DDP); ``"train"``/``"val"``
        return the utterances of this module's split (running ``setup`` when needed: files are checked once).
        """
        if split not in ("all", "train", "val"):
            raise ValueError(f"`split` must be 'all', 'train' or 'val', got {split!r}")
        manifest = self.manifest()
        records = manifest["utterances"]
        if split != "all":
            if self._clips is None:
                self.setup()
            keep = {c.path for c in self.clips(split)}
            records = [u for u in records if self.root / u["path"] in keep]
        rate = int(manifest["sample_rate"])
        return [
            Utterance(
                id=u["id"],
                path=self.root / u["path"],
                text=u["text"],
                language=self.language,
                voice=u["voice"],
                voice_id=int(u["voice_id"]),
                variant=u["variant"],
                pitch=int(u["pitch"]),
                pitch_range=int(u["pitch_range"]),
                rate=int(u["rate"]),
                seed=int(u["seed"]),
                num_samples=int(u["num_samples"]),
                sample_rate=rate,
            )
            for u in records
        ]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "DEFAULT_VARIANTS",
    "SpeechCorpusDataModule",
    "Utterance",
    "bundled_languages",
    "bundled_sentences",
    "default_cache_dir",
]
