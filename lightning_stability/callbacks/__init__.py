"""Lightning callbacks (one per file). Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "GradientGuard": ".guard.gradient_guard",
    "AdaptiveLossWeight": ".adaptive_weights",
    "SpectralNormInjection": ".spectral_norm",
    "ScaleFactorClamp": ".scale_clamp",
    "SignalMonitor": ".signal_monitor",
    "StabilityReport": ".stability_report",
    "CodebookMonitor": ".codebook_monitor",
    "QuantizerTap": ".codebook_monitor",
    "AdversarialBalanceMonitor": ".adversarial_balance",
    "EventLog": "._events",
    "StabilityEvent": "._events",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.callbacks._events import EventLog as EventLog
    from lightning_stability.callbacks._events import StabilityEvent as StabilityEvent
    from lightning_stability.callbacks.adaptive_weights import AdaptiveLossWeight as AdaptiveLossWeight
    from lightning_stability.callbacks.adversarial_balance import AdversarialBalanceMonitor as AdversarialBalanceMonitor
    from lightning_stability.callbacks.codebook_monitor import CodebookMonitor as CodebookMonitor
    from lightning_stability.callbacks.codebook_monitor import QuantizerTap as QuantizerTap
    from lightning_stability.callbacks.guard.gradient_guard import GradientGuard as GradientGuard
    from lightning_stability.callbacks.scale_clamp import ScaleFactorClamp as ScaleFactorClamp
    from lightning_stability.callbacks.signal_monitor import SignalMonitor as SignalMonitor
    from lightning_stability.callbacks.spectral_norm import SpectralNormInjection as SpectralNormInjection
    from lightning_stability.callbacks.stability_report import StabilityReport as StabilityReport
