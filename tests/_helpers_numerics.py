"""The signals and precisions of the numerics matrices (tests/losses/test_numerics.py, tests/metrics/test_numerics.py).

Signals are ``[1, 1, 4096]`` float32. Kinds: exact silence, sub-epsilon noise (``1e-9``: below every loss floor in
float32, and below float16's smallest subnormal, ``6e-8``, so it *is* silence in fp16), DC (a constant), clipping (a
square wave at exactly +-1) and full-scale uniform noise. Pairs: ``(kind, kind)`` with two different realisations,
and ``(kind, noise)`` / ``(noise, kind)`` for the cases where only one side is pathological.

Precisions: ``fp32``; ``autocast-bf16`` / ``autocast-fp16`` (float32 inputs inside ``torch.autocast`` on the CPU:
the kernels a mixed-precision model runs); ``input-bf16`` / ``input-fp16`` (the inputs themselves in half precision,
as a half-precision model produces them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

LENGTH = 4096
KINDS = ("zeros", "subeps", "dc", "clip", "noise")
# (preds kind, target kind): each kind against itself and against noise on either side
PAIRS = tuple(dict.fromkeys([(k, k) for k in KINDS] + [(k, "noise") for k in KINDS] + [("noise", k) for k in KINDS]))
PRECISIONS = ("fp32", "autocast-bf16", "autocast-fp16", "input-bf16", "input-fp16")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def signal(kind: str, seed: int, length: int = LENGTH) -> Tensor:
    """``[1, 1, length]`` float32 of ``kind``; ``seed`` picks the realisation (the phase, the noise, the DC level)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(1, 1, length)
    if kind == "subeps":
        return 1e-9 * (2 * torch.rand(1, 1, length, generator=g) - 1)
    if kind == "dc":
        return torch.full((1, 1, length), 0.5 + 0.1 * seed)
    if kind == "clip":  # a 375 Hz square wave at 24 kHz, every sample exactly +-1
        t = torch.arange(length, dtype=torch.float64) + 7 * seed + 0.5
        return torch.sign(torch.sin(2 * math.pi * t / 64)).float().view(1, 1, length)
    if kind == "noise":
        return 2 * torch.rand(1, 1, length, generator=g) - 1
    raise ValueError(kind)


def pair(kinds: tuple[str, str]) -> tuple[Tensor, Tensor]:
    return signal(kinds[0], 1), signal(kinds[1], 2)


def input_dtype(precision: str) -> torch.dtype:
    """The dtype the inputs are given in."""
    return HALF[precision.split("-")[1]] if precision.startswith("input-") else torch.float32


@contextlib.contextmanager
def context(precision: str) -> Iterator[None]:
    """``torch.autocast("cpu", dtype)`` for the autocast precisions, nothing otherwise."""
    if precision.startswith("autocast-"):
        with torch.autocast("cpu", dtype=HALF[precision.split("-")[1]]):
            yield
    else:
        yield


def input_tolerance(dtype: torch.dtype, reference: float) -> float:
    """How far a value on inputs rounded to ``dtype`` may be from the float32 value: twice the dtype's eps, relative
    to ``1 + |reference|`` (the inputs are rounded by half an ulp; losses that compare two signals amplify that)."""
    return 2 * torch.finfo(dtype).eps * (1 + abs(reference))
