"""torchmetrics Metric classes for signal health; functional forms are in ``metrics.functional``."""

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "RMSRatio": ".signal",
    "DCOffset": ".signal",
    "PeakAmplitude": ".signal",
    "CodebookUsage": ".codebook",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
