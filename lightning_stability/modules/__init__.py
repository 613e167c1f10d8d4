"""LightningModules: the reference codec and cascade transformer. Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "CodecModule": ".codec",
    "CascadeTransformerModule": ".cascade",
    "shard_module": ".sharding",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers, the API reference)
    from lightning_stability.modules.cascade import CascadeTransformerModule as CascadeTransformerModule
    from lightning_stability.modules.codec import CodecModule as CodecModule
