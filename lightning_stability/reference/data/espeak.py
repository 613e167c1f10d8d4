"""A ctypes wrapper around eSpeak NG, the formant speech synthesiser shipped by the PyPI package ``espeakng-loader``.

eSpeak NG (https://github.com/espeak-ng/espeak-ng) turns text in ~100 languages (Telugu ``te`` among them) into
22 050 Hz mono int16 speech with no model weights. ``espeakng-loader`` ships the shared library and its voice data;
this module loads them with :mod:`ctypes` and drives the classic C API::

    espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path, espeakINITIALIZE_DONT_EXIT)  -> sample rate
    espeak_SetSynthCallback(callback)      # receives int16 chunks while espeak_Synth runs
    espeak_SetVoiceByName("te+f2")         # language + optional variant (voices/!v/<variant>)
    espeak_SetParameter(espeakRATE | espeakPITCH | espeakRANGE | ..., value, 0)
    espeak_ng_SetRandSeed(seed)            # noise sources of the Klatt voices
    espeak_Synth(text, size, 0, POS_CHARACTER, 0, espeakCHARS_UTF8, NULL, NULL)

The library is a process-wide singleton and not thread-safe: every call here holds one module lock, and the ctypes
callback object is kept alive on the :class:`ESpeakNG` instance for as long as the library may call it.

Reproducibility. eSpeak keeps some synthesiser state in C ``static`` variables that no API call resets (the pitch
"flutter" phase in ``wavegen.c`` advances with every sample generated), so the same text synthesised twice in one
process differs slightly. Output is a pure function of the sequence of calls made since the process started.
:func:`synthesize_to_files` therefore runs every chunk of work in a fresh subprocess, which makes a generated corpus
byte-identical for identical inputs (and lets two chunks run in parallel on two cores); :func:`synthesize` runs in
the calling process and is only "deterministic up to the flutter phase".
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lightning_stability._checks import check_int, check_positive, check_str

SAMPLE_RATE = 22050
"""eSpeak NG's output rate in Hz (int16 mono)."""

# espeak_AUDIO_OUTPUT, espeak_POSITION_TYPE, flags and espeak_PARAMETER from speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_INITIALIZE_DONT_EXIT = 0x8000
_EE_OK, _EE_INTERNAL_ERROR, _EE_BUFFER_FULL, _EE_NOT_FOUND = 0, -1, 1, 2
_PARAM_RATE, _PARAM_VOLUME, _PARAM_PITCH, _PARAM_RANGE, _PARAM_WORDGAP = 1, 2, 3, 4, 7

RATE_LIMITS = (80, 450)  # words per minute accepted by espeakRATE
PITCH_LIMITS = (0, 99)  # espeakPITCH and espeakRANGE, 50 = voice default


class ESpeakError(RuntimeError):
    """eSpeak NG could not be loaded, initialised or asked to synthesise."""


class _Voice(ctypes.Structure):
    # espeak_VOICE from speak_lib.h
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_char_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# int callback(short *wav, int numsamples, espeak_EVENT *events); return 0 to continue, 1 to abort
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class VoiceInfo:
    """One eSpeak NG language voice: ``name`` ("Telugu"), ``language`` ("te"), ``identifier`` ("dra/te")."""

    name: str
    language: str
    identifier: str


@dataclass(frozen=True)
class SynthesisJob:
    """One utterance for :func:`synthesize_to_files`: ``text`` spoken by ``voice`` into ``path`` (a wav file)."""

    text: str
    path: str
    voice: str = "te"
    rate: int = 175
    pitch: int = 50
    pitch_range: int = 50
    seed: int = 0


_LOCK = threading.RLock()
_ENGINE: ESpeakNG | None = None


def _loader():
    try:
        import espeakng_loader
    except ImportError as err:
        raise ESpeakError(
            "eSpeak NG is not available: the speech corpus needs the PyPI package `espeakng-loader` "
            "(pip install 'lightning-stability[speech]' or pip install espeakng-loader)"
        ) from err
    return espeakng_loader


class ESpeakNG:
    """The loaded eSpeak NG library (one per process; get it with :func:`engine`).

    Raises:
        ESpeakError: the library or its data could not be loaded or initialised.
    """

    def __init__(self) -> None:
        loader = _loader()
        lib_path, data_path = loader.get_library_path(), loader.get_data_path()
        try:
            lib = ctypes.CDLL(lib_path)
        except OSError as err:
            raise ESpeakError(f"cannot load the eSpeak NG library {lib_path!r}: {err}") from err
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        lib.espeak_Info.argtypes = [ctypes.POINTER(ctypes.c_char_p)]
        lib.espeak_Info.restype = ctypes.c_char_p
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ng_SetRandSeed.restype = None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate != SAMPLE_RATE:
            raise ESpeakError(
                f"espeak_Initialize failed (returned {rate}, expected the sample rate {SAMPLE_RATE}) "
                f"with data path {data_path!r}"
            )
        self._lib = lib
        self.data_path = Path(data_path)
        self.version = lib.espeak_Info(None).decode()
        self._chunks: list[np.ndarray] = []
        self._callback = _SynthCallback(self._on_audio)  # kept alive: the library holds a raw pointer to it
        lib.espeak_SetSynthCallback(self._callback)
        self._voices: list[VoiceInfo] | None = None

    def _on_audio(self, wav, numsamples: int, events) -> int:
        if numsamples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        return 0

    def voices(self) -> list[VoiceInfo]:
        """Every language voice of the installed data (``espeak_ListVoices``), sorted by language code."""
        with _LOCK:
            if self._voices is None:
                table = self._lib.espeak_ListVoices(None)
                voices, i = [], 0
                while table[i]:
                    v = table[i].contents
                    # `languages` is a priority byte followed by a NUL-terminated language name
                    voices.append(VoiceInfo(v.name.decode(), v.languages[1:].decode(), v.identifier.decode()))
                    i += 1
                self._voices = sorted(voices, key=lambda v: v.language)
            return list(self._voices)

    def variants(self) -> list[str]:
        """Names of the voice variants (``te+<variant>``): the files in ``espeak-ng-data/voices/!v``."""
        return sorted(p.name for p in (self.data_path / "voices" / "!v").iterdir() if p.is_file())

    def check_voice(self, voice: str) -> None:
        """Raise ``ValueError`` naming ``voice`` unless it is ``<language>`` or ``<language>+<variant>`` we have."""
        check_str("voice", voice)
        language, _, variant = voice.partition("+")
        known = {v.language for v in self.voices()} | {v.identifier for v in self.voices()}
        known |= {v.identifier.rsplit("/", 1)[-1] for v in self.voices()}
        if language not in known:
            codes = [v.language for v in self.voices()]
            close = [c for c in codes if c[:1] == language[:1]][:8]
            some = close + [c for c in ("en", "te", "hi", "ta", "de", "fr", "es") if c in codes and c not in close]
            raise ValueError(
                f"`voice` {voice!r}: eSpeak NG has no language {language!r}; "
                f"available include {some} ({len(self.voices())} voices, see `list_voices()`)"
            )
        if variant and variant not in self.variants():
            raise ValueError(
                f"`voice` {voice!r}: unknown variant {variant!r}; available include {self.variants()[:20]} "
                f"(see `list_variants()`)"
            )

    def synthesize(
        self,
        text: str,
        voice: str = "te",
        *,
        rate: int = 175,
        pitch: int = 50,
        pitch_range: int = 50,
        seed: int = 0,
    ) -> np.ndarray:
        """Speak ``text`` with ``voice`` and return the int16 samples at :data:`SAMPLE_RATE` Hz.

        Args:
            text: UTF-8 text in the voice's language (non-empty).
            voice: ``"<language>"`` or ``"<language>+<variant>"`` (e.g. ``"te"``, ``"te+f2"``, ``"en+klatt"``).
            rate: speaking rate in words per minute, 80-450 (eSpeak default 175).
            pitch: base pitch 0-99 (50 = the voice's own).
            pitch_range: pitch variation 0-99 (0 = monotone, 50 = the voice's own).
            seed: seed of eSpeak's noise generator (``espeak_ng_SetRandSeed``).

        Raises:
            TypeError: a parameter of the wrong type (the message names it).
            ValueError: empty text, unknown voice, or a parameter out of range (the message names it).
            ESpeakError: the library reported an error.
        """
        check_str("text", text)
        check_int("rate", rate, RATE_LIMITS[0], maximum=RATE_LIMITS[1])
        check_int("pitch", pitch, PITCH_LIMITS[0], maximum=PITCH_LIMITS[1])
        check_int("pitch_range", pitch_range, PITCH_LIMITS[0], maximum=PITCH_LIMITS[1])
        check_int("seed", seed)
        self.check_voice(voice)
        data = text.encode("utf-8") + b"\0"
        with _LOCK:
            lib = self._lib
            status = lib.espeak_SetVoiceByName(voice.encode())
            if status != _EE_OK:
                raise ESpeakError(f"espeak_SetVoiceByName({voice!r}) failed with status {status}")
            for param, value in ((_PARAM_RATE, rate), (_PARAM_PITCH, pitch), (_PARAM_RANGE, pitch_range)):
                lib.espeak_SetParameter(param, int(value), 0)
            lib.espeak_ng_SetRandSeed(int(seed))
            self._chunks = []
            status = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            chunks, self._chunks = self._chunks, []
        if status != _EE_OK:
            raise ESpeakError(f"espeak_Synth failed with status {status} for voice {voice!r} and text {text[:60]!r}")
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)


def engine() -> ESpeakNG:
    """The process-wide :class:`ESpeakNG` (loaded and initialised on first use)."""
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = ESpeakNG()
        return _ENGINE


def list_voices() -> list[VoiceInfo]:
    """All languages eSpeak NG can speak (``espeak_ListVoices``)."""
    return engine().voices()


def list_variants() -> list[str]:
    """All voice variants usable as ``"<language>+<variant>"``."""
    return engine().variants()


def espeak_version() -> str:
    """The eSpeak NG library version (``espeak_Info``)."""
    return engine().version


def synthesize(
    text: str,
    voice: str = "te",
    *,
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Speak ``text`` in this process; int16 samples at 22 050 Hz. See :meth:`ESpeakNG.synthesize`."""
    return engine().synthesize(text, voice, rate=rate, pitch=pitch, pitch_range=pitch_range, seed=seed)


def _write_pcm16(path: str, samples: np.ndarray) -> None:
    import soundfile as sf

    sf.write(path, samples, SAMPLE_RATE, subtype="PCM_16", format="WAV")


def _run_jobs(jobs: Sequence[SynthesisJob]) -> list[int]:
    """Synthesise ``jobs`` in order in this process, write their wav files, return their lengths in samples."""
    lengths = []
    for job in jobs:
        samples = synthesize(
            job.text, job.voice, rate=job.rate, pitch=job.pitch, pitch_range=job.pitch_range, seed=job.seed
        )
        _write_pcm16(job.path, samples)
        lengths.append(int(samples.shape[0]))
    return lengths


def _worker_main() -> None:
    """Entry point of a synthesis subprocess: JSON list of jobs on stdin, JSON list of lengths on stdout."""
    jobs = [SynthesisJob(**job) for job in json.load(sys.stdin)]
    try:
        lengths = _run_jobs(jobs)
    except (ValueError, TypeError, ESpeakError) as err:
        sys.stderr.write(f"{type(err).__name__}: {err}\n")
        sys.exit(3)
    json.dump(lengths, sys.stdout)


def synthesize_to_files(
    chunks: Sequence[Sequence[SynthesisJob]],
    *,
    workers: int = 2,
    timeout: float = 600.0,
) -> list[list[int]]:
    """Synthesise each chunk of jobs in a fresh Python subprocess, at most ``workers`` at a time.

    A chunk's audio depends only on the chunk's own jobs (a fresh process starts from eSpeak's initial state), so the
    output is byte-identical for identical chunks whatever ``workers`` is. Each job writes a 16-bit PCM wav at
    22 050 Hz to ``job.path``.

    Returns:
        For every chunk, the number of samples of each of its utterances.

    Raises:
        TypeError: ``workers`` is not an int, or ``timeout`` not a number.
        ValueError: ``workers`` < 1, or ``timeout`` <= 0.
        ESpeakError: a subprocess failed (its error message is included).
    """
    check_int("workers", workers, 1)
    check_positive("timeout", timeout)
    package_root = str(Path(__file__).resolve().parents[3])  # the folder holding lightning_stability/
    env = dict(os.environ)
    env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-c",
        "from lightning_stability.reference.data.espeak import _worker_main; _worker_main()",
    ]

    def run_chunk(index: int) -> list[int]:
        payload = json.dumps([asdict(job) for job in chunks[index]])
        try:
            proc = subprocess.run(command, input=payload, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ESpeakError(f"eSpeak NG synthesis subprocess for chunk {index} timed out after {timeout} s") from None
        if proc.returncode != 0:
            raise ESpeakError(
                f"eSpeak NG synthesis subprocess for chunk {index} failed (exit code {proc.returncode}): "
                f"{proc.stderr.strip()[-2000:]}"
            )
        return json.loads(proc.stdout)

    if not chunks:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        return list(pool.map(run_chunk, range(len(chunks))))
