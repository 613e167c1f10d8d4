"""The reference LightningModules and ``shard_module`` at their 0.1 import path. They live in
:mod:`lightning_stability.reference.codec` (``CodecModule``), :mod:`lightning_stability.reference.cascade`
(``CascadeTransformerModule``) and :mod:`lightning_stability.sharding` (``shard_module``, part of the plugin); this
path keeps working. Names are imported lazily on first use."""

from typing import TYPE_CHECKING

from lightning_stability._lazy import lazy_getattr

_NAMES = {
    "CodecModule": "lightning_stability.reference.codec.module",
    "CascadeTransformerModule": "lightning_stability.reference.cascade.module",
    "shard_module": "lightning_stability.sharding",
}
__all__ = list(_NAMES)
__getattr__ = lazy_getattr(__name__, _NAMES)

if TYPE_CHECKING:  # the static view of the lazy names (type checkers)
    from lightning_stability.reference.cascade.module import CascadeTransformerModule as CascadeTransformerModule
    from lightning_stability.reference.codec.module import CodecModule as CodecModule
    from lightning_stability.sharding import shard_module as shard_module
