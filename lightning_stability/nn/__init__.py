"""Plain torch layers and models. Nothing in ``nn/`` imports lightning. Names are imported lazily on first use."""

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
