"""Functional forms of the speech-quality metrics people report: wide-band PESQ, STOI and the loudness error.

Each is computed per series (``(..., time)`` in, ``(...)`` out) by the field's reference package, not a
re-implementation:

- **PESQ** (ITU-T P.862.2 wide-band, MOS-LQO, about 1.0 to 4.64): the ``pesq`` package through torchmetrics'
  :func:`~torchmetrics.functional.audio.perceptual_evaluation_speech_quality`. P.862.2 is defined on 16 kHz signals
  only, so both signals are first resampled from ``sample_rate`` to 16 kHz (torchaudio's band-limited sinc
  resampler; nothing is done at 16 kHz). An identical pair scores 4.644 (the top of the P.862.2 mapping).
- **STOI** (Taal et al. 2011, 0 to 1): the ``pystoi`` package through torchmetrics'
  :func:`~torchmetrics.functional.audio.short_time_objective_intelligibility`, given the signals at their own rate:
  pystoi resamples to its native 10 kHz itself (``pystoi.stoi``: ``if fs_sig != 10000: resample_oct(...)``) and
  removes silent frames (40 dB below the loudest reference frame) before scoring.
- **Loudness error** (LU): ``L(preds) - L(target)`` (signed; negative = the reconstruction is quieter) or its
  absolute value, with ``L`` the ITU-R BS.1770-4 integrated loudness (LUFS) from ``pyloudnorm``'s ``Meter``
  (K-weighting, 400 ms blocks, absolute gate -70 LUFS, relative gate -10 LU) at ``sample_rate``. A reconstruction
  quieter than the absolute gate (``L = -inf``, e.g. silence) is measured as ``-70`` LUFS, so the error stays
  finite and large.

**When a score does not exist.** These measures are undefined for some inputs, and the packages then raise or
return placeholders (PESQ raises ``NoUtterancesError`` on a silent reference, ``BufferTooShortError`` below 0.25 s,
and a ``ValueError`` on a silent or NaN degraded signal; STOI returns ``1e-5`` with a warning when fewer than 30
non-silent frames remain; pyloudnorm raises below one 400 ms block). Here every such case is detected and named:
with ``on_error="raise"`` (default) a :class:`SpeechQualityError` says which series and why; with
``on_error="nan"`` that series scores NaN. The ``Metric`` classes (:mod:`lightning_stability.metrics.quality`)
count and skip such series instead, so one silent validation clip never crashes an epoch.

Cost (``python benchmarks/quality_cost.py``, one thread, CPU time per second of 24 kHz audio): PESQ about 18 ms,
STOI about 6 ms, loudness about 2 ms (wall time about twice that on the shared 2-core machine). The computation runs
on the CPU (inputs are copied there).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_stability._checks import check_bool, check_choice, check_int

__all__ = [
    "PESQ_SAMPLE_RATE",
    "SpeechQualityError",
    "integrated_loudness",
    "loudness_error",
    "stoi",
    "wideband_pesq",
]

#: P.862.2 (wide-band PESQ) is defined at 16 kHz: inputs at any other rate are resampled to it.
PESQ_SAMPLE_RATE = 16000
#: Shortest input PESQ accepts (the ``pesq`` package's check: a quarter of a second).
PESQ_MIN_SECONDS = 0.25
#: BS.1770 gating block; pyloudnorm rejects shorter signals.
LOUDNESS_BLOCK_SECONDS = 0.4
#: BS.1770's absolute gate: the loudness floor used for a reconstruction quieter than that.
LOUDNESS_FLOOR_LUFS = -70.0

OnError = Literal["raise", "nan"]


class SpeechQualityError(ValueError):
    """A speech-quality score does not exist for one series; ``metric``, ``index`` and ``reason`` say which and why."""

    def __init__(self, metric: str, index: int, reason: str) -> None:
        self.metric, self.index, self.reason = metric, index, reason
        super().__init__(f"{metric} cannot score series {index}: {reason}")


# ------------------------------------------------------------------------------------------------------- helpers
def _check_signal(name: str, x: Any) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 0:
        raise ValueError(f"`{name}` must have a time dimension (shape `(..., time)`), got a 0-dim tensor")
    if not x.is_floating_point():
        raise TypeError(f"`{name}` must hold float audio samples (e.g. float32 in [-1, 1]), got dtype {x.dtype}")


def _check_inputs(preds: Tensor, target: Tensor, sample_rate: int, on_error: str) -> None:
    _check_signal("preds", preds)
    _check_signal("target", target)
    if preds.shape != target.shape:
        raise ValueError(
            f"`preds` and `target` must have the same shape, got preds {tuple(preds.shape)} and target "
            f"{tuple(target.shape)}"
        )
    check_int("sample_rate", sample_rate, 1)
    check_choice("on_error", on_error, ("raise", "nan"))


def _series(x: Tensor) -> Tensor:
    """``(..., time)`` -> float64 ``[N, time]`` on the CPU (the packages work on numpy)."""
    return x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1])


def _silent(x: Tensor) -> bool:
    return float(x.abs().max()) == 0.0 if x.numel() else True


@lru_cache(maxsize=8)
def _resampler(orig: int, new: int):
    import torchaudio

    return torchaudio.transforms.Resample(orig, new, dtype=torch.float64)  # the sinc kernel, built once per rate pair


def _to_rate(x: Tensor, orig: int, new: int) -> Tensor:
    if orig == new:
        return x
    with torch.no_grad():
        return _resampler(int(orig), int(new))(x)


def _scores(
    metric: str, preds: Tensor, target: Tensor, score: Callable[[Tensor, Tensor], float | str]
) -> list[float | str]:
    """``score(pred_i, target_i)`` for every series: a float, or a string saying why the series has no score."""
    p, t = _series(preds), _series(target)
    out: list[float | str] = []
    for i in range(p.shape[0]):
        if not bool(torch.isfinite(t[i]).all()):
            out.append("the target has non-finite samples")
        elif not bool(torch.isfinite(p[i]).all()):
            out.append("the prediction has non-finite samples (NaN/inf)")
        else:
            out.append(score(p[i], t[i]))
    return out


def _finish(metric: str, values: list[float | str], shape: torch.Size, on_error: str) -> Tensor:
    result = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            if on_error == "raise":
                raise SpeechQualityError(metric, i, v)
            v = math.nan
        result.append(v)
    return torch.tensor(result, dtype=torch.float32).reshape(shape[:-1])


# ---------------------------------------------------------------------------------------------------------- PESQ
def _pesq_one(pred: Tensor, target: Tensor, sample_rate: int) -> float | str:
    from torchmetrics.functional.audio import perceptual_evaluation_speech_quality

    if target.shape[-1] < math.ceil(PESQ_MIN_SECONDS * sample_rate):
        return f"shorter than PESQ's minimum of {PESQ_MIN_SECONDS} s ({target.shape[-1] / sample_rate:.3f} s)"
    if _silent(target):
        return "the target is silent (PESQ needs speech in the reference)"
    if _silent(pred):
        return "the prediction is silent (PESQ is undefined for an all-zero degraded signal)"
    t16, p16 = _to_rate(target, sample_rate, PESQ_SAMPLE_RATE), _to_rate(pred, sample_rate, PESQ_SAMPLE_RATE)
    import pesq as pesq_backend

    try:
        return float(perceptual_evaluation_speech_quality(p16, t16, PESQ_SAMPLE_RATE, "wb"))
    except pesq_backend.NoUtterancesError:
        return "PESQ found no utterances in the target (silence or noise only)"
    except pesq_backend.PesqError as err:  # BufferTooShortError, OutOfMemoryError, ...
        return f"the pesq package raised {type(err).__name__}: {_text(err)}"
    except ValueError as err:  # e.g. a prediction the P.862 level alignment cannot handle
        return f"the pesq package raised ValueError: {_text(err)}"


def _text(err: Exception) -> str:
    arg = err.args[0] if err.args else ""
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


def _require(package: str, metric: str) -> None:
    try:
        __import__(package)
    except ImportError as err:
        raise ModuleNotFoundError(
            f"{metric} needs the `{package}` package: `pip install {package}` "
            "(or `pip install lightning-stability[metrics]`)"
        ) from err


def wideband_pesq(preds: Tensor, target: Tensor, sample_rate: int, *, on_error: OnError = "raise") -> Tensor:
    """Wide-band PESQ (ITU-T P.862.2, MOS-LQO) of each series, after resampling both signals to 16 kHz.

    Args:
        preds: ``(..., time)`` degraded signal (the reconstruction).
        target: ``(..., time)`` reference, same shape.
        sample_rate: the signals' rate in Hz (anything; resampled to 16 kHz for P.862.2).
        on_error: ``"raise"`` (:class:`SpeechQualityError` naming the series and the reason) or ``"nan"`` for a
            series PESQ cannot score (shorter than 0.25 s, silent target or prediction, non-finite samples, no
            utterance found).

    Returns:
        float32 ``(...)`` on the CPU.

    Raises:
        ModuleNotFoundError: ``pesq`` is not installed.
        SpeechQualityError: a series has no score and ``on_error="raise"``.
    """
    _check_inputs(preds, target, sample_rate, on_error)
    _require("pesq", "wide-band PESQ")
    values = _scores("PESQ", preds, target, lambda p, t: _pesq_one(p, t, sample_rate))
    return _finish("PESQ", values, preds.shape, on_error)


# ---------------------------------------------------------------------------------------------------------- STOI
def _stoi_one(pred: Tensor, target: Tensor, sample_rate: int, extended: bool) -> float | str:
    from torchmetrics.functional.audio import short_time_objective_intelligibility

    if _silent(target):
        return "the target is silent (STOI needs speech in the reference)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(short_time_objective_intelligibility(pred, target, sample_rate, extended=extended))
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        # pystoi's placeholder (1e-5): fewer than 30 frames of 384 ms at 10 kHz remain after silent-frame removal
        return "too little non-silent speech for STOI (fewer than 30 frames, about 0.4 s, after silence removal)"
    return value


def stoi(
    preds: Tensor, target: Tensor, sample_rate: int, *, extended: bool = False, on_error: OnError = "raise"
) -> Tensor:
    """STOI (Taal et al. 2011; ``extended=True``: ESTOI, Jensen & Taal 2016) of each series, from ``pystoi``.

    The signals go in at their own rate: pystoi resamples them to its native 10 kHz and drops silent frames.

    Args:
        preds: ``(..., time)`` processed signal (the reconstruction).
        target: ``(..., time)`` clean reference, same shape.
        sample_rate: the signals' rate in Hz.
        extended: ESTOI instead of STOI.
        on_error: ``"raise"`` or ``"nan"`` for a series STOI cannot score (silent target, non-finite samples, or
            under about 0.4 s of speech left after silence removal, where pystoi would return a placeholder 1e-5).

    Returns:
        float32 ``(...)`` on the CPU.

    Raises:
        ModuleNotFoundError: ``pystoi`` is not installed.
        SpeechQualityError: a series has no score and ``on_error="raise"``.
    """
    _check_inputs(preds, target, sample_rate, on_error)
    check_bool("extended", extended)
    _require("pystoi", "STOI")
    values = _scores("STOI", preds, target, lambda p, t: _stoi_one(p, t, sample_rate, extended))
    return _finish("STOI", values, preds.shape, on_error)


# ------------------------------------------------------------------------------------------------------ loudness
@lru_cache(maxsize=8)
def _meter(sample_rate: int):
    import pyloudnorm

    return pyloudnorm.Meter(sample_rate)  # BS.1770-4 K-weighting designed at this rate


def _loudness_one(x: Tensor, sample_rate: int) -> float:
    return float(_meter(sample_rate).integrated_loudness(x.numpy()))


def integrated_loudness(x: Tensor, sample_rate: int) -> Tensor:
    """ITU-R BS.1770-4 integrated loudness (LUFS) of each series of ``x (..., time)``, by ``pyloudnorm``.

    ``-inf`` for a series whose every 400 ms block is below the -70 LUFS absolute gate (silence).

    Raises:
        ValueError: ``x`` is shorter than one 400 ms block, or has non-finite samples.
    """
    _check_signal("x", x)
    check_int("sample_rate", sample_rate, 1)
    _require("pyloudnorm", "loudness")
    s = _series(x)
    if s.shape[-1] <= LOUDNESS_BLOCK_SECONDS * sample_rate:
        raise ValueError(
            f"`x` must be longer than one BS.1770 block ({LOUDNESS_BLOCK_SECONDS} s = "
            f"{LOUDNESS_BLOCK_SECONDS * sample_rate:.0f} samples at {sample_rate} Hz), got {s.shape[-1]} samples"
        )
    if not bool(torch.isfinite(s).all()):
        raise ValueError("`x` has non-finite samples (NaN/inf)")
    return torch.tensor([_loudness_one(s[i], sample_rate) for i in range(s.shape[0])]).reshape(x.shape[:-1])


def _loudness_error_one(pred: Tensor, target: Tensor, sample_rate: int, signed: bool) -> float | str:
    if target.shape[-1] <= LOUDNESS_BLOCK_SECONDS * sample_rate:
        return f"shorter than one BS.1770 block ({LOUDNESS_BLOCK_SECONDS} s; {target.shape[-1] / sample_rate:.3f} s)"
    lt = _loudness_one(target, sample_rate)
    if not math.isfinite(lt):
        return f"the target is below BS.1770's absolute gate ({LOUDNESS_FLOOR_LUFS:.0f} LUFS): no loudness to match"
    lp = max(_loudness_one(pred, sample_rate), LOUDNESS_FLOOR_LUFS)
    return lp - lt if signed else abs(lp - lt)


def loudness_error(
    preds: Tensor, target: Tensor, sample_rate: int, *, signed: bool = False, on_error: OnError = "raise"
) -> Tensor:
    """Loudness error in LU: ``L(preds) - L(target)`` (``signed=True``; < 0 = quieter) or ``|L(preds) - L(target)|``.

    ``L`` is the BS.1770-4 integrated loudness (pyloudnorm) at ``sample_rate``; a prediction below the -70 LUFS
    absolute gate counts as -70 LUFS. Example: a signal and the same signal at -6 dB differ by exactly 6.0 LU.

    Args:
        preds: ``(..., time)`` reconstruction.
        target: ``(..., time)`` reference, same shape.
        sample_rate: the signals' rate in Hz.
        signed: return the signed difference instead of its absolute value.
        on_error: ``"raise"`` or ``"nan"`` for a series with no defined error (shorter than one 400 ms block,
            target below the absolute gate, non-finite samples).

    Returns:
        float32 ``(...)`` on the CPU.

    Raises:
        ModuleNotFoundError: ``pyloudnorm`` is not installed.
        SpeechQualityError: a series has no error defined and ``on_error="raise"``.
    """
    _check_inputs(preds, target, sample_rate, on_error)
    check_bool("signed", signed)
    _require("pyloudnorm", "the loudness error")
    values = _scores("loudness error", preds, target, lambda p, t: _loudness_error_one(p, t, sample_rate, signed))
    return _finish("loudness error", values, preds.shape, on_error)


# --------------------------------------------------------------------------------------- sufficient statistics
def _quality_update(
    metric: str, preds: Tensor, target: Tensor, score: Callable[[Tensor, Tensor], float | str]
) -> tuple[float, int, int, str | None]:
    """``(sum of scores, scored series, skipped series, first skip reason)`` of a batch, for the Metric classes."""
    values = _scores(metric, preds, target, score)
    scored = [v for v in values if not isinstance(v, str)]
    reasons = [f"clip {i} of its batch: {v}" for i, v in enumerate(values) if isinstance(v, str)]
    return float(np.sum(scored)) if scored else 0.0, len(scored), len(reasons), reasons[0] if reasons else None
