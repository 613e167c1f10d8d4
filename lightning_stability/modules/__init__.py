"""LightningModules: the reference codec and cascade transformer. Names are imported lazily on first use."""

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "CodecModule": ".codec",
    "CascadeTransformerModule": ".cascade",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)
