"""The reference speech codec: ``CodecModule`` and its blocks (SEANet, residual VQ, STFT discriminator), the demo.
Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "CodecModule": ".module",
    "CodecOutput": ".module",
    "SEANetEncoder": ".seanet",
    "SEANetDecoder": ".seanet",
    "ResidualVectorQuantizer": ".quantize",
    "QuantizedResult": ".quantize",
    "MultiScaleSTFTDiscriminator": ".discriminator",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.reference.codec.discriminator import (
        MultiScaleSTFTDiscriminator as MultiScaleSTFTDiscriminator,
    )
    from lightning_stability.reference.codec.module import CodecModule as CodecModule
    from lightning_stability.reference.codec.module import CodecOutput as CodecOutput
    from lightning_stability.reference.codec.quantize import QuantizedResult as QuantizedResult
    from lightning_stability.reference.codec.quantize import ResidualVectorQuantizer as ResidualVectorQuantizer
    from lightning_stability.reference.codec.seanet import SEANetDecoder as SEANetDecoder
    from lightning_stability.reference.codec.seanet import SEANetEncoder as SEANetEncoder
