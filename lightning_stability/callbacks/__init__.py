"""Lightning callbacks (one per file). Names are imported lazily on first use."""

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "GradientGuard": ".gradient_guard",
    "AdaptiveLossWeight": ".adaptive_weights",
    "SpectralNormInjection": ".spectral_norm",
    "ScaleFactorClamp": ".scale_clamp",
    "SignalMonitor": ".signal_monitor",
    "StabilityReport": ".stability_report",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
