"""Plain torch layers and models. Nothing in ``nn/`` imports lightning. Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "ClampedRMSScale": ".scale",
    "normalize": ".scale",
    "denormalize": ".scale",
    "inject_spectral_norm": ".spectral",
    "load_with_spectral_norm": ".spectral",
    "spectral_sigma": ".spectral",
    "CascadeConfig": ".transformer",
    "CascadeTransformer": ".transformer",
    "small_init_": ".transformer",
    "SEANetEncoder": ".seanet",
    "SEANetDecoder": ".seanet",
    "ResidualVectorQuantizer": ".quantize",
    "QuantizedResult": ".quantize",
    "MultiScaleSTFTDiscriminator": ".discriminator",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.nn.discriminator import MultiScaleSTFTDiscriminator as MultiScaleSTFTDiscriminator
    from lightning_stability.nn.quantize import QuantizedResult as QuantizedResult
    from lightning_stability.nn.quantize import ResidualVectorQuantizer as ResidualVectorQuantizer
    from lightning_stability.nn.scale import ClampedRMSScale as ClampedRMSScale
    from lightning_stability.nn.scale import denormalize as denormalize
    from lightning_stability.nn.scale import normalize as normalize
    from lightning_stability.nn.seanet import SEANetDecoder as SEANetDecoder
    from lightning_stability.nn.seanet import SEANetEncoder as SEANetEncoder
    from lightning_stability.nn.spectral import inject_spectral_norm as inject_spectral_norm
    from lightning_stability.nn.spectral import load_with_spectral_norm as load_with_spectral_norm
    from lightning_stability.nn.spectral import spectral_sigma as spectral_sigma
    from lightning_stability.nn.transformer import CascadeConfig as CascadeConfig
    from lightning_stability.nn.transformer import CascadeTransformer as CascadeTransformer
    from lightning_stability.nn.transformer import small_init_ as small_init_
