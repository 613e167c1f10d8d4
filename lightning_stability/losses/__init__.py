"""Losses and the loss-weight protocol. Names are imported lazily on first use."""

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "LossWeights": ".weights",
    "LossBalancer": ".balancer",
    "MultiResolutionMelLoss": ".spectral",
    "MultiResolutionSTFTLoss": ".spectral",
    "RMSMatchingLoss": ".spectral",
    "mel_distance": ".spectral",
    "SpikeDamping": ".weights",
    "BalancedLoss": ".balancer",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
