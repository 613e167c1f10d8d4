"""torchmetrics Metric classes for signal health and speech quality.

Functional forms: ``metrics.functional`` (signal health, codebooks) and ``metrics.perceptual`` (wide-band PESQ, STOI,
loudness error).
"""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "RMSRatio": ".signal",
    "DCOffset": ".signal",
    "PeakAmplitude": ".signal",
    "CodebookUsage": ".codebook",
    "WidebandPESQ": ".quality",
    "STOI": ".quality",
    "LoudnessError": ".quality",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.metrics.codebook import CodebookUsage as CodebookUsage
    from lightning_stability.metrics.quality import STOI as STOI
    from lightning_stability.metrics.quality import LoudnessError as LoudnessError
    from lightning_stability.metrics.quality import WidebandPESQ as WidebandPESQ
    from lightning_stability.metrics.signal import DCOffset as DCOffset
    from lightning_stability.metrics.signal import PeakAmplitude as PeakAmplitude
    from lightning_stability.metrics.signal import RMSRatio as RMSRatio
