"""LightningModules: the reference codec and cascade transformer, and ``shard_module`` (FSDP2 from ``configure_model``).
Names are imported lazily on first use."""

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
    from lightning_stability.modules.sharding import shard_module as shard_module
