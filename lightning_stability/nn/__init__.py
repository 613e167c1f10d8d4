"""Plain torch layers the callbacks use: ``ClampedRMSScale`` and the EnCodec scale helpers (``scale``), the
spectral-norm helpers (``spectral``). Nothing in ``nn/`` imports lightning. The reference models' blocks (SEANet, the
residual quantizer, the discriminator, the cascade transformer) moved to :mod:`lightning_stability.reference` in 0.2.0
and keep their names here too. Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "ClampedRMSScale": ".scale",
    "normalize": ".scale",
    "denormalize": ".scale",
    "inject_spectral_norm": ".spectral",
    "load_with_spectral_norm": ".spectral",
    "spectral_sigma": ".spectral",
    # moved to the reference models (0.2.0); these names keep working here
    "CascadeConfig": "lightning_stability.reference.cascade.transformer",
    "CascadeTransformer": "lightning_stability.reference.cascade.transformer",
    "small_init_": "lightning_stability.reference.cascade.transformer",
    "SEANetEncoder": "lightning_stability.reference.codec.seanet",
    "SEANetDecoder": "lightning_stability.reference.codec.seanet",
    "ResidualVectorQuantizer": "lightning_stability.reference.codec.quantize",
    "QuantizedResult": "lightning_stability.reference.codec.quantize",
    "MultiScaleSTFTDiscriminator": "lightning_stability.reference.codec.discriminator",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.nn.scale import ClampedRMSScale as ClampedRMSScale
    from lightning_stability.nn.scale import denormalize as denormalize
    from lightning_stability.nn.scale import normalize as normalize
    from lightning_stability.nn.spectral import inject_spectral_norm as inject_spectral_norm
    from lightning_stability.nn.spectral import load_with_spectral_norm as load_with_spectral_norm
    from lightning_stability.nn.spectral import spectral_sigma as spectral_sigma
    from lightning_stability.reference.cascade.transformer import CascadeConfig as CascadeConfig
    from lightning_stability.reference.cascade.transformer import CascadeTransformer as CascadeTransformer
    from lightning_stability.reference.cascade.transformer import small_init_ as small_init_
    from lightning_stability.reference.codec.discriminator import (
        MultiScaleSTFTDiscriminator as MultiScaleSTFTDiscriminator,
    )
    from lightning_stability.reference.codec.quantize import QuantizedResult as QuantizedResult
    from lightning_stability.reference.codec.quantize import ResidualVectorQuantizer as ResidualVectorQuantizer
    from lightning_stability.reference.codec.seanet import SEANetDecoder as SEANetDecoder
    from lightning_stability.reference.codec.seanet import SEANetEncoder as SEANetEncoder
