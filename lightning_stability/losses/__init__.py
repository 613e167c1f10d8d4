"""Losses and the loss-weight protocol. Names are imported lazily on first use."""

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.losses.balancer import BalancedLoss as BalancedLoss
    from lightning_stability.losses.balancer import LossBalancer as LossBalancer
    from lightning_stability.losses.spectral import MultiResolutionMelLoss as MultiResolutionMelLoss
    from lightning_stability.losses.spectral import MultiResolutionSTFTLoss as MultiResolutionSTFTLoss
    from lightning_stability.losses.spectral import RMSMatchingLoss as RMSMatchingLoss
    from lightning_stability.losses.spectral import mel_distance as mel_distance
    from lightning_stability.losses.weights import LossWeights as LossWeights
    from lightning_stability.losses.weights import SpikeDamping as SpikeDamping
